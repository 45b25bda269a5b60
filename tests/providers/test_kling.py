"""The Kling adapter: payload files → observations, error classification, the JWT, the
Standard Webhooks signature, and the poll flows against a real loopback server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reconciler.clock import FakeClock
from reconciler.config import ProviderSettings, Secret
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    ConfigError,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
    SignatureError,
)
from reconciler.model import Status, Task
from reconciler.providers.base import PollResult, RawDelivery
from reconciler.providers.kling import Kling, KlingJWTAuth
from reconciler.providers.kling_task import kling_path
from tests.providers.support import (
    EPOCH,
    any_json,
    as_dict,
    catch_all,
    drive,
    new_task,
    observe_case,
    offline,
    payload_files,
    reply,
    serve,
)

PAYLOADS = Path(__file__).parent / "payloads" / "kling"
SECRET_KEY = "kling-secret-key-0123456789abcdef"  # as long as a real one


def settings(base_url: str = "https://kling.test", **extra: Any) -> ProviderSettings:
    return ProviderSettings(
        name="kling",
        base_url=base_url,
        api_key=Secret("access-key"),
        secret_key=Secret(SECRET_KEY),
        **extra,
    )


def make_task(task_id: str, action: str = "text2video", external: str | None = None) -> Task:
    return new_task("kling", task_id, action, external=external)


# --- payload files -----------------------------------------------------------------------


@pytest.mark.parametrize("case", payload_files(PAYLOADS))
def test_payload(case: dict[str, Any]) -> None:
    observation = observe_case(Kling(settings()), case, make_task)
    if observation is None:
        return
    assert as_dict(observation) == case["expected"]
    assert isinstance(observation.raw, dict)
    assert observation.raw.get("task_id", observation.raw.get("id")) == observation.task_id


def test_success_without_url_is_not_effectively_complete() -> None:
    case = json.loads((PAYLOADS / "callback_v2_test_vector.json").read_text(encoding="utf-8"))
    observation = Kling(settings()).parse_callback(case["body"])
    assert observation.status is Status.COMPLETED
    assert observation.effective_status is Status.PROCESSING


def test_list_answer_as_callback_with_one_item() -> None:
    body = {"code": 0, "message": "SUCCEED", "data": [{"id": "9", "status": "processing"}]}
    assert Kling(settings()).parse_callback(body).status is Status.PROCESSING
    body["data"] = []
    with pytest.raises(BadPayload, match="one task"):
        Kling(settings()).parse_callback(body)


# --- error classification ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, {"code": 1000, "message": "auth failed"}, AuthRejected),
        (401, {"code": 1004, "message": "token expired"}, AuthRejected),
        (429, {"code": 1100, "message": "account exception"}, AuthRejected),
        (429, {"code": 1101, "message": "arrears"}, AuthRejected),
        # HTTP 429 with 1102 is the balance, not a rate limit (PROVIDERS trap 6).
        (429, {"code": 1102, "message": "Account balance not enough"}, AuthRejected),
        (403, {"code": 1103, "message": "no permission"}, AuthRejected),
        (429, {"code": 1304, "message": "ip whitelist"}, AuthRejected),
        (429, {"code": 1302, "message": "rate limit"}, RateLimited),
        (
            429,
            {"code": 1303, "message": "parallel task over resource pack limit", "data": None},
            RateLimited,
        ),
        (500, {"code": 5000, "message": "internal"}, ServerError),
        (503, {"code": 5001, "message": "maintenance"}, ServerError),
        (504, {"code": 5002, "message": "timeout"}, ServerError),
        (502, b"<html>Bad gateway</html>", ServerError),
        (200, b"not json", ServerError),
        (429, b"slow down", RateLimited),
        (401, b"", AuthRejected),
    ],
)
def test_whole_exchange_errors_raise(status: int, body: object, expected: type) -> None:
    with pytest.raises(expected):
        offline(Kling(settings()).poll([make_task("t1")]), reply(status, body))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"code": 1200, "message": "invalid request"}),
        (404, {"code": 1202, "message": "invalid method"}),
        (400, {"code": 1300, "message": "platform policy"}),
        (400, {"code": 1301, "message": "content safety"}),
        (200, {"code": 0, "message": "SUCCEED", "data": None}),
        (200, {"code": 0, "message": "SUCCEED", "data": {"task_status": "succeed"}}),
        (400, b"[" * 100_000 + b"]" * 100_000),  # too deep to decode
    ],
)
def test_task_level_errors_are_results(status: int, body: object) -> None:
    [result] = offline(Kling(settings()).poll([make_task("t1")]), reply(status, body))
    assert isinstance(result.error, BadPayload)
    assert result.task_id == "t1"


def test_retry_after_is_honoured_on_rate_limits() -> None:
    answer = reply(429, {"code": 1302, "message": "too many"}, {"Retry-After": "7"})
    with pytest.raises(RateLimited) as raised:
        offline(Kling(settings()).poll([make_task("t1")]), answer)
    assert raised.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("action", "path"),
    [
        ("text2video", "videos/text2video"),
        ("avatar/image2video", "videos/avatar/image2video"),
        ("videos/image2video", "videos/image2video"),
        ("images/generations", "images/generations"),
        ("", "videos/text2video"),
        ("../../admin", "videos/admin"),
        ("lip sync?x", "videos/lip%20sync%3Fx"),
    ],
)
def test_action_paths(action: str, path: str) -> None:
    assert kling_path(action) == path


def test_query_urls() -> None:
    kling = Kling(settings())
    assert str(kling.query_request(make_task("a/b", "image2video")).url) == (
        "https://kling.test/v1/videos/image2video/a%2Fb"
    )
    assert str(kling.list_request("text2video").url) == (
        "https://kling.test/v1/videos/text2video?pageNum=1&pageSize=500"
    )


# --- the JWT ------------------------------------------------------------------------------


def bearer(auth: httpx.Auth) -> str:
    request = next(auth.auth_flow(httpx.Request("GET", "https://kling.test/")))
    scheme, _, token = request.headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    return token


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(
        token,
        SECRET_KEY,
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_nbf": False},
    )
    return decoded


def test_jwt_header_and_claims() -> None:
    clock = FakeClock(EPOCH)
    auth = Kling(settings(), clock).auth()
    assert auth is not None
    token = bearer(auth)
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    now = int(EPOCH.timestamp())
    assert claims(token) == {"iss": "access-key", "exp": now + 1800, "nbf": now - 5}


def test_jwt_is_cached_then_renewed_before_expiry() -> None:
    clock = FakeClock(EPOCH)
    auth = Kling(settings(), clock).auth()
    assert auth is not None
    first = bearer(auth)
    clock.advance(1400)  # 400 s left: still good
    assert bearer(auth) == first
    clock.advance(200)  # 200 s left: renewed
    renewed = bearer(auth)
    assert renewed != first
    assert claims(renewed)["exp"] == int(EPOCH.timestamp()) + 1600 + 1800


def test_jwt_is_reminted_once_on_401() -> None:
    clock = FakeClock(EPOCH)
    auth = Kling(settings(), clock).auth()
    assert auth is not None
    flow = auth.auth_flow(httpx.Request("GET", "https://kling.test/"))
    request = next(flow)
    clock.advance(60)
    retried = flow.send(httpx.Response(401, request=request))
    assert claims(retried.headers["Authorization"][7:])["nbf"] == int(EPOCH.timestamp()) + 55
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(401, request=retried))


def test_no_secret_in_repr() -> None:
    auth = Kling(settings()).auth()
    token = bearer(auth) if auth else ""
    for shown in (repr(auth), str(auth)):
        assert token not in shown
        assert SECRET_KEY not in shown
        assert "access-key" not in shown


def test_no_auth_without_credentials() -> None:
    bare = ProviderSettings(name="kling", base_url="https://kling.test")
    assert Kling(bare).auth() is None
    assert isinstance(Kling(settings()).auth(), KlingJWTAuth)


# --- webhook signatures (PROVIDERS §1.9 test vector) ---------------------------------------

VECTOR_SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
VECTOR_BODY = (
    b'{"id":"1234567890","status":"succeeded","message":"",'
    b'"create_time":1781080778802,"update_time":1781080794151}'
)
VECTOR_HEADERS = {
    "webhook-id": "9876543210",
    "webhook-timestamp": "1781080794",
    "webhook-signature": "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4=",
}
VECTOR_TIME = datetime.fromtimestamp(1781080794, UTC)


def signed_kling(at: datetime = VECTOR_TIME) -> Kling:
    return Kling(settings(webhook_secret=Secret(VECTOR_SECRET)), FakeClock(at))


def test_signature_test_vector_verifies() -> None:
    kling = signed_kling(VECTOR_TIME + timedelta(seconds=3))
    kling.verify(RawDelivery(VECTOR_HEADERS, VECTOR_BODY))
    assert kling.parse_callback(json.loads(VECTOR_BODY)).status is Status.COMPLETED


def test_signature_accepts_any_of_several_during_rotation() -> None:
    headers = dict(VECTOR_HEADERS)
    headers["webhook-signature"] = "v1,AAAA v2,zzz " + VECTOR_HEADERS["webhook-signature"]
    signed_kling().verify(RawDelivery(headers, VECTOR_BODY))


@pytest.mark.parametrize(
    ("headers", "body", "at", "reason"),
    [
        (VECTOR_HEADERS, VECTOR_BODY.replace(b"succeeded", b"failed"), VECTOR_TIME, "matches"),
        ({**VECTOR_HEADERS, "webhook-id": "1"}, VECTOR_BODY, VECTOR_TIME, "matches"),
        ({**VECTOR_HEADERS, "webhook-signature": "v1,@@"}, VECTOR_BODY, VECTOR_TIME, "matches"),
        ({"webhook-id": "9876543210"}, VECTOR_BODY, VECTOR_TIME, "missing"),
        ({**VECTOR_HEADERS, "webhook-timestamp": "soon"}, VECTOR_BODY, VECTOR_TIME, "Unix"),
        (VECTOR_HEADERS, VECTOR_BODY, VECTOR_TIME + timedelta(minutes=6), "tolerance"),
        (VECTOR_HEADERS, VECTOR_BODY, VECTOR_TIME - timedelta(minutes=6), "tolerance"),
        (VECTOR_HEADERS, b"\xff" + VECTOR_BODY, VECTOR_TIME, "UTF-8"),
    ],
)
def test_bad_signatures_are_rejected(
    headers: dict[str, str], body: bytes, at: datetime, reason: str
) -> None:
    with pytest.raises(SignatureError, match=reason):
        signed_kling(at).verify(RawDelivery(headers, body))


def test_no_secret_means_no_check() -> None:
    Kling(settings()).verify(RawDelivery({}, b"{}"))


def test_malformed_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KLING_WEBHOOK_SECRET"):
        Kling(settings(webhook_secret=Secret("whsec_***not base64***")))


# --- any JSON ------------------------------------------------------------------------------

JSON = any_json(
    ["task_id", "task_status", "task_status_msg", "task_result", "videos", "url", "duration",
     "code", "data", "message", "id", "status", "outputs", "type", "created_at", "list",
     "create_time", "task_info", "external_task_id", "cover_image_url", "result", "video_url"],
    ["succeed", "failed", "submitted", "0", "5.1", "https://x/y.mp4"],
)  # fmt: skip


@given(JSON)
def test_any_json_callback_gives_observation_or_bad_payload(payload: object) -> None:
    try:
        observation = Kling(settings()).parse_callback(payload)
    except BadPayload:
        return
    assert isinstance(observation.task_id, str)


@given(JSON, st.sampled_from([200, 400, 404, 429, 500]))
def test_any_json_answer_gives_results_or_provider_error(body: object, status: int) -> None:
    tasks = [make_task("t1"), make_task("t2")]
    try:
        results = offline(Kling(settings()).poll(tasks), reply(status, body))
    except ProviderError:
        return
    assert sorted(result.task_id for result in results) == ["t1", "t2"]


# --- poll flows against a real server ------------------------------------------------------


@dataclass
class FakeKling:
    """A loopback Kling: canned answers per path, and a record of what was asked."""

    base_url: str = ""
    answers: dict[str, list[Response]] = field(default_factory=dict)
    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def answer(self, path: str, *responses: Response) -> None:
        self.answers.setdefault(path, []).extend(responses)

    async def endpoint(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        issuer = claims(token)["iss"] if token else ""
        self.seen.append((request.url.path, request.url.query, issuer))
        queue = self.answers.get(request.url.path)
        if not queue:
            return JSONResponse({"code": 1203, "message": "resource not found"}, 404)
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
async def fake() -> AsyncIterator[FakeKling]:
    fake = FakeKling()
    async with serve(catch_all(fake.endpoint)) as fake.base_url:
        yield fake


def kling_task(
    task_id: str, status: str = "succeed", external: str | None = None
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": "",
        "task_info": {"external_task_id": external} if external else {},
        "task_result": {"videos": [{"id": "v", "url": f"https://cdn.test/{task_id}.mp4",
                                    "duration": "5.1"}]},
        "created_at": 1751048279423,
        "updated_at": 1751048350123,
    }  # fmt: skip


def envelope(data: object) -> JSONResponse:
    return JSONResponse({"code": 0, "message": "SUCCEED", "request_id": "r", "data": data})


def by_id(results: list[PollResult]) -> dict[str, PollResult]:
    return {result.task_id: result for result in results}


async def test_single_task_direct_query(fake: FakeKling) -> None:
    fake.answer("/v1/videos/image2video/t1", envelope(kling_task("t1")))
    [result] = await drive(Kling(settings(fake.base_url)), [make_task("t1", "image2video")])
    assert result.observation is not None
    assert result.observation.status is Status.COMPLETED
    assert fake.seen == [("/v1/videos/image2video/t1", "", "access-key")]


@pytest.mark.parametrize(
    "not_found",
    [
        JSONResponse({"code": 1203, "message": "resource not found"}, 404),
        JSONResponse({"code": 1201, "message": "task_id is invalid"}, 400),
        Response("<html>404</html>", 404),
    ],
)
async def test_single_task_falls_back_to_the_list(fake: FakeKling, not_found: Response) -> None:
    fake.answer("/v1/videos/text2video/new", not_found)
    fake.answer("/v1/videos/text2video", envelope([kling_task("old"), kling_task("new")]))
    [result] = await drive(Kling(settings(fake.base_url)), [make_task("new")])
    assert result.observation is not None
    assert result.observation.task_id == "new"
    assert [path for path, _, _ in fake.seen] == [
        "/v1/videos/text2video/new",
        "/v1/videos/text2video",
    ]
    assert fake.seen[1][1] == "pageNum=1&pageSize=500"


async def test_list_shape_of_seed_000_is_accepted(fake: FakeKling) -> None:
    fake.answer("/v1/videos/text2video", envelope({"list": [kling_task("new")], "total": 1}))
    [result] = await drive(Kling(settings(fake.base_url)), [make_task("new")])
    assert result.observation is not None


async def test_unknown_everywhere_is_not_found(fake: FakeKling) -> None:
    fake.answer("/v1/videos/text2video", envelope([kling_task("other")]))
    [result] = await drive(Kling(settings(fake.base_url)), [make_task("ghost")])
    assert isinstance(result.error, NotFound)
    assert len(fake.seen) == 2


async def test_batch_uses_one_list_then_direct_queries(fake: FakeKling) -> None:
    fake.answer(
        "/v1/videos/text2video",
        envelope([kling_task("a"), kling_task("x"), kling_task("b", "processing", "ext-b"), {}]),
    )
    fake.answer("/v1/videos/text2video/c", envelope(kling_task("c", "failed")))
    tasks = [make_task("a"), make_task("ext-b"), make_task("c"), make_task("gone")]
    results = by_id(await drive(Kling(settings(fake.base_url)), tasks))
    paths = [path for path, _, _ in fake.seen]
    assert paths == [
        "/v1/videos/text2video",
        "/v1/videos/text2video/c",
        "/v1/videos/text2video/gone",
    ]
    assert results["a"].observation and results["a"].observation.status is Status.COMPLETED
    # Matched by the caller's external id on the list.
    assert results["ext-b"].observation and results["ext-b"].observation.task_id == "b"
    assert results["c"].observation and results["c"].observation.status is Status.FAILED
    assert isinstance(results["gone"].error, NotFound)


async def test_batch_all_on_the_list_is_one_request(fake: FakeKling) -> None:
    fake.answer("/v1/videos/text2video", envelope([kling_task(str(n)) for n in range(60)]))
    tasks = [make_task(str(n)) for n in range(50)]
    results = await drive(Kling(settings(fake.base_url)), tasks)
    assert len(results) == 50 and all(result.observation for result in results)
    assert len(fake.seen) == 1


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (JSONResponse({"code": 1303, "message": "parallel task over resource pack limit",
                       "data": None}, 429, headers={"Retry-After": "12"}), RateLimited),
        (JSONResponse({"code": 1102, "message": "Account balance not enough"}, 429), AuthRejected),
        (Response("<html>502 Bad Gateway</html>", 502), ServerError),
        (JSONResponse({"code": 5001, "message": "maintenance"}, 503), ServerError),
    ],
)  # fmt: skip
async def test_failures_over_http(fake: FakeKling, response: Response, expected: type) -> None:
    fake.answer("/v1/videos/text2video/t1", response)
    with pytest.raises(expected) as raised:
        await drive(Kling(settings(fake.base_url)), [make_task("t1")])
    if isinstance(raised.value, RateLimited):
        assert raised.value.retry_after == 12.0


async def test_a_401_is_retried_once_with_a_fresh_token(fake: FakeKling) -> None:
    fake.answer(
        "/v1/videos/text2video/t1",
        JSONResponse({"code": 1004, "message": "token expired"}, 401),
        envelope(kling_task("t1")),
    )
    [result] = await drive(Kling(settings(fake.base_url)), [make_task("t1")])
    assert result.observation is not None
    assert len(fake.seen) == 2


def test_no_tasks_no_requests() -> None:
    assert offline(Kling(settings()).poll([]), reply(500, b"")) == []


def test_a_list_without_a_task_array_is_a_bad_answer() -> None:
    answers = iter(
        [
            httpx.Response(404, json={"code": 1203, "message": "not found"}),
            httpx.Response(200, json={"code": 0, "message": "SUCCEED", "data": {"total": 0}}),
        ]
    )
    with pytest.raises(BadPayload, match="no task array"):
        offline(Kling(settings()).poll([make_task("t1")]), lambda request: next(answers))


def test_a_short_secret_key_mints_without_warnings() -> None:
    short = ProviderSettings(
        name="kling", base_url="https://kling.test", api_key=Secret("ak"), secret_key=Secret("sk")
    )
    auth = Kling(short).auth()
    assert auth is not None
    assert bearer(auth)  # filterwarnings=error would turn PyJWT's key-length warning into a failure


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, RateLimited), (503, ServerError), (403, AuthRejected), (400, BadPayload)],
)
def test_an_unlisted_code_falls_back_to_the_http_status(status: int, expected: type) -> None:
    with pytest.raises(expected) if status != 400 else contextlib.nullcontext():
        results = offline(
            Kling(settings()).poll([make_task("t1")]), reply(status, {"code": 9999, "message": "?"})
        )
        assert isinstance(results[0].error, BadPayload)

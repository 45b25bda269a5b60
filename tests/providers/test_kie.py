"""Kie adapter: payload-file table tests, body-code classification, HMAC, properties, real HTTP.

Each file in `payloads/kie/` is one case, derived from seed 002 and PROVIDERS.md §4:
`callback` + `expect` (one observation) or `raises`; or `poll` (the tasks asked about and
the answer to give) + `expect` (one result per task) or `raises`, and an optional
`request` the flow must have built.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reconciler import errors
from reconciler.clock import FakeClock
from reconciler.config import ProviderSettings, Secret
from reconciler.model import Observation, Status, Task
from reconciler.providers.base import RawDelivery
from reconciler.providers.kie import Kie
from tests.providers.support import (
    check_callback_case,
    check_raised,
    check_results,
    drive,
    near_payloads,
    new_task,
    offline,
    payload_json,
    payload_samples,
    reply,
    run,
    serve,
    split_cases,
)

PAYLOADS = Path(__file__).parent / "payloads" / "kie"
CASES, CALLBACK_CASES, POLL_CASES = split_cases(PAYLOADS)
BASE_URL = "https://api.kie.test"
KEY = "kie-test-key"
HMAC_KEY = "kie-hmac-key"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def make_provider(base_url: str = BASE_URL, hmac_key: str | None = None) -> Kie:
    settings = ProviderSettings(
        name="kie",
        base_url=base_url,
        api_key=Secret(KEY),
        webhook_secret=Secret(hmac_key) if hmac_key else None,
    )
    return Kie(settings, clock=FakeClock(NOW))


def make_task(task_id: str, action: str = "jobs") -> Task:
    return new_task("kie", task_id, action, status=Status.PROCESSING, at=NOW, lifetime=timedelta(0))


def tasks_of(case: dict[str, Any]) -> list[Task]:
    return [make_task(task["task_id"], task["action"]) for task in case["poll"]["tasks"]]


# --- table tests -----------------------------------------------------------------------


@pytest.mark.parametrize("path", CALLBACK_CASES, ids=lambda path: path.stem)
def test_callback_payloads(path: Path) -> None:
    check_callback_case(make_provider(), json.loads(path.read_text()))


@pytest.mark.parametrize("path", POLL_CASES, ids=lambda path: path.stem)
def test_poll_payloads(path: Path) -> None:
    case = json.loads(path.read_text())
    tasks = tasks_of(case)
    flow = make_provider().poll(tasks)
    if "raises" in case:
        check_raised(flow, case)
        return
    requests, results = run(flow, case)
    assert len(requests) == len(tasks)
    if "request" in case:
        spec = case["request"]
        assert requests[0].method == spec["method"]
        assert str(requests[0].url).startswith(BASE_URL)
        assert requests[0].url.path == spec["path"]
        assert dict(requests[0].url.params) == spec["params"]
        assert "authorization" not in requests[0].headers  # the caller's httpx.Auth adds it
    for observation in check_results(results, tasks, case["expect"]):
        assert observation.raw == case["poll"]["body"]


def test_every_payload_file_is_used() -> None:
    assert CASES and set(CASES) == set(CALLBACK_CASES) | set(POLL_CASES)


def test_waiting_with_result_is_not_complete() -> None:
    case = json.loads((PAYLOADS / "jobs_query_waiting_with_result.json").read_text())
    _, results = run(make_provider().poll(tasks_of(case)), case)
    observation = results[0].observation
    assert observation is not None and observation.videos
    assert observation.status is Status.SUBMITTED
    assert observation.effective_status is not None
    assert not observation.effective_status.terminal


def test_callback_and_query_url_locations_differ() -> None:
    """Veo callbacks put URLs at data.info, queries at data.response (PROVIDERS §6.12)."""
    url = "https://tempfile.aiquickdraw.com/v/x.mp4"
    provider = make_provider()
    callback = {"code": 200, "msg": "ok", "data": {"taskId": "t", "info": {"resultUrls": [url]}}}
    assert [video.url for video in provider.parse_callback(callback).videos] == [url]
    query = {
        "code": 200,
        "data": {"taskId": "t", "successFlag": 1, "response": {"resultUrls": [url]}},
    }
    _, results = run(
        provider.poll([make_task("t", "veo")]), {"poll": {"status": 200, "body": query}}
    )
    assert results[0].observation is not None
    assert [video.url for video in results[0].observation.videos] == [url]


@pytest.mark.parametrize(
    ("value", "percent"),
    [("0.00", 0), ("0.5", 50), ("1.00", 100), (0.25, 25), (42, 42), ("42%", 42), ("n/a", None)],
)
def test_progress(value: object, percent: int | None) -> None:
    body = {"code": 200, "data": {"taskId": "t", "successFlag": 0, "progress": value}}
    assert make_provider().parse_callback(body).progress == percent


def test_class_attributes() -> None:
    provider = make_provider()
    assert provider.name == "kie"
    assert provider.default_action == "jobs"
    assert provider.batch_size == 1
    assert repr(provider.auth()) == "BearerAuth('**********')"


def test_several_tasks_are_one_request_each() -> None:
    tasks = [make_task("a", "veo"), make_task("b", "jobs")]
    body = {"code": 200, "data": {"state": "generating"}}
    requests, results = run(make_provider().poll(tasks), {"poll": {"status": 200, "body": body}})
    assert [request.url.path for request in requests] == [
        "/api/v1/veo/record-info",
        "/api/v1/jobs/recordInfo",
    ]
    assert [result.observation.task_id for result in results if result.observation] == ["a", "b"]


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"msg": "taskId is invalid"}, errors.BadPayload),
        (422, {"code": 422, "msg": "validation error"}, errors.BadPayload),
        (404, b"<html>Not Found</html>", errors.NotFound),
    ],
)
def test_an_http_4xx_concerns_only_its_task(status: int, body: object, error: type) -> None:
    """One task's 4xx is that task's result: raised, it would fail the whole exchange (and
    count toward the provider's breaker) and lose the other tasks' results."""
    good = {"code": 200, "data": {"taskId": "b", "state": "generating"}}
    answers = iter([reply(status, body), reply(200, good)])
    results = offline(
        make_provider().poll([make_task("a"), make_task("b")]),
        lambda request: next(answers)(request),
    )
    assert isinstance(results[0].error, error)
    assert results[1].observation is not None and results[1].observation.task_id == "b"


def test_huge_integers_are_ignored_not_raised() -> None:
    """JSON allows integers no float can hold: such a field reads as absent."""
    body = {"code": 200, "data": {"taskId": "t", "state": "generating", "createTime": 10**400}}
    assert make_provider().parse_callback(body).provider_created_at is None
    _, results = run(
        make_provider().poll([make_task("t")]), {"poll": {"status": 200, "body": body}}
    )
    assert results[0].observation is not None


# --- the HMAC signature ----------------------------------------------------------------


def kie_signature(task_id: str, stamp: str, key: str = HMAC_KEY) -> str:
    """Computed here from Kie's documented rule, not with the adapter's own helper."""
    mac = hmac.new(key.encode(), f"{task_id}.{stamp}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


VEO_BODY = json.dumps({"code": 200, "msg": "ok", "data": {"taskId": "veo_1", "info": {}}}).encode()


def delivery(body: bytes = VEO_BODY, /, **headers: str) -> RawDelivery:
    return RawDelivery(headers={k.replace("_", "-"): v for k, v in headers.items()}, body=body)


def signed(body: bytes = VEO_BODY, task_id: str = "veo_1", offset: int = 0) -> RawDelivery:
    stamp = str(int(NOW.timestamp()) + offset)
    return delivery(
        body, x_webhook_timestamp=stamp, x_webhook_signature=kie_signature(task_id, stamp)
    )


def test_signature_good() -> None:
    make_provider(hmac_key=HMAC_KEY).verify(signed())


@pytest.mark.parametrize("offset", [-299, 299])
def test_signature_within_tolerance(offset: int) -> None:
    make_provider(hmac_key=HMAC_KEY).verify(signed(offset=offset))


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": {"task_id": "veo_1"}}',  # Kie's sample verifier reads data.task_id
        b'{"taskId": "veo_1", "state": "success"}',
        b'{"task_id": "veo_1"}',
    ],
)
def test_signature_task_id_locations(body: bytes) -> None:
    make_provider(hmac_key=HMAC_KEY).verify(signed(body))


def test_signature_header_names_are_case_insensitive() -> None:
    stamp = str(int(NOW.timestamp()))
    headers = {"X-Webhook-Timestamp": stamp, "X-Webhook-Signature": kie_signature("veo_1", stamp)}
    make_provider(hmac_key=HMAC_KEY).verify(RawDelivery(headers=headers, body=VEO_BODY))


def test_signature_bad() -> None:
    stamp = str(int(NOW.timestamp()))
    bad = delivery(
        x_webhook_timestamp=stamp, x_webhook_signature=kie_signature("veo_1", stamp, "wrong")
    )
    with pytest.raises(errors.SignatureError, match="bad"):
        make_provider(hmac_key=HMAC_KEY).verify(bad)


def test_signature_for_another_task() -> None:
    with pytest.raises(errors.SignatureError):
        make_provider(hmac_key=HMAC_KEY).verify(signed(task_id="veo_2"))


@pytest.mark.parametrize(
    "headers",
    [{}, {"x_webhook_timestamp": "1767268800"}, {"x_webhook_signature": "c2ln"}],
)
def test_signature_missing(headers: dict[str, str]) -> None:
    with pytest.raises(errors.SignatureError, match="missing"):
        make_provider(hmac_key=HMAC_KEY).verify(delivery(**headers))


@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_signature_stale_or_future(offset: int) -> None:
    with pytest.raises(errors.SignatureError, match="off"):
        make_provider(hmac_key=HMAC_KEY).verify(signed(offset=offset))


def test_signature_timestamp_not_a_number() -> None:
    bad = delivery(x_webhook_timestamp="yesterday", x_webhook_signature="c2ln")
    with pytest.raises(errors.SignatureError, match="integer"):
        make_provider(hmac_key=HMAC_KEY).verify(bad)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"data": {"info": {}}}'])
def test_signature_needs_a_task_id(body: bytes) -> None:
    with pytest.raises(errors.SignatureError, match="taskId"):
        make_provider(hmac_key=HMAC_KEY).verify(signed(body))


def test_signature_covers_only_task_id_and_time() -> None:
    """Documented weakness (PROVIDERS §4.3): another body with the same taskId verifies."""
    other = json.dumps({"code": 500, "msg": "forged", "data": {"taskId": "veo_1"}}).encode()
    make_provider(hmac_key=HMAC_KEY).verify(signed(other))


def test_no_key_no_check() -> None:
    make_provider().verify(delivery(b"anything"))


# --- arbitrary JSON never escapes as anything but a ProviderError ----------------------

KEYS = st.sampled_from(
    [
        "code",
        "msg",
        "message",
        "data",
        "taskId",
        "task_id",
        "successFlag",
        "state",
        "status",
        "response",
        "info",
        "resultUrls",
        "result_urls",
        "resultJson",
        "param",
        "failMsg",
        "failCode",
        "errorMessage",
        "progress",
        "createTime",
        "updateTime",
        "completeTime",
        "result",
        "video_url",
        "videoUrl",
        "video",
        "url",
        "error",
    ]
)
JSON = payload_json(
    KEYS, [200, 404, 501, "success", "waiting", "0.45", "2025-06-06 10:30:00", '{"resultUrls":1}']
)
PAYLOADS_STRATEGY = JSON | near_payloads(payload_samples(CALLBACK_CASES, POLL_CASES), KEYS, JSON)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(PAYLOADS_STRATEGY)
def test_parse_callback_never_crashes(payload: Any) -> None:
    try:
        observation = make_provider().parse_callback(payload)
    except errors.BadPayload:
        return
    assert isinstance(observation, Observation)
    assert observation.task_id


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=PAYLOADS_STRATEGY,
    status=st.sampled_from([200, 200, 200, 400, 401, 404, 429, 500, 502]),
    action=st.sampled_from(["veo", "jobs"]),
)
def test_poll_never_crashes(body: Any, status: int, action: str) -> None:
    task = make_task("task_kling-2.6_1765182425861", action)
    try:
        _, results = run(make_provider().poll([task]), {"poll": {"status": status, "body": body}})
    except errors.ProviderError:
        return
    assert [result.task_id for result in results] == [task.task_id]
    (result,) = results
    assert (result.observation is None) != (result.error is None)
    assert result.error is None or isinstance(result.error, errors.ProviderError)


@settings(max_examples=200)
@given(body=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()), stamp=st.text())
def test_verify_raises_only_signature_errors(body: bytes, stamp: str) -> None:
    headers = {"x-webhook-timestamp": stamp, "x-webhook-signature": "c2ln"}
    with pytest.raises(errors.SignatureError):
        make_provider(hmac_key=HMAC_KEY).verify(RawDelivery(headers=headers, body=body))


# --- against a real HTTP server --------------------------------------------------------


class FakeKie:
    """Kie's two query APIs, each knowing its own tasks; unknown ids get `code 404` under
    HTTP 200. It records every path, query and Authorization header."""

    def __init__(self, veo: dict[str, dict[str, Any]], jobs: dict[str, dict[str, Any]]) -> None:
        self.tasks = {"/api/v1/veo/record-info": veo, "/api/v1/jobs/recordInfo": jobs}
        self.seen: list[tuple[str | None, str, str | None]] = []
        self.app = Starlette(
            routes=[Route(path, self.record_info, methods=["GET"]) for path in self.tasks]
        )

    async def record_info(self, request: Request) -> JSONResponse:
        task_id = request.query_params.get("taskId")
        self.seen.append((request.headers.get("authorization"), request.url.path, task_id))
        data = self.tasks[request.url.path].get(task_id or "")
        if data is None:
            return JSONResponse({"code": 404, "msg": "Task not found", "data": None})
        return JSONResponse({"code": 200, "msg": "success", "data": {"taskId": task_id, **data}})


async def test_poll_over_http() -> None:
    url = "https://tempfile.aiquickdraw.com/v/abc_1765182500.mp4"
    fake = FakeKie(
        veo={"v1": {"successFlag": 1, "response": {"resultUrls": [url]}}},
        jobs={"j1": {"state": "success", "resultJson": json.dumps({"resultUrls": [url]})}},
    )
    async with serve(fake.app) as base_url:
        provider = make_provider(base_url)
        results = []
        for task in (make_task("v1", "veo"), make_task("j1", "jobs"), make_task("v1", "jobs")):
            results += await drive(provider, [task])
    assert fake.seen == [
        (f"Bearer {KEY}", "/api/v1/veo/record-info", "v1"),
        (f"Bearer {KEY}", "/api/v1/jobs/recordInfo", "j1"),
        (f"Bearer {KEY}", "/api/v1/jobs/recordInfo", "v1"),
    ]
    for result in results[:2]:
        assert result.observation is not None
        assert result.observation.status is Status.COMPLETED
        assert [video.url for video in result.observation.videos] == [url]
    # A Veo task asked about on the Market API is unknown there: the action picks the API.
    assert isinstance(results[2].error, errors.NotFound)


async def test_auth_failure_over_http() -> None:
    async def reject(request: Request) -> JSONResponse:
        return JSONResponse({"code": 401, "msg": "You do not have access permissions"})

    app = Starlette(routes=[Route("/api/v1/jobs/recordInfo", reject, methods=["GET"])])
    async with serve(app) as base_url:
        with pytest.raises(errors.AuthRejected, match="access permissions"):
            await drive(make_provider(base_url), [make_task("j1")])

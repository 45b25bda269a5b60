"""The gateway adapter: every rendering of PROVIDERS §5 from payload files, its errors, and
polls against a real loopback server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reconciler.config import ProviderSettings, Secret
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
)
from reconciler.model import Status, Task
from reconciler.providers.gateway import Gateway
from tests.providers.support import (
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

PAYLOADS = Path(__file__).parent / "payloads" / "gateway"
# new-api's 429 message (controller/relay.go), verbatim.
SATURATED = "当前分组上游负载已饱和，请稍后再试"  # noqa: RUF001
NOT_EXIST = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


def settings(base_url: str = "https://relay.test") -> ProviderSettings:
    return ProviderSettings(name="gateway", base_url=base_url, api_key=Secret("sk-relay"))


def make_task(task_id: str, action: str = "text2video") -> Task:
    return new_task("gateway", task_id, action)


@pytest.mark.parametrize("case", payload_files(PAYLOADS))
def test_payload(case: dict[str, Any]) -> None:
    gateway = Gateway(settings())
    observation = observe_case(gateway, case, make_task)
    if observation is None:
        return
    if case["via"] != "callback":
        # Every query rendering parses the same way when it arrives as a callback.
        assert gateway.parse_callback(case["body"]) == observation
    assert as_dict(observation) == case["expected"]
    assert isinstance(observation.raw, dict)


def test_synthetic_full_progress_is_not_success() -> None:
    body = {
        "code": "success",
        "data": {"task_id": "t", "status": "IN_PROGRESS", "progress": "100%"},
    }
    observation = Gateway(settings()).parse_callback(body)
    assert observation.status is Status.PROCESSING
    assert observation.progress == 100


def test_task_dto_raw_is_the_dto() -> None:
    case = json.loads((PAYLOADS / "taskdto_seed001_success.json").read_text(encoding="utf-8"))
    observation = Gateway(settings()).parse_callback(case["body"])
    assert observation.raw is case["body"]["data"]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, {"error": {"message": SATURATED, "type": "new_api_error",
                         "code": "rate_limit"}}, RateLimited),
        (429, b"Too Many Requests", RateLimited),
        (401, {"error": {"message": "invalid token", "type": "new_api_error",
                         "code": "invalid_api_key"}}, AuthRejected),
        (403, {"code": "forbidden", "message": "forbidden", "data": None}, AuthRejected),
        (500, {"error": {"message": "upstream", "type": "new_api_error", "code": ""}}, ServerError),
        (502, b"<html>Bad Gateway</html>", ServerError),
        (200, b"<html>login</html>", ServerError),
        # A Kling-native re-render of an upstream error keeps Kling's meaning.
        (429, {"code": 1102, "message": "Account balance not enough"}, AuthRejected),
    ],
)  # fmt: skip
def test_whole_exchange_errors_raise(status: int, body: object, expected: type) -> None:
    with pytest.raises(ProviderError) as raised:
        offline(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
    assert type(raised.value) is expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, NOT_EXIST, NotFound),
        (404, b"404 page not found", NotFound),
        (200, NOT_EXIST, NotFound),
        (
            400,
            {"error": {"message": "bad", "type": "new_api_error", "code": "invalid"}},
            BadPayload,
        ),
        (200, {"code": "success", "message": "", "data": None}, BadPayload),
        (200, {"code": "success", "data": {"task_id": "t1"}}, BadPayload),
        (200, "just a string", BadPayload),
        # JSON's `null` is an answer we cannot read as a task, not an unreadable page.
        (200, None, BadPayload),
        (200, {"code": 1201, "message": "invalid params"}, BadPayload),
    ],
)
def test_task_level_errors_are_results(status: int, body: object, expected: type) -> None:
    [result] = offline(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
    assert isinstance(result.error, expected)


def test_query_paths() -> None:
    gateway = Gateway(settings())
    assert str(gateway.query_request(make_task("task_1", "image2video")).url) == (
        "https://relay.test/kling/v1/videos/image2video/task_1"
    )
    assert gateway.query_request(make_task("x", "")).url.path == "/kling/v1/videos/text2video/x"


JSON = any_json(
    ["task_id", "status", "progress", "fail_reason", "result_url", "submit_time", "finish_time",
     "data", "code", "message", "url", "format", "metadata", "duration", "error", "task_status",
     "task_status_msg", "task_result", "videos", "id", "outputs", "create_time"],
    ["SUCCESS", "FAILURE", "succeed", "success", "failed", "30%", "task_not_exist", "SUCCEED",
     "https://x/y.mp4", "0"],
)  # fmt: skip


@given(JSON)
def test_any_json_callback_gives_observation_or_bad_payload(payload: object) -> None:
    try:
        observation = Gateway(settings()).parse_callback(payload)
    except BadPayload:
        return
    assert isinstance(observation.task_id, str)
    assert observation.progress is None or 0 <= observation.progress <= 100


@given(JSON, st.sampled_from([200, 400, 404, 429, 500]))
def test_any_json_answer_gives_a_result_or_provider_error(body: object, status: int) -> None:
    try:
        [result] = offline(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
    except ProviderError:
        return
    assert result.task_id == "t1"


# --- against a real server -------------------------------------------------------------------


@dataclass
class FakeRelay:
    base_url: str = ""
    answers: dict[str, Response] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        self.seen.append((request.url.path, request.headers.get("authorization", "")))
        return self.answers.get(request.url.path) or JSONResponse(NOT_EXIST, 400)


@pytest.fixture
async def fake() -> AsyncIterator[FakeRelay]:
    fake = FakeRelay()
    async with serve(catch_all(fake.endpoint)) as fake.base_url:
        yield fake


def payload(name: str) -> Any:
    return json.loads((PAYLOADS / f"{name}.json").read_text(encoding="utf-8"))["body"]


async def test_poll_over_http(fake: FakeRelay) -> None:
    fake.answers["/kling/v1/videos/text2video/842250903629086785"] = JSONResponse(
        payload("taskdto_seed001_success")
    )
    fake.answers["/kling/v1/videos/text2video/task_o1"] = JSONResponse(
        payload("openai_completed_error_code0")
    )
    tasks = [make_task("842250903629086785"), make_task("task_o1"), make_task("ghost")]
    results = await drive(Gateway(settings(fake.base_url)), tasks)
    assert [result.task_id for result in results] == ["842250903629086785", "task_o1", "ghost"]
    assert results[0].observation and results[0].observation.status is Status.COMPLETED
    assert results[1].observation and results[1].observation.error is None
    assert isinstance(results[2].error, NotFound)
    assert {authorization for _, authorization in fake.seen} == {"Bearer sk-relay"}
    assert len(fake.seen) == 3


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (JSONResponse({"error": {"message": SATURATED,
                                 "type": "new_api_error"}}, 429, headers={"Retry-After": "30"}),
         RateLimited),
        (Response("<html>502 Bad Gateway</html>", 502), ServerError),
        (JSONResponse({"error": {"message": "invalid token", "type": "new_api_error"}}, 401),
         AuthRejected),
    ],
)  # fmt: skip
async def test_failures_over_http(fake: FakeRelay, response: Response, expected: type) -> None:
    fake.answers["/kling/v1/videos/text2video/t1"] = response
    with pytest.raises(expected) as raised:
        await drive(Gateway(settings(fake.base_url)), [make_task("t1")])
    if isinstance(raised.value, RateLimited):
        assert raised.value.retry_after == 30.0

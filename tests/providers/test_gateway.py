"""The gateway adapter: every rendering of PROVIDERS §5 from payload files, its errors, and
polls against a real loopback server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.config import ProviderSettings, Secret
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
)
from reconciler.model import Observation, Source, Status, Task, iso
from reconciler.providers.base import PollFlow, PollResult
from reconciler.providers.gateway import Gateway

PAYLOADS = Path(__file__).parent / "payloads" / "gateway"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
# new-api's 429 message (controller/relay.go), verbatim.
SATURATED = "当前分组上游负载已饱和，请稍后再试"  # noqa: RUF001
NOT_EXIST = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


def settings(base_url: str = "https://relay.test") -> ProviderSettings:
    return ProviderSettings(name="gateway", base_url=base_url, api_key=Secret("sk-relay"))


def make_task(task_id: str, action: str = "text2video") -> Task:
    return Task(
        provider="gateway",
        task_id=task_id,
        action=action,
        status=Status.SUBMITTED,
        created_at=EPOCH,
        updated_at=EPOCH,
        deadline_at=EPOCH + timedelta(days=1),
        source=Source.REGISTER,
    )


def as_dict(observation: Observation) -> dict[str, Any]:
    return {
        "task_id": observation.task_id,
        "status": observation.status.value if observation.status else None,
        "provider_status": observation.provider_status,
        "progress": observation.progress,
        "videos": [video.to_json() for video in observation.videos],
        "error": observation.error,
        "provider_created_at": iso(observation.provider_created_at),
        "provider_updated_at": iso(observation.provider_updated_at),
        "external_task_id": observation.external_task_id,
    }


def drive(flow: PollFlow, answer: Callable[[httpx.Request], httpx.Response]) -> list[PollResult]:
    """Run a sans-I/O flow, answering each request without a network."""
    try:
        request = next(flow)
        while True:
            request = flow.send(answer(request))
    except StopIteration as stop:
        results: list[PollResult] = stop.value
        return results


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers, request=request)

    return answer


def payload_files() -> list[Any]:
    return [
        pytest.param(json.loads(path.read_text(encoding="utf-8")), id=path.stem)
        for path in sorted(PAYLOADS.glob("*.json"))
    ]


@pytest.mark.parametrize("case", payload_files())
def test_payload(case: dict[str, Any]) -> None:
    gateway = Gateway(settings())
    if case["via"] == "callback":
        if "error" in case:
            with pytest.raises(BadPayload):
                gateway.parse_callback(case["body"])
            return
        observation = gateway.parse_callback(case["body"])
    else:
        [result] = drive(
            gateway.poll([make_task(case["expected"]["task_id"])]),
            reply(case["status_code"], case["body"]),
        )
        assert result.error is None and result.observation is not None
        observation = result.observation
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
        drive(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
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
        (200, {"code": 1201, "message": "invalid params"}, BadPayload),
    ],
)
def test_task_level_errors_are_results(status: int, body: object, expected: type) -> None:
    [result] = drive(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
    assert isinstance(result.error, expected)


def test_query_paths() -> None:
    gateway = Gateway(settings())
    assert str(gateway.query_request(make_task("task_1", "image2video")).url) == (
        "https://relay.test/kling/v1/videos/image2video/task_1"
    )
    assert gateway.query_request(make_task("x", "")).url.path == "/kling/v1/videos/text2video/x"


KEYS = st.sampled_from(
    ["task_id", "status", "progress", "fail_reason", "result_url", "submit_time", "finish_time",
     "data", "code", "message", "url", "format", "metadata", "duration", "error", "task_status",
     "task_status_msg", "task_result", "videos", "id", "outputs", "create_time"]
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["SUCCESS", "FAILURE", "succeed", "success", "failed", "30%",
                       "task_not_exist", "SUCCEED", "https://x/y.mp4", "0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=4),
                                                                inner, max_size=6),
    max_leaves=30,
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
        [result] = drive(Gateway(settings()).poll([make_task("t1")]), reply(status, body))
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
    app = Starlette(routes=[Route("/{path:path}", fake.endpoint)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    fake.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield fake
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def run(provider: Gateway, tasks: list[Task]) -> list[PollResult]:
    flow = provider.poll(tasks)
    async with httpx.AsyncClient(auth=provider.auth()) as client:
        try:
            request = next(flow)
            while True:
                request = flow.send(await client.send(request))
        except StopIteration as stop:
            results: list[PollResult] = stop.value
            return results


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
    results = await run(Gateway(settings(fake.base_url)), tasks)
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
        await run(Gateway(settings(fake.base_url)), [make_task("t1")])
    if isinstance(raised.value, RateLimited):
        assert raised.value.retry_after == 30.0

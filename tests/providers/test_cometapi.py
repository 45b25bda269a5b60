"""The CometAPI adapter: payload files, its paths, its OpenAI-style errors, and polls against a
real loopback server."""

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
from starlette.responses import JSONResponse, RedirectResponse, Response
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
from reconciler.providers.cometapi import CometAPI

PAYLOADS = Path(__file__).parent / "payloads" / "cometapi"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def settings(base_url: str = "https://comet.test") -> ProviderSettings:
    return ProviderSettings(name="cometapi", base_url=base_url, api_key=Secret("sk-comet"))


def make_task(task_id: str, action: str = "text2video") -> Task:
    return Task(
        provider="cometapi",
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
    comet = CometAPI(settings())
    if case["via"] == "callback":
        if "error" in case:
            with pytest.raises(BadPayload):
                comet.parse_callback(case["body"])
            return
        observation = comet.parse_callback(case["body"])
    else:
        [result] = drive(
            comet.poll([make_task(case["expected"]["task_id"])]),
            reply(case["status_code"], case["body"]),
        )
        assert result.error is None and result.observation is not None
        observation = result.observation
    assert as_dict(observation) == case["expected"]
    assert isinstance(observation.raw, dict) and observation.raw["task_id"] == observation.task_id


@pytest.mark.parametrize(
    ("action", "path"),
    [
        ("text2video", "/kling/v1/videos/text2video/42"),
        ("image2video", "/kling/v1/videos/image2video/42"),
        ("multi-image2video", "/kling/v1/videos/multi-image2video/42"),
        ("video-extend", "/kling/v1/videos/video-extend/42"),
        # The one four-segment path in CometAPI's table.
        ("avatar/image2video", "/kling/v1/videos/avatar/image2video/42"),
        # An action naming its family is used as it is.
        ("images/generations", "/kling/v1/images/generations/42"),
        ("audio/text-to-audio", "/kling/v1/audio/text-to-audio/42"),
    ],
)
def test_query_paths(action: str, path: str) -> None:
    request = CometAPI(settings()).query_request(make_task("42", action))
    assert request.url.path == path
    assert request.url.host == "comet.test"


def comet_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "comet_api_error", "param": "", "code": code}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, comet_error("", "rate limited"), RateLimited),
        (429, b"Too Many Requests", RateLimited),
        (500, comet_error("internal_error", "upstream error"), ServerError),
        (503, comet_error("", "service unavailable"), ServerError),
        (504, b"<html>Gateway Time-out</html>", ServerError),
        (524, b"<html>A timeout occurred</html>", ServerError),
        # Wrong paths answer a redirect or an HTML page, not a JSON 404 (PROVIDERS §3).
        (301, b"<html>Moved Permanently</html>", ServerError),
        (200, b"<!doctype html><title>CometAPI</title>", ServerError),
        (401, comet_error("invalid_api_key", "invalid token"), AuthRejected),
        (401, b"<html>Unauthorized</html>", AuthRejected),
        (403, comet_error("insufficient_user_quota", "quota exhausted"), AuthRejected),
        # A Kling error passed through keeps Kling's meaning.
        (429, {"code": 1303, "message": "parallel task over resource pack limit"}, RateLimited),
        (429, {"code": 1102, "message": "Account balance not enough"}, AuthRejected),
    ],
)
def test_whole_exchange_errors_raise(status: int, body: object, expected: type) -> None:
    with pytest.raises(expected):
        drive(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # HTTP 500 yet permanent: a malformed request (PROVIDERS trap 6).
        (500, comet_error("invalid_request", "invalid request"), BadPayload),
        (400, comet_error("", "model name is required (request id: 2026)"), BadPayload),
        (400, comet_error("task_not_exist", "task_not_exist"), NotFound),
        (404, comet_error("", "not found"), NotFound),
        (200, comet_error("", "odd"), BadPayload),
        (200, {"code": 0, "message": "SUCCEED", "data": None}, BadPayload),
        (200, [1, 2], BadPayload),
    ],
)
def test_task_level_errors_are_results(status: int, body: object, expected: type) -> None:
    [result] = drive(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))
    assert isinstance(result.error, expected)


def test_retry_after() -> None:
    answer = reply(429, comet_error("", "slow"), {"Retry-After": "3"})
    with pytest.raises(RateLimited) as raised:
        drive(CometAPI(settings()).poll([make_task("t1")]), answer)
    assert raised.value.retry_after == 3.0


def test_one_task_per_request() -> None:
    assert CometAPI.batch_size == 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["succeed", "failed", "invalid_request", "0", "5.1", "https://x/y.mp4"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(["task_id", "task_status", "task_status_msg", "task_result", "videos",
                         "url", "duration", "code", "data", "message", "error", "id", "status"])
        | st.text(max_size=4),
        inner,
        max_size=6,
    ),
    max_leaves=30,
)  # fmt: skip


@given(JSON)
def test_any_json_callback_gives_observation_or_bad_payload(payload: object) -> None:
    try:
        CometAPI(settings()).parse_callback(payload)
    except BadPayload:
        pass


@given(JSON, st.sampled_from([200, 301, 400, 404, 429, 500, 524]))
def test_any_json_answer_gives_a_result_or_provider_error(body: object, status: int) -> None:
    try:
        [result] = drive(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))
    except ProviderError:
        return
    assert result.task_id == "t1"


# --- against a real server -------------------------------------------------------------------


@dataclass
class FakeComet:
    base_url: str = ""
    answers: dict[str, Response] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        self.seen.append((request.url.path, request.headers.get("authorization", "")))
        return self.answers.get(request.url.path) or Response("<html>no route</html>", 404)


@pytest.fixture
async def fake() -> AsyncIterator[FakeComet]:
    fake = FakeComet()
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


async def run(provider: CometAPI, tasks: list[Task]) -> list[PollResult]:
    flow = provider.poll(tasks)
    async with httpx.AsyncClient(auth=provider.auth()) as client:
        try:
            request = next(flow)
            while True:
                request = flow.send(await client.send(request))
        except StopIteration as stop:
            results: list[PollResult] = stop.value
            return results


async def test_poll_over_http(fake: FakeComet) -> None:
    fake.answers["/kling/v1/videos/avatar/image2video/878106242831892487"] = JSONResponse(
        json.loads((PAYLOADS / "query_succeed.json").read_text(encoding="utf-8"))["body"]
    )
    [result] = await run(
        CometAPI(settings(fake.base_url)), [make_task("878106242831892487", "avatar/image2video")]
    )
    assert result.observation is not None
    assert result.observation.status is Status.COMPLETED
    assert result.observation.videos[0].duration == 5.1
    assert fake.seen == [
        ("/kling/v1/videos/avatar/image2video/878106242831892487", "Bearer sk-comet")
    ]


async def test_several_tasks_one_request_each(fake: FakeComet) -> None:
    fake.answers["/kling/v1/videos/text2video/a"] = JSONResponse(
        {"code": 0, "message": "SUCCEED", "data": {"task_id": "a", "task_status": "processing"}}
    )
    fake.answers["/kling/v1/videos/text2video/b"] = JSONResponse(
        comet_error("invalid_request", "invalid request"), 500
    )
    results = await run(CometAPI(settings(fake.base_url)), [make_task("a"), make_task("b")])
    assert [result.task_id for result in results] == ["a", "b"]
    assert results[0].observation and results[0].observation.status is Status.PROCESSING
    assert isinstance(results[1].error, BadPayload)
    assert len(fake.seen) == 2


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (RedirectResponse("/docs", 301), ServerError),
        (Response("<html>A timeout occurred</html>", 524), ServerError),
        (JSONResponse(comet_error("", "rate limited"), 429), RateLimited),
        # An HTML 404 is a wrong path, not an unknown task (PROVIDERS §3): retry later.
        (Response("<html>Not Found</html>", 404), ServerError),
    ],
)
async def test_failures_over_http(fake: FakeComet, response: Response, expected: type) -> None:
    fake.answers["/kling/v1/videos/text2video/t1"] = response
    with pytest.raises(expected):
        await run(CometAPI(settings(fake.base_url)), [make_task("t1")])

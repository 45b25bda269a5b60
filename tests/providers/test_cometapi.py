"""The CometAPI adapter: payload files, its paths, its OpenAI-style errors, and polls against a
real loopback server."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

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
from reconciler.providers.cometapi import CometAPI
from tests.providers.support import (
    any_json,
    as_dict,
    catch_all,
    drive,
    near_payloads,
    new_task,
    observe_case,
    offline,
    payload_files,
    reply,
    serve,
)

PAYLOADS = Path(__file__).parent / "payloads" / "cometapi"


def settings(base_url: str = "https://comet.test") -> ProviderSettings:
    return ProviderSettings(name="cometapi", base_url=base_url, api_key=Secret("sk-comet"))


def make_task(task_id: str, action: str = "text2video") -> Task:
    return new_task("cometapi", task_id, action)


@pytest.mark.parametrize("case", payload_files(PAYLOADS))
def test_payload(case: dict[str, Any]) -> None:
    observation = observe_case(CometAPI(settings()), case, make_task)
    if observation is None:
        return
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
        offline(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))


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
    [result] = offline(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))
    assert isinstance(result.error, expected)


def test_retry_after() -> None:
    answer = reply(429, comet_error("", "slow"), {"Retry-After": "3"})
    with pytest.raises(RateLimited) as raised:
        offline(CometAPI(settings()).poll([make_task("t1")]), answer)
    assert raised.value.retry_after == 3.0


def test_one_task_per_request() -> None:
    assert CometAPI.batch_size == 1


KEYS = ["task_id", "task_status", "task_status_msg", "task_result", "videos", "url", "duration",
        "code", "data", "message", "error", "id", "status"]  # fmt: skip
JSON = any_json(KEYS, ["succeed", "failed", "invalid_request", "0", "5.1", "https://x/y.mp4"])
# The payload files' bodies with one field replaced: most of these still read as a task.
NEAR = near_payloads(
    [json.loads(path.read_text())["body"] for path in sorted(PAYLOADS.glob("*.json"))],
    st.sampled_from(KEYS),
    JSON,
)


@given(JSON | NEAR)
def test_any_json_callback_gives_observation_or_bad_payload(payload: object) -> None:
    try:
        observation = CometAPI(settings()).parse_callback(payload)
    except BadPayload:
        return
    assert isinstance(observation.task_id, str) and observation.task_id.strip()
    assert observation.status is None or isinstance(observation.status, Status)
    assert observation.progress is None or 0 <= observation.progress <= 100
    for video in observation.videos:
        assert isinstance(video.url, str) and video.url
        assert video.duration is None or math.isfinite(video.duration)


@given(JSON, st.sampled_from([200, 301, 400, 404, 429, 500, 524]))
def test_any_json_answer_gives_a_result_or_provider_error(body: object, status: int) -> None:
    try:
        [result] = offline(CometAPI(settings()).poll([make_task("t1")]), reply(status, body))
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
    async with serve(catch_all(fake.endpoint)) as fake.base_url:
        yield fake


async def test_poll_over_http(fake: FakeComet) -> None:
    fake.answers["/kling/v1/videos/avatar/image2video/878106242831892487"] = JSONResponse(
        json.loads((PAYLOADS / "query_succeed.json").read_text(encoding="utf-8"))["body"]
    )
    [result] = await drive(
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
    results = await drive(CometAPI(settings(fake.base_url)), [make_task("a"), make_task("b")])
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
        await drive(CometAPI(settings(fake.base_url)), [make_task("t1")])

"""Scaffolding shared by the provider adapter tests: tasks, observations as comparable JSON,
sans-I/O drivers for poll flows, the payload-file case checks, a loopback server, and
hypothesis strategies for arbitrary JSON.

Two payload-file formats are in use. Kling, CometAPI and the gateway write `via` + `body`
+ `expected` (checked with `observe_case` and `as_dict`); AceData and Kie write `callback`
or `poll` + `expect` or `raises` (checked with `check_callback_case`, `check_raised` and
`check_results`, comparing with `summary` and `expected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from reconciler import errors
from reconciler.model import Observation, Source, Status, Task, iso
from reconciler.providers import Provider
from reconciler.providers.base import PollFlow, PollResult

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

Answer = Callable[[httpx.Request], httpx.Response]


def new_task(
    provider: str,
    task_id: str,
    action: str,
    *,
    status: Status = Status.SUBMITTED,
    at: datetime = EPOCH,
    lifetime: timedelta = timedelta(days=1),
    external: str | None = None,
) -> Task:
    """A registered task created (and last updated) `at`, due `lifetime` later."""
    return Task(
        provider=provider,
        task_id=task_id,
        action=action,
        status=status,
        created_at=at,
        updated_at=at,
        deadline_at=at + lifetime,
        source=Source.REGISTER,
        external_task_id=external,
    )


# --- observations as comparable JSON ---------------------------------------------------


def _common(observation: Observation) -> dict[str, Any]:
    return {
        "task_id": observation.task_id,
        "status": observation.status.value if observation.status else None,
        "provider_status": observation.provider_status,
        "progress": observation.progress,
        "videos": [video.to_json() for video in observation.videos],
        "error": observation.error,
        "provider_created_at": iso(observation.provider_created_at),
        "provider_updated_at": iso(observation.provider_updated_at),
    }


def as_dict(observation: Observation) -> dict[str, Any]:
    """The observation as an `expected` of a `via` case (everything but `raw` and `action`)."""
    return _common(observation) | {"external_task_id": observation.external_task_id}


def summary(observation: Observation) -> dict[str, Any]:
    """The observation as comparable JSON (everything but `raw` and `external_task_id`)."""
    return _common(observation) | {"action": observation.action}


def expected(fields: dict[str, Any]) -> dict[str, Any]:
    """An `expect` entry with the fields it leaves out at their defaults, to match `summary`."""
    defaults: dict[str, Any] = {
        "provider_status": None,
        "progress": None,
        "videos": [],
        "error": None,
        "provider_created_at": None,
        "provider_updated_at": None,
        "action": None,
    }
    return defaults | fields


# --- poll flows without I/O --------------------------------------------------------------


def exchange(flow: PollFlow, answer: Answer) -> tuple[list[httpx.Request], list[PollResult]]:
    """Run a sans-I/O flow, answering each request without a network: what it asked, what
    it gave."""
    requests: list[httpx.Request] = []
    try:
        request = next(flow)
        while True:
            requests.append(request)
            request = flow.send(answer(request))
    except StopIteration as stop:
        results: list[PollResult] = stop.value
        return requests, results


def offline(flow: PollFlow, answer: Answer) -> list[PollResult]:
    """Run a sans-I/O flow, answering each request without a network."""
    return exchange(flow, answer)[1]


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> Answer:
    """Answer every request alike: `body` as it is if bytes, else as JSON."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers, request=request)

    return answer


def case_answer(case: dict[str, Any], request: httpx.Request) -> httpx.Response:
    """The answer a `poll` case gives: its `status`, `headers`, and `text` or `body`."""
    poll = case["poll"]
    headers = poll.get("headers", {})
    if "text" in poll:
        return httpx.Response(
            poll["status"], content=poll["text"].encode(), headers=headers, request=request
        )
    return httpx.Response(poll["status"], json=poll["body"], headers=headers, request=request)


def run(flow: PollFlow, case: dict[str, Any]) -> tuple[list[httpx.Request], list[PollResult]]:
    """Drive a flow without I/O, answering every request with the case's answer."""
    return exchange(flow, lambda request: case_answer(case, request))


# --- payload files -----------------------------------------------------------------------


def payload_files(directory: Path) -> list[Any]:
    """Each `via` case in the folder, as a parameter named after its file."""
    return [
        pytest.param(json.loads(path.read_text(encoding="utf-8")), id=path.stem)
        for path in sorted(directory.glob("*.json"))
    ]


def observe_case(
    provider: Provider, case: dict[str, Any], make_task: Callable[[str], Task]
) -> Observation | None:
    """What a `via` case gives: the callback's observation, or that of the one result of a
    poll answered with its `status_code` and `body`. None for a callback case naming an
    `error`, once it has raised BadPayload."""
    if case["via"] == "callback":
        if "error" in case:
            with pytest.raises(errors.BadPayload):
                provider.parse_callback(case["body"])
            return None
        return provider.parse_callback(case["body"])
    [result] = offline(
        provider.poll([make_task(case["expected"]["task_id"])]),
        reply(case["status_code"], case["body"]),
    )
    assert result.error is None
    assert result.observation is not None
    return result.observation


def split_cases(directory: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The folder's case files: all of them, the `callback` ones, the `poll` ones."""
    cases = sorted(directory.glob("*.json"))
    callback_cases = [path for path in cases if "callback" in json.loads(path.read_text())]
    poll_cases = [path for path in cases if "poll" in json.loads(path.read_text())]
    return cases, callback_cases, poll_cases


def check_callback_case(provider: Provider, case: dict[str, Any]) -> None:
    """A `callback` case: it `raises` the named error, or gives the `expect`ed observation
    with the callback as its `raw`."""
    if "raises" in case:
        with pytest.raises(getattr(errors, case["raises"])):
            provider.parse_callback(case["callback"])
        return
    observation = provider.parse_callback(case["callback"])
    assert summary(observation) == expected(case["expect"])
    assert observation.raw == case["callback"]


def check_raised(flow: PollFlow, case: dict[str, Any]) -> None:
    """A `poll` case that `raises`: the named error, with the case's `retry_after` if any."""
    with pytest.raises(getattr(errors, case["raises"])) as raised:
        run(flow, case)
    if "retry_after" in case:
        assert isinstance(raised.value, errors.RateLimited)
        assert raised.value.retry_after == case["retry_after"]


def check_results(
    results: list[PollResult], tasks: Sequence[Task], expect: list[dict[str, Any]]
) -> list[Observation]:
    """One result per task, in task order, each the `expect`ed error or observation; the
    observations are returned for further checks."""
    assert [result.task_id for result in results] == [task.task_id for task in tasks]
    observations: list[Observation] = []
    for result, want in zip(results, expect, strict=True):
        if "error" in want and "status" not in want:
            assert result.observation is None
            assert isinstance(result.error, getattr(errors, want["error"])), result.error
        else:
            assert result.error is None, result.error
            assert result.observation is not None
            assert summary(result.observation) == expected(want)
            observations.append(result.observation)
    return observations


# --- against a real HTTP server ----------------------------------------------------------


def catch_all(endpoint: Callable[[Request], Any]) -> Starlette:
    """An app sending every GET, whatever its path, to `endpoint`."""
    return Starlette(routes=[Route("/{path:path}", endpoint)])


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """uvicorn on a pre-bound 127.0.0.1:0 socket: connectable at once, no readiness wait."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def drive(provider: Provider, tasks: Sequence[Task]) -> list[PollResult]:
    """What the reconciler loop does with a flow: one client with the provider's auth, send
    each request, feed back the answer."""
    async with httpx.AsyncClient(auth=provider.auth(), timeout=10) as client:
        flow = provider.poll(tasks)
        try:
            request = next(flow)
            while True:
                request = flow.send(await client.send(request))
        except StopIteration as stop:
            results: list[PollResult] = stop.value
            return results


# --- arbitrary JSON ------------------------------------------------------------------------


def any_json(keys: Sequence[str], words: Sequence[str]) -> st.SearchStrategy[Any]:
    """Any JSON-like value (NaN and infinities included), its objects keyed by `keys` or
    short text, its scalars sometimes one of `words`."""
    key = st.sampled_from(keys)
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
        | st.sampled_from(words),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(key | st.text(max_size=4), inner, max_size=6),
        max_leaves=30,
    )  # fmt: skip


def payload_json(keys: st.SearchStrategy[str], words: Sequence[object]) -> st.SearchStrategy[Any]:
    """Any JSON value (integers beyond any float included), its objects keyed by `keys` or
    short text, its scalars sometimes one of `words`."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**400), max_value=10**400)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
        | st.sampled_from(words)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(keys | st.text(max_size=6), inner, max_size=5)
        ),
        max_leaves=25,
    )


def payload_samples(callback_cases: list[Path], poll_cases: list[Path]) -> list[Any]:
    """The callbacks and poll answer bodies of the case files."""
    return [json.loads(path.read_text()).get("callback") for path in callback_cases] + [
        json.loads(path.read_text())["poll"].get("body") for path in poll_cases
    ]


@st.composite
def near_payloads(
    draw: st.DrawFn,
    samples: list[Any],
    keys: st.SearchStrategy[str],
    values: st.SearchStrategy[Any],
) -> Any:
    """A real payload with one field replaced by arbitrary JSON (one level down at most)."""
    sample = draw(st.sampled_from([s for s in samples if isinstance(s, dict)]))
    payload = json.loads(json.dumps(sample))
    target = payload
    nested = [key for key, value in payload.items() if isinstance(value, dict)]
    descend: bool = draw(st.booleans())
    if nested and descend:
        target = payload[draw(st.sampled_from(nested))]
    target[draw(keys)] = draw(values)
    return payload

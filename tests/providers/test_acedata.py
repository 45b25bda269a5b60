"""AceData adapter: payload-file table tests, error classification, properties, real HTTP.

Each file in `payloads/acedata/` is one case, derived from seed 004 and PROVIDERS.md §2:
`callback` + `expect` (one observation) or `raises`; or `poll` (the tasks asked about and
the answer to give) + `expect` (one result per task, in task order) or `raises`, and an
optional `request` the flow must have built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reconciler import errors
from reconciler.config import ProviderSettings, Secret
from reconciler.model import Observation, Status, Task
from reconciler.providers.acedata import AceData
from tests.providers.support import (
    check_callback_case,
    check_raised,
    check_results,
    drive,
    near_payloads,
    new_task,
    payload_json,
    payload_samples,
    run,
    serve,
    split_cases,
)

PAYLOADS = Path(__file__).parent / "payloads" / "acedata"
CASES, CALLBACK_CASES, POLL_CASES = split_cases(PAYLOADS)
BASE_URL = "https://api.acedata.test"
TOKEN = "acedata-test-token"


def make_provider(base_url: str = BASE_URL) -> AceData:
    return AceData(ProviderSettings(name="acedata", base_url=base_url, api_key=Secret(TOKEN)))


def make_task(task_id: str, action: str = "text2video") -> Task:
    return new_task("acedata", task_id, action, status=Status.PROCESSING, lifetime=timedelta(0))


def check_request(request: httpx.Request, spec: dict[str, Any]) -> None:
    assert request.method == spec["method"]
    assert request.url.path == spec["path"]
    assert str(request.url).startswith(BASE_URL)
    assert json.loads(request.content) == spec["json"]
    assert "authorization" not in request.headers  # the caller's httpx.Auth adds it


# --- table tests -----------------------------------------------------------------------


@pytest.mark.parametrize("path", CALLBACK_CASES, ids=lambda path: path.stem)
def test_callback_payloads(path: Path) -> None:
    check_callback_case(make_provider(), json.loads(path.read_text()))


@pytest.mark.parametrize("path", POLL_CASES, ids=lambda path: path.stem)
def test_poll_payloads(path: Path) -> None:
    case = json.loads(path.read_text())
    tasks = [make_task(task["task_id"]) for task in case["poll"]["tasks"]]
    flow = make_provider().poll(tasks)
    if "raises" in case:
        check_raised(flow, case)
        return
    requests, results = run(flow, case)
    assert len(requests) == 1
    if "request" in case:
        check_request(requests[0], case["request"])
    check_results(results, tasks, case["expect"])


def test_every_payload_file_is_used() -> None:
    assert CASES and set(CASES) == set(CALLBACK_CASES) | set(POLL_CASES)


def test_raw_is_the_record_for_polls() -> None:
    case = json.loads((PAYLOADS / "batch_out_of_order.json").read_text())
    tasks = [make_task(task["task_id"]) for task in case["poll"]["tasks"]]
    _, results = run(make_provider().poll(tasks), case)
    by_id = {item["id"]: item for item in case["poll"]["body"]["items"]}
    for result in results:
        assert result.observation is not None
        assert result.observation.raw == by_id[result.task_id]


def test_success_without_url_is_not_effectively_complete() -> None:
    observation = make_provider().parse_callback({"success": True, "task_id": "t-1"})
    assert observation.status is Status.COMPLETED
    assert observation.effective_status is Status.PROCESSING


def test_class_attributes() -> None:
    provider = make_provider()
    assert provider.name == "acedata"
    assert provider.batch_size > 1
    assert provider.batch_key(make_task("a", "text2video")) == provider.batch_key(
        make_task("b", "image2video")
    )
    assert repr(provider.auth()) == "BearerAuth('**********')"


def test_batch_is_chunked_without_io() -> None:
    provider = make_provider()
    tasks = [make_task(f"id-{n}") for n in range(provider.batch_size * 2 + 1)]
    case = {"poll": {"status": 200, "body": {"items": [], "count": 0}}}
    requests, results = run(provider.poll(tasks), case)
    sizes = [len(json.loads(request.content).get("ids", [None])) for request in requests]
    assert sizes == [provider.batch_size, provider.batch_size, 1]
    assert json.loads(requests[-1].content) == {"action": "retrieve", "id": tasks[-1].task_id}
    assert [result.task_id for result in results] == [task.task_id for task in tasks]


def test_huge_integers_are_ignored_not_raised() -> None:
    """JSON allows integers no float can hold: such a field reads as absent, never as an
    OverflowError."""
    huge = 10**400
    observation = make_provider().parse_callback(
        {"task_id": "a", "success": True, "video_url": "u", "duration": huge}
    )
    assert observation.videos[0].duration is None
    items = [{"id": "a", "created_at": huge}, {"id": "b", "response": {"state": "processing"}}]
    case = {"poll": {"status": 200, "body": {"items": items, "count": 2}}}
    _, results = run(make_provider().poll([make_task("a"), make_task("b")]), case)
    assert results[0].observation is not None
    assert results[0].observation.provider_created_at is None
    assert results[1].observation is not None
    assert results[1].observation.status is Status.PROCESSING
    case = {"poll": {"status": 429, "body": {"error": {"code": huge, "message": huge}}}}
    with pytest.raises(errors.RateLimited):
        run(make_provider().poll([make_task("a")]), case)


# --- arbitrary JSON never escapes as anything but a ProviderError ----------------------

KEYS = st.sampled_from(
    [
        "id",
        "task_id",
        "success",
        "state",
        "response",
        "request",
        "video_url",
        "video_id",
        "duration",
        "error",
        "message",
        "code",
        "items",
        "count",
        "created_at",
        "finished_at",
        "started_at",
        "action",
    ]
)
JSON = payload_json(KEYS, ["succeed", "failed", "processing", "submitted", "5.1", "1740969535.333"])
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
    status=st.sampled_from([200, 200, 200, 400, 401, 403, 404, 429, 500, 504]),
    count=st.integers(min_value=1, max_value=3),
)
def test_poll_never_crashes(body: Any, status: int, count: int) -> None:
    tasks = [make_task(task_id) for task_id in ("20068983-0cc9-4c6a-aeb6-9c6a3c668be0", "b", "c")]
    case = {"poll": {"status": status, "body": body}}
    try:
        _, results = run(make_provider().poll(tasks[:count]), case)
    except errors.ProviderError:
        return
    assert [result.task_id for result in results] == [task.task_id for task in tasks[:count]]
    for result in results:
        assert (result.observation is None) != (result.error is None)
        assert result.error is None or isinstance(result.error, errors.ProviderError)


# --- against a real HTTP server --------------------------------------------------------


class FakeAceData:
    """AceData's tasks API as documented: unknown ids are `{}` or left out, batch items
    come back in reverse order. It records every request body and Authorization header."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.records = {record["id"]: record for record in records}
        self.seen: list[tuple[str | None, dict[str, Any]]] = []
        self.app = Starlette(routes=[Route("/kling/tasks", self.tasks, methods=["POST"])])

    async def tasks(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.seen.append((request.headers.get("authorization"), body))
        if body.get("action") == "retrieve":
            return JSONResponse(self.records.get(body.get("id"), {}))
        if body.get("action") == "retrieve_batch":
            items = [self.records[i] for i in reversed(body.get("ids", [])) if i in self.records]
            return JSONResponse({"items": items, "count": len(items)})
        return JSONResponse({"success": False, "error": {"code": "bad_request"}}, 400)


def record(task_id: str, state: str = "succeed") -> dict[str, Any]:
    return {
        "id": task_id,
        "job_id": "Cj" + task_id,
        "created_at": 1740969535.333,
        "request": {"action": "text2video"},
        "response": {
            "success": True,
            "video_url": f"https://cdn.example/{task_id}.mp4",
            "duration": "5.1",
            "state": state,
            "task_id": task_id,
        },
    }


async def test_batch_poll_over_http() -> None:
    fake = FakeAceData([record("a"), record("b"), record("c")])
    async with serve(fake.app) as base_url:
        results = await drive(make_provider(base_url), [make_task(i) for i in "abcx"])
    assert fake.seen == [(f"Bearer {TOKEN}", {"action": "retrieve_batch", "ids": list("abcx")})]
    assert [result.task_id for result in results] == list("abcx")
    for result in results[:3]:
        assert result.observation is not None
        assert result.observation.status is Status.COMPLETED
        assert result.observation.videos[0].url == f"https://cdn.example/{result.task_id}.mp4"
    assert isinstance(results[3].error, errors.NotFound)


async def test_batch_poll_is_chunked_over_http() -> None:
    ids = [f"task-{n:03d}" for n in range(120)]
    fake = FakeAceData([record(task_id) for task_id in ids[::2]])
    async with serve(fake.app) as base_url:
        results = await drive(make_provider(base_url), [make_task(i) for i in ids])
    assert [len(body["ids"]) for _, body in fake.seen] == [50, 50, 20]
    assert [task_id for _, body in fake.seen for task_id in body["ids"]] == ids
    assert [result.task_id for result in results] == ids
    found = [result.task_id for result in results if result.observation is not None]
    missing = [result.task_id for result in results if isinstance(result.error, errors.NotFound)]
    assert found == ids[::2] and missing == ids[1::2]


async def test_single_poll_over_http() -> None:
    fake = FakeAceData([record("a", state="processing") | {"response": {"task_id": "a"}}])
    async with serve(fake.app) as base_url:
        provider = make_provider(base_url)
        known = await drive(provider, [make_task("a")])
        unknown = await drive(provider, [make_task("zzz")])
    assert [body for _, body in fake.seen] == [
        {"action": "retrieve", "id": "a"},
        {"action": "retrieve", "id": "zzz"},
    ]
    assert known[0].observation is not None
    assert known[0].observation.status is Status.PROCESSING
    assert isinstance(unknown[0].error, errors.NotFound)


async def test_error_envelope_over_http() -> None:
    async def reject(request: Request) -> JSONResponse:
        body = {"error": {"code": "used_up", "message": "balance used up"}, "trace_id": "t"}
        return JSONResponse(body, 403)

    app = Starlette(routes=[Route("/kling/tasks", reject, methods=["POST"])])
    async with serve(app) as base_url:
        with pytest.raises(errors.AuthRejected, match="used_up"):
            await drive(make_provider(base_url), [make_task("a"), make_task("b")])

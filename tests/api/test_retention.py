"""SPEC §2: a reader whose cursor fell off the log gets 410 `cursor_expired` with the oldest
kept seq, on GET /events and on SSE resume (before a stream starts), never a silent jump;
`after=0` reads from the oldest kept event. `reconciler tail` says so in one line. Retention
shows in /metrics.

Events are written on a `FakeClock`; the clock then moves past the retention and
`Retention` prunes, as the running service does every minute."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx

from reconciler.api.stream import HELLO, Streams, frames
from reconciler.clock import FakeClock
from reconciler.retention import Retention
from tests.api.live import SSEReader
from tests.api.test_openapi import Conformance
from tests.conftest import Served, StartService

DAY = 86400.0


async def pruned_log(start_service: StartService) -> tuple[Served, FakeClock]:
    """Seven events; the first five older than the events' 30 days and pruned."""
    clock = FakeClock()
    served = await start_service(clock=clock)
    for n in range(5):
        await served.runtime.service.register("kling", f"t{n}")
    clock.advance(31 * DAY)
    for n in range(5, 7):
        await served.runtime.service.register("kling", f"t{n}")
    await prune(served)
    return served, clock


async def prune(served: Served) -> None:
    retention = Retention(served.runtime.service, pause_seconds=0)
    await retention.prune_once()
    await retention.refresh()


async def seqs(client: httpx.AsyncClient, **params: Any) -> list[int]:
    response = await client.get("/events", params=params)
    assert response.status_code == 200, response.text
    return [event["seq"] for event in response.json()["events"]]


def expired(response: httpx.Response, oldest: int) -> None:
    assert response.status_code == 410, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "cursor_expired"
    assert error["oldest_seq"] == oldest
    assert f"oldest kept event is seq {oldest}" in error["message"]


async def test_a_cursor_that_fell_off_the_log_gets_410(start_service: StartService) -> None:
    served, _ = await pruned_log(start_service)
    client = served.client
    assert await seqs(client) == [6, 7]  # after=0: from the oldest kept event
    assert await seqs(client, after=0) == [6, 7]
    assert await seqs(client, after=5) == [6, 7]  # the oldest kept minus one: nothing lost
    assert await seqs(client, after=6) == [7]
    assert await seqs(client, after=7, wait=0) == []
    conformance = Conformance()
    for params in (
        {"after": 4},
        {"after": 1, "limit": 1},
        {"after": 4, "task_id": "t6"},  # a filter changes nothing: events were lost to it
        {"after": 4, "provider": "kie", "wait": 30},  # answered at once, not after the wait
    ):
        async with asyncio.timeout(10):
            response = await client.get("/events", params=params)
        expired(response, 6)
        conformance.check(response, "/events", "get")


async def test_sse_resume_below_the_log_gets_410_before_a_stream(
    start_service: StartService,
) -> None:
    served, _ = await pruned_log(start_service)
    client = served.client
    conformance = Conformance()
    for params, headers in (
        ({"after": 4}, {}),
        ({}, {"Last-Event-ID": "4"}),
        ({"after": 6}, {"Last-Event-ID": "3"}),  # the header wins, as for any resume
    ):
        response = await client.get("/events/stream", params=params, headers=headers)
        expired(response, 6)
        conformance.check(response, "/events/stream", "get")
    for params, headers in (({"after": 0}, {}), ({}, {"Last-Event-ID": "5"})):
        async with client.stream("GET", "/events/stream", params=params, headers=headers) as stream:
            assert stream.status_code == 200
            assert [frame.id for frame in await SSEReader(stream).events(2)] == [6, 7]


async def test_with_every_event_pruned_the_next_seq_is_the_oldest(
    start_service: StartService,
) -> None:
    served, clock = await pruned_log(start_service)
    clock.advance(31 * DAY)
    await prune(served)
    client = served.client
    assert await seqs(client) == []
    assert await seqs(client, after=7) == []  # read up to the head: nothing was lost
    expired(await client.get("/events", params={"after": 6}), 8)
    expired(await client.get("/events/stream", headers={"Last-Event-ID": "6"}), 8)
    await served.runtime.service.register("kling", "t7")
    assert await seqs(client, after=7) == [8]


async def test_a_stream_that_falls_off_the_log_ends(start_service: StartService) -> None:
    """Pruned past an open stream's cursor, the stream ends instead of jumping; the client's
    reconnection then gets the 410."""
    served, clock = await pruned_log(start_service)
    service = served.runtime.service
    stream = frames(service, 5, None, None, Streams(page=1))
    assert await anext(stream) == HELLO
    assert b"id: 6\n" in await anext(stream)
    clock.advance(31 * DAY)
    await service.register("kling", "t7")  # seq 8, young
    clock.advance(1)
    await prune(served)  # 6 and 7 go; the stream is at 6
    async with asyncio.timeout(10):
        rest = [chunk async for chunk in stream]
    assert rest == []
    expired(await served.client.get("/events/stream", headers={"Last-Event-ID": "6"}), 8)


async def test_tail_says_it_in_one_line(start_service: StartService) -> None:
    served, _ = await pruned_log(start_service)
    for follow in ([], ["--follow"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reconciler",
            "tail",
            "--url",
            served.url,
            "--after",
            "3",
            *follow,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode == 1
        assert out == b""
        assert err.decode().splitlines() == [
            "reconciler: events after seq 3 were pruned (the oldest kept is seq 6); "
            "start again with --after 5 or --after 0"
        ]


async def test_metrics_show_retention(start_service: StartService) -> None:
    served, _ = await pruned_log(start_service)
    text = (await served.client.get("/metrics")).text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    assert lines['reconciler_pruned_rows_total{kind="events"}'] == 5
    assert lines['reconciler_pruned_rows_total{kind="deliveries"}'] == 0
    assert lines['reconciler_pruned_rows_total{kind="tasks"}'] == 0
    assert lines["reconciler_oldest_seq"] == 6
    assert lines["reconciler_database_bytes"] > 0

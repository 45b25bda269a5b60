"""Retention (SPEC §5) on every backend: what a prune removes and what it never removes,
numbering that never falls back, the oldest kept seq, the write probe; and on SQLite, a
database file that stops growing under a steady load with retention on.

Data is written the way the service writes it (webhooks, registrations) on a `FakeClock`,
then the clock moves past the retention and `Retention` prunes."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.clock import FakeClock
from reconciler.config import Settings
from reconciler.model import Pruned, RowKind, TaskRef
from reconciler.retention import Retention
from reconciler.runtime import open_runtime
from reconciler.service import Service
from reconciler.store.batch import deliveries_to_prune, events_to_prune
from reconciler.store.transfer import copy

DAY = 86400.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)
OpenService = Callable[..., AbstractAsyncContextManager[Service]]


def kling(task_id: str, status: str = "succeed") -> bytes:
    body: dict[str, object] = {"task_id": task_id, "task_status": status, "task_result": {}}
    if status == "succeed":
        body["task_result"] = {"videos": [{"url": f"https://cdn.example/{task_id}.mp4"}]}
    return json.dumps(body).encode()


# --- the rules, pure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "limit", "expected"),
    [
        ([], 10, Pruned(0, False, 0)),
        ([(1, 1.0), (2, 2.0), (3, 3.0)], 10, Pruned(3, False, 3)),  # all old, all read: done
        ([(1, 1.0), (2, 2.0), (3, 3.0)], 3, Pruned(3, True, 3)),  # all old, a full batch: more
        ([(4, 1.0), (5, 9.0), (6, 2.0)], 10, Pruned(1, False, 4)),  # a prefix only, never 6
        ([(7, 9.0), (8, 1.0)], 10, Pruned(0, False, 0)),  # the oldest is young: nothing
        ([(1, 5.0)], 10, Pruned(0, False, 0)),  # exactly at the cutoff: kept
    ],
)
def test_events_go_as_a_prefix_of_the_log(
    head: list[tuple[int, float]], limit: int, expected: Pruned
) -> None:
    assert events_to_prune(head, 5.0, limit) == expected


@pytest.mark.parametrize(
    ("scanned", "limit", "doomed", "expected"),
    [
        ([], 10, [], Pruned(0, False, 7)),
        ([(8, 1.0, True), (9, 1.0, False), (10, 2.0, True)], 3, [8, 10], Pruned(2, True, 10)),
        ([(8, 1.0, True), (9, 1.0, True)], 3, [8, 9], Pruned(2, False, 9)),  # short: the end
        # A young one ends the pass; the old ones of its batch still go.
        ([(8, 1.0, True), (9, 6.0, True), (10, 2.0, True)], 3, [8, 10], Pruned(2, False, 10)),
        ([(8, 1.0, False), (9, 1.0, False)], 2, [], Pruned(0, True, 9)),  # open tasks: on
    ],
)
def test_deliveries_go_when_old_and_settled(
    scanned: list[tuple[int, float, bool]], limit: int, doomed: list[int], expected: Pruned
) -> None:
    assert deliveries_to_prune(scanned, 5.0, limit, 7) == (doomed, expected)


# --- on every backend -----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db.sqlite"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def open_service(database_url: str, clock: FakeClock) -> OpenService:
    @asynccontextmanager
    async def opened(env: Mapping[str, str] | None = None) -> AsyncIterator[Service]:
        environ = {"RECONCILER_DATABASE_URL": database_url, **(env or {})}
        async with open_runtime(Settings.from_environ(environ), clock) as runtime:
            yield runtime.service

    return opened


async def stored(service: Service) -> tuple[list[int], list[tuple[int, str | None]], list[str]]:
    """Event seqs, deliveries (id, task id) and task ids, as stored."""
    events = [row.seq for row in await service.store.events_after(0, 1000)]
    deliveries = [(d.id, d.task_id) for d in await service.store.deliveries()]
    tasks = sorted(t.task_id for t in await service.store.list_tasks(limit=1000))
    return events, deliveries, tasks


async def test_what_goes_and_what_never_does(open_service: OpenService, clock: FakeClock) -> None:
    async with open_service() as service:
        retention = Retention(service, pause_seconds=0)
        done = await service.ingest("kling", {}, kling("done"))  # terminal: event 1
        running = await service.ingest("kling", {}, kling("running", "processing"))  # event 2
        unread = await service.ingest("kling", {}, b"not json")  # names no task
        await service.register("kling", "registered")  # event 3, never terminal here
        clock.advance(10 * DAY)
        later = await service.ingest("kling", {}, kling("later"))  # event 4
        assert await stored(service) == (
            [1, 2, 3, 4],
            [
                (done.delivery_id, "done"),
                (running.delivery_id, "running"),
                (unread.delivery_id, None),
                (later.delivery_id, "later"),
            ],
            ["done", "later", "registered", "running"],
        )

        clock.advance(21 * DAY)  # day 31: past the events' and deliveries' 30 days
        assert await retention.prunable() == {"events": 3, "deliveries": 2, "tasks": 0}
        assert await retention.prune_once() == {"events": 3, "deliveries": 2, "tasks": 0}
        assert await stored(service) == (
            [4],
            [(running.delivery_id, "running"), (later.delivery_id, "later")],
            ["done", "later", "registered", "running"],
        )
        assert await service.oldest_seq() == 4

        clock.advance(60 * DAY)  # day 91: "done" is 91 days old, "later" 81
        assert await retention.prune_once() == {"events": 1, "deliveries": 1, "tasks": 1}
        # The open tasks and their delivery stay, however old.
        assert await stored(service) == (
            [],
            [(running.delivery_id, "running")],
            ["later", "registered", "running"],
        )
        assert await retention.prunable() == dict.fromkeys(RowKind, 0)
        assert await retention.prune_once() == dict.fromkeys(RowKind, 0)


async def test_numbering_continues_after_everything_was_pruned(
    open_service: OpenService, clock: FakeClock
) -> None:
    async with open_service() as service:
        assert await service.oldest_seq() == 1  # an empty log starts at 1
        first = await service.ingest("kling", {}, kling("a"))
        await service.ingest("kling", {}, kling("b"))
        assert await service.oldest_seq() == 1
        clock.advance(91 * DAY)
        assert await Retention(service, pause_seconds=0).prune_once() == dict.fromkeys(RowKind, 2)
        assert await stored(service) == ([], [], [])
        # Every event is gone: the oldest kept seq is the one the next event gets.
        assert await service.oldest_seq() == 3
        assert await service.last_seq() == 2
    async with open_service() as service:  # and after a restart
        assert await service.oldest_seq() == 3
        again = await service.ingest("kling", {}, kling("c"))
        assert again.delivery_id == first.delivery_id + 2
        assert [row.seq for row in await service.store.events_after(0, 10)] == [3]
        assert await service.oldest_seq() == 3


async def test_a_delivery_goes_once_its_task_is_gone(
    open_service: OpenService, clock: FakeClock
) -> None:
    env = {"RECONCILER_RETAIN_TASKS": "1d", "RECONCILER_RETAIN_DELIVERIES": "10d"}
    async with open_service(env) as service:
        await service.ingest("kling", {}, kling("gone", "failed"))
        clock.advance(2 * DAY)
        assert await service.prune(RowKind.TASKS, 100) == Pruned(1, False, 0)
        assert await service.prune(RowKind.DELIVERIES, 100) == Pruned(0, False, 1)
        clock.advance(9 * DAY)
        assert await service.prune(RowKind.DELIVERIES, 100) == Pruned(1, False, 1)


async def test_zero_keeps_forever(open_service: OpenService, clock: FakeClock) -> None:
    env = {f"RECONCILER_RETAIN_{kind.upper()}": "0" for kind in RowKind}
    async with open_service(env) as service:
        await service.ingest("kling", {}, kling("kept"))
        clock.advance(36500 * DAY)
        retention = Retention(service, pause_seconds=0)
        assert await retention.prunable() == dict.fromkeys(RowKind, 0)
        assert await retention.prune_once() == dict.fromkeys(RowKind, 0)
        assert await stored(service) == ([1], [(1, "kept")], ["kept"])


async def test_batches_are_small_and_paced_on_the_clock(
    open_service: OpenService, clock: FakeClock
) -> None:
    async with open_service() as service:
        for n in range(5):
            await service.register("kling", f"t{n}")
        clock.advance(31 * DAY)
        retention = Retention(service, batch_rows=2, pause_seconds=10)
        pruning = asyncio.create_task(retention.prune_once())
        async with asyncio.timeout(10):
            await retention.wait_until(lambda r: r.batches >= 1)
            # The first batch is committed; the next waits for the clock.
            assert [row.seq for row in await service.store.events_after(0, 10)] == [3, 4, 5]
            assert not pruning.done()
            # The kinds take turns: deliveries (none), tasks (open ones only: none go), events.
            for batches in (2, 3, 4):
                clock.advance(10)
                await retention.wait_until(lambda r, n=batches: r.batches >= n)
            assert [row.seq for row in await service.store.events_after(0, 10)] == [5]
            clock.advance(10)
            removed = await pruning
        assert removed == {"events": 5, "deliveries": 0, "tasks": 0}
        assert retention.batches == 5


async def test_run_prunes_every_interval_and_refreshes_the_gauges(
    open_service: OpenService, clock: FakeClock
) -> None:
    async with open_service() as service:
        await service.register("kling", "old")
        clock.advance(31 * DAY)
        await service.register("kling", "new")
        retention = Retention(service, pause_seconds=0, interval_seconds=3600)
        running = asyncio.create_task(retention.run())
        try:
            async with asyncio.timeout(10):
                await retention.wait_until(lambda r: r.passes >= 1)  # the first at once
                assert [row.seq for row in await service.store.events_after(0, 10)] == [2]
                sample = service.metrics.registry.get_sample_value
                assert sample("reconciler_oldest_seq") == 2
                assert (sample("reconciler_database_bytes") or 0) > 0
                assert sample("reconciler_pruned_rows_total", {"kind": "events"}) == 1

                clock.advance(31 * DAY)
                await retention.wait_until(lambda r: r.passes >= 2)
                assert await service.store.events_after(0, 10) == []
                assert sample("reconciler_oldest_seq") == 3
                assert sample("reconciler_pruned_rows_total", {"kind": "events"}) == 2
        finally:
            retention.stop()
            async with asyncio.timeout(10):
                await running


async def test_oldest_seq_and_size(open_service: OpenService, clock: FakeClock) -> None:
    async with open_service() as service:
        empty = await service.database_bytes()
        assert empty > 0
        for n in range(50):
            await service.ingest("kling", {}, kling(f"s{n}"))
        assert await service.database_bytes() >= empty
        assert await service.oldest_seq() == 1


async def test_the_probe_commits_and_nothing_failed(open_service: OpenService) -> None:
    async with open_service() as service:
        assert service.store.write_failure() is None
        await service.store.probe()
        await service.store.probe()  # again: the probe needs no state of its own
        assert service.store.write_failure() is None


async def test_registered_tasks_are_never_pruned_however_old(
    open_service: OpenService, clock: FakeClock
) -> None:
    async with open_service() as service:
        await service.register("kling", "waiting", deadline_seconds=3650 * DAY)
        await service.ingest("kling", {}, kling("waiting", "processing"))
        clock.advance(3000 * DAY)
        removed = await Retention(service, pause_seconds=0).prune_once()
        assert removed == {"events": 2, "deliveries": 0, "tasks": 0}
        task = await service.store.get_task(TaskRef("kling", "waiting"))
        assert task is not None and not task.terminal
        assert len(await service.store.deliveries()) == 1


# --- PostgreSQL: several replicas ---------------------------------------------------------------


async def test_replicas_pruning_at_once_remove_each_row_once(
    postgres_url: str, clock: FakeClock
) -> None:
    settings = Settings.from_environ({"RECONCILER_DATABASE_URL": postgres_url})
    async with open_runtime(settings, clock) as one, open_runtime(settings, clock) as two:
        for n in range(40):
            await one.service.ingest("kling", {}, kling(f"r{n}"))
        clock.advance(91 * DAY)
        first, second = (
            Retention(runtime.service, batch_rows=3, pause_seconds=0) for runtime in (one, two)
        )
        removed = await asyncio.gather(first.prune_once(), second.prune_once())
        total = {kind: removed[0][kind] + removed[1][kind] for kind in RowKind}
        assert total == dict.fromkeys(RowKind, 40)
        assert await stored(one.service) == ([], [], [])


async def test_a_copy_of_a_pruned_sqlite_database_numbers_on(
    tmp_path: Path, postgres_url: str, clock: FakeClock
) -> None:
    """Retention pruned the SQLite log to nothing: the PostgreSQL copy goes on after the
    seqs and ids SQLite gave, not from 1 again, so readers' cursors stay valid."""
    path = tmp_path / "pruned.sqlite"
    sqlite = Settings.from_environ({"RECONCILER_DATABASE_URL": f"sqlite:///{path}"})
    async with open_runtime(sqlite, clock) as runtime:
        for n in range(3):
            await runtime.service.ingest("kling", {}, kling(f"c{n}"))
        clock.advance(91 * DAY)
        await Retention(runtime.service, pause_seconds=0).prune_once()
        assert await stored(runtime.service) == ([], [], [])
    copied = await copy(path, postgres_url)
    assert (copied.events, copied.last_seq) == (0, 3)
    target = Settings.from_environ({"RECONCILER_DATABASE_URL": postgres_url})
    async with open_runtime(target, clock) as runtime:
        assert await runtime.service.oldest_seq() == 4
        result = await runtime.service.ingest("kling", {}, kling("after"))
        assert result.delivery_id == 4
        assert [row.seq for row in await runtime.store.events_after(0, 10)] == [4]


# --- SQLite: the file stops growing ---------------------------------------------------------


async def test_the_sqlite_file_stops_growing_under_a_steady_load(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A day's load every day, each day's rows pruned after two: once retention has
    started to prune, new rows reuse the pages old ones freed, and the file's size stays
    where it was. The same load with retention off keeps growing the file."""

    async def sizes(retain: str) -> list[int]:
        path = tmp_path / f"{retain}.sqlite"
        environ = {"RECONCILER_DATABASE_URL": f"sqlite:///{path}"}
        environ |= {f"RECONCILER_RETAIN_{kind.upper()}": retain for kind in RowKind}
        measured = []
        async with open_runtime(Settings.from_environ(environ), clock) as runtime:
            service, store = runtime.service, runtime.store
            store.checkpoint_every = 1  # type: ignore[attr-defined]  # SQLite: the file holds it all
            retention = Retention(service, pause_seconds=0)
            for day in range(12):
                await asyncio.gather(
                    *(
                        service.ingest("kling", {}, kling(f"{retain}-{day}-{n}", status))
                        for n in range(150)
                        for status in ("processing", "succeed")
                    )
                )
                await retention.prune_once()
                await store.probe()  # one more commit: the checkpoint after the prune
                measured.append(os.stat(path).st_size)
                clock.advance(DAY)
        return measured

    kept = await sizes("2d")
    assert kept[-1] == kept[6]  # steady: the last six days added no byte
    assert max(kept) == kept[-1]
    forever = await sizes("0")
    assert forever[-1] > forever[6] > forever[3]
    assert forever[-1] > 2 * kept[-1]

"""The writer's lanes: batches run side by side when a backlog waits, light loads commit in
groups on one lane, and close() drains and stops every lane."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from reconciler.model import TaskRef
from reconciler.store.base import Applying
from reconciler.store.batch import Apply, Op, Probe, Writer, settle

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def test_lanes_run_batches_at_once_and_all_stop_on_close() -> None:
    running: set[int] = set()
    together = asyncio.Event()
    release = asyncio.Event()
    seen: list[int] = []

    async def run(ops: list[Op], lane: int) -> None:
        running.add(lane)
        if len(running) == 3:
            together.set()
        await release.wait()
        seen.extend(lane for _ in ops)
        settle(ops, [None] * len(ops))

    writer = Writer(run, max_batch=1, lanes=3, spill=1)
    writer.start("test-writer")
    submitted = [asyncio.create_task(writer.submit(Probe(NOW))) for _ in range(7)]
    async with asyncio.timeout(5):
        await together.wait()  # three batches in flight on three lanes
    release.set()
    async with asyncio.timeout(5):
        await writer.close()  # every lane takes one stop mark: none waits forever
        await asyncio.gather(*submitted)
    assert len(seen) == 7
    assert set(seen) == {0, 1, 2}


async def test_close_drains_what_is_queued_with_one_lane() -> None:
    batches: list[int] = []

    async def run(ops: list[Op], lane: int) -> None:
        batches.append(len(ops))
        settle(ops, [lane] * len(ops))

    writer = Writer(run, max_batch=4, lanes=1)
    writer.start("test-writer")
    submitted = [asyncio.create_task(writer.submit(Probe(NOW))) for _ in range(10)]
    await asyncio.sleep(0)  # let every submit queue its operation
    async with asyncio.timeout(5):
        await writer.close()
        assert await asyncio.gather(*submitted) == [0] * 10
    assert batches == [4, 4, 2]


async def test_a_further_lane_starts_only_when_a_backlog_waits() -> None:
    batches: list[tuple[int, int]] = []
    started = {0: asyncio.Event(), 1: asyncio.Event()}
    release = asyncio.Event()

    async def run(ops: list[Op], lane: int) -> None:
        batches.append((lane, len(ops)))
        started[lane].set()
        await release.wait()
        settle(ops, [None] * len(ops))

    writer = Writer(run, lanes=2, spill=3)
    writer.start("test-writer")
    submitted = [asyncio.create_task(writer.submit(Probe(NOW)))]
    async with asyncio.timeout(5):
        await started[0].wait()  # the first lane commits the first operation alone
    submitted += [asyncio.create_task(writer.submit(Probe(NOW))) for _ in range(2)]
    for _ in range(10):  # turns of the event loop, not time: two waiting start nothing
        await asyncio.sleep(0)
    assert batches == [(0, 1)]
    submitted.append(asyncio.create_task(writer.submit(Probe(NOW))))
    async with asyncio.timeout(5):
        await started[1].wait()  # three waiting: the second lane takes them as one batch
    assert batches == [(0, 1), (1, 3)]
    release.set()
    async with asyncio.timeout(5):
        await writer.close()
        await asyncio.gather(*submitted)


async def test_a_poll_exchange_waiting_weighs_its_tasks() -> None:
    """The results of one exchange of fifty tasks are a backlog by themselves: a further
    lane takes them rather than waiting for the first lane's batch."""
    started = {0: asyncio.Event(), 1: asyncio.Event()}
    release = asyncio.Event()
    batches: list[tuple[int, list[str]]] = []

    async def run(ops: list[Op], lane: int) -> None:
        batches.append((lane, [type(op).__name__ for op in ops]))
        started[lane].set()
        await release.wait()
        settle(ops, [None] * len(ops))

    def decide(*_: object) -> None:
        raise AssertionError("not run")

    writer = Writer(run, lanes=2, spill=3)
    writer.start("test-writer")
    submitted = [asyncio.create_task(writer.submit(Probe(NOW)))]
    async with asyncio.timeout(5):
        await started[0].wait()
    items = [Applying([TaskRef("acedata", f"t{n}")], decide) for n in range(3)]
    submitted.append(asyncio.create_task(writer.submit(Apply(items))))
    async with asyncio.timeout(5):
        await started[1].wait()  # one operation waits, but it weighs three tasks
    assert batches == [(0, ["Probe"]), (1, ["Apply"])]
    release.set()
    async with asyncio.timeout(5):
        await writer.close()
        await asyncio.gather(*submitted)

"""Chaos: the simulator injects every fault kind at 20%, and every task still ends in its true
terminal state, with exactly one terminal event.

The whole service runs as in production (real uvicorn, real SQLite, callbacks over HTTP with
the callback token); only the reconciler loop is driven by the test: deliver the callbacks
due, run one pass, move the shared fake clock to the next thing due, repeat. Nothing sleeps.

The one fault that costs real time is `hang`: the simulator answers nothing until the client
gives up, and the client's timeout is real time (`RECONCILER_REQUEST_TIMEOUT`, short here).
The exchanges of one pass run concurrently, so a pass waits for at most one timeout.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from reconciler.clock import FakeClock
from reconciler.model import TaskRef
from reconciler.simulator import CallbackRecord, Faults, RecordedRequest, Simulator
from tests.conftest import Served, StartService

TOKEN = "chaos-callback-token"
RATE = 0.2
FAULTS = Faults(
    drop=RATE,
    duplicate=RATE,
    delay=45.0,
    delay_rate=RATE,
    reorder=RATE,
    rate_limit=RATE,
    retry_after=2.0,
    server_error=RATE,
    hang=RATE,
    malformed=RATE,
    unknown_for=30.0,  # seconds; the first polls (20 s after creation) find nothing
)
ENV = {
    "RECONCILER_CALLBACK_TOKEN": TOKEN,
    "RECONCILER_FIRST_POLL_AFTER": "20",
    "RECONCILER_POLL_INTERVAL_MAX": "60",
    "RECONCILER_RATE_LIMIT": "50",
    "RECONCILER_CONCURRENCY": "8",
    # Real seconds (httpx): how long a hung request holds its pass.
    "RECONCILER_REQUEST_TIMEOUT": "0.5",
}
# (provider, action, rendering, how many): every provider, every gateway rendering, both
# Kie task APIs.
PLAN: list[tuple[str, str, str | None, int]] = [
    ("kling", "text2video", None, 5),
    ("kling", "image2video", None, 3),
    ("cometapi", "text2video", None, 5),
    ("cometapi", "image2video", None, 2),
    ("gateway", "text2video", "taskdto", 2),
    ("gateway", "text2video", "taskdto-legacy", 2),
    ("gateway", "text2video", "simplified", 2),
    ("gateway", "text2video", "kling-native", 2),
    ("gateway", "image2video", "openai", 2),
    ("acedata", "text2video", None, 6),
    ("acedata", "image2video", None, 2),
    ("kie", "jobs", None, 9),
    ("kie", "veo", None, 8),
]
MAX_STEPS = 3000
REAL_SECONDS = 50.0  # the whole drive, hung requests included
TERMINAL_EVENTS = {"task.completed", "task.failed", "task.expired"}
ORDER = {"submitted": 0, "processing": 1, "completed": 2, "failed": 2, "expired": 2}


async def create_and_register(sim: Simulator, served: Served) -> list[TaskRef]:
    """Create the planned tasks at the simulator (callbacks to the service) and register
    each one through `POST /tasks`; a quarter fail, durations 5-150 s."""
    rng = random.Random(20)
    refs = []
    for provider, action, rendering, count in PLAN:
        for _ in range(count):
            created = sim.create_task(
                provider,
                action=action,
                callback_url=f"{served.url}/callbacks/{provider}?token={TOKEN}",
                outcome="failed" if rng.random() < 0.25 else "completed",
                processing_after=rng.uniform(0, 5),
                finish_after=rng.uniform(5, 150),
                rendering=rendering,
            )
            response = await served.client.post(
                "/tasks", json={"provider": provider, "task_id": created.task_id, "action": action}
            )
            assert response.status_code in (200, 201), response.text
            refs.append(TaskRef(provider, created.task_id))
    return refs


async def drive(clock: FakeClock, sim: Simulator, served: Served, refs: list[TaskRef]) -> int:
    """Deliver due callbacks and run passes, each at the next time something is due, until
    every task is terminal; then deliver whatever callbacks are still pending (delayed,
    reordered). Returns the number of steps. Bounded in steps and in real time."""
    service = served.runtime.service
    loop = served.runtime.reconciler

    async def all_terminal() -> bool:
        for ref in refs:
            task = await service.get_task(ref)
            if task is None or not task.terminal:
                return False
        return True

    async with asyncio.timeout(REAL_SECONDS):
        for step in range(1, MAX_STEPS + 1):
            await sim.deliver_due()
            report = await loop.run_once()
            done = await all_terminal()
            upcoming = [sim.world.next_due_at()]
            if not done:
                upcoming.append(report.next_due_at)
            due = [moment for moment in upcoming if moment is not None]
            if not due:
                assert done, "nothing is due, yet some tasks are not terminal"
                return step
            # Never stand still: a pass that leaves work due now would repeat forever.
            clock.set(max(min(due), clock.now() + timedelta(milliseconds=1)))
    raise AssertionError(f"not settled within {MAX_STEPS} steps")


async def test_every_fault_at_20_percent(
    clock: FakeClock, sim: Simulator, start_service: StartService
) -> None:
    started = time.monotonic()
    sim.faults = FAULTS
    # The schedule's jitter, reproducible.
    served = await start_service({**sim.environ(), **ENV}, clock, random.Random(20))
    refs = await create_and_register(sim, served)
    assert len(refs) == 50

    steps = await drive(clock, sim, served, refs)

    # Every fault kind happened.
    callbacks = sim.callbacks_sent
    assert any(c.dropped for c in callbacks)
    assert any(c.duplicated for c in callbacks)
    assert any(c.reordered for c in callbacks)
    assert any(c.due_at - _began(sim, c) >= timedelta(seconds=FAULTS.delay) for c in callbacks)
    polls = [r for r in sim.requests if r.kind != "create"]
    faults = Counter(r.fault for r in polls)
    assert {"hang", "rate_limit", "server_error", "malformed"} <= set(faults), faults
    assert any(_while_unknown(sim, r) for r in polls)
    assert all(c.response_status in (200, None) for c in callbacks if not c.dropped), [
        c for c in callbacks if c.response_status not in (200, None)
    ]

    settled: Counter[str] = Counter()
    for ref in refs:
        truth = sim.world.find(ref.provider, ref.task_id)
        assert truth is not None
        response = await served.client.get(f"/tasks/{ref.provider}/{ref.task_id}")
        assert response.status_code == 200
        task = response.json()
        assert task["status"] == sim.truth(ref.provider, ref.task_id), (task, truth.to_dict())
        if task["status"] == "completed":
            assert [video["url"] for video in task["videos"]][:1] == [truth.video_url], task
        else:
            assert task["error"], task
        settled[task["source"]] += 1

        response = await served.client.get(f"/tasks/{ref.provider}/{ref.task_id}/events")
        events: list[dict[str, Any]] = response.json()["events"]
        assert [e["type"] for e in events].count(task_event(task)) == 1, events
        assert sum(e["type"] in TERMINAL_EVENTS for e in events) == 1, events
        assert events[-1]["type"] in TERMINAL_EVENTS, events
        ranks = [ORDER[e["status"]] for e in events]
        assert ranks == sorted(ranks), events  # never backwards, whatever the order sent
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), events

    # Both paths settled tasks: callbacks that got through, and polls for the rest.
    assert settled["webhook"] and settled["poll"], settled
    assert time.monotonic() - started < REAL_SECONDS + 10, f"{steps} steps took too long"


def task_event(task: dict[str, Any]) -> str:
    return f"task.{task['status']}"


def _began(sim: Simulator, callback: CallbackRecord) -> datetime:
    """When the callback's status began at the simulator (its undelayed due time)."""
    task = sim.world.find(callback.provider, callback.task_id)
    assert task is not None
    return task.changed_at(callback.status)


def _while_unknown(sim: Simulator, request: RecordedRequest) -> bool:
    """Whether the request asked about a task the `unknown_for` fault still hid."""
    for task_id in request.task_ids:
        task = sim.world.find(request.provider, task_id)
        if task is not None and request.at < task.created_at + timedelta(
            seconds=FAULTS.unknown_for
        ):
            return True
    return False

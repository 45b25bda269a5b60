"""`/metrics` against the log it describes: counters that must agree with what was written."""

from __future__ import annotations

import re

from reconciler.clock import FakeClock
from reconciler.simulator import Faults, Simulator
from tests.conftest import StartService


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


async def test_events_written_counts_every_appended_event(
    start_service: StartService, clock: FakeClock, sim: Simulator
) -> None:
    """Registrations, webhooks, polls and the reconciler's own events (expired, not found)
    are all counted, so the counter equals the log's length."""
    env = {**sim.environ(), "RECONCILER_FIRST_POLL_AFTER": "10", "RECONCILER_NOT_FOUND_GRACE": "0"}
    served = await start_service(env=env, clock=clock)
    client = served.client
    sink = f"{served.url}/callbacks/acedata"
    sim.faults = Faults(drop=1.0)  # acedata's callbacks are lost: a poll settles it
    polled = sim.create_task("acedata", callback_url=sink, outcome="completed", finish_after=5)
    sim.faults = Faults()
    called = sim.create_task(
        "kie",
        action="jobs",
        callback_url=f"{served.url}/callbacks/kie",
        outcome="completed",
        finish_after=5,
    )
    running = sim.create_task("kie", action="jobs", finish_after=1000)  # its last look: running
    for body in (
        {"provider": "acedata", "task_id": polled.task_id},
        {"provider": "kie", "task_id": called.task_id, "action": "jobs"},
        {"provider": "kie", "task_id": running.task_id, "action": "jobs", "deadline_seconds": 1},
        {"provider": "gateway", "task_id": "nowhere-at-the-provider"},
    ):
        assert (await client.post("/tasks", json=body)).status_code == 201
    clock.advance(12)
    await sim.deliver_due()  # kie's callbacks arrive
    await served.runtime.reconciler.run_once()

    log = (await client.get("/events", params={"limit": 1000})).json()
    sources = {event["source"] for event in log["events"]}
    assert {"register", "webhook", "poll", "reconciler"} <= sources
    assert "task.expired" in {event["type"] for event in log["events"]}
    text = (await client.get("/metrics")).text
    assert metric(text, "reconciler_events_written_total") == log["last_seq"] == len(log["events"])

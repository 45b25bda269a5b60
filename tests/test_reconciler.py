"""The reconciler loop against the provider simulator, over real HTTP on 127.0.0.1.

Time is one clock shared by the simulator, the adapters, the service and the loop. Most
tests drive the loop with `run_once()` and move the clock to the next due time themselves
(`drive`), like a discrete-event simulation; the tests of `run()` run it as a task and move
a plain FakeClock to the next moment something waits for. The service runs as `serve` starts
it, so callbacks, where a test wants them, go from the simulator to its callback endpoint.
Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.clock import FakeClock
from reconciler.feed import Feed
from reconciler.limits import (
    BREAKER_COOLDOWN_SECONDS,
    BREAKER_THRESHOLD,
    PAUSE_SECONDS,
    RECHECK_SECONDS,
    BreakerState,
)
from reconciler.model import Change, Observation, Source, Status, Task, TaskRef
from reconciler.providers import PollResult
from reconciler.reconciler import (
    PASS_INTERVAL_SECONDS,
    STORE_RETRY_SECONDS,
    PassReport,
    Reconciler,
)
from reconciler.service import NOT_FOUND_ERROR, RESULT_MISSING_ERROR, Service
from reconciler.simulator import Faults, RecordedRequest, Simulator
from reconciler.simulator import auth as sim_auth
from reconciler.store.sqlite import SQLiteStore
from tests.conftest import Served, StartService, serve

FIRST_POLL_AFTER = 60.0


@dataclass
class Harness:
    clock: FakeClock
    sim: Simulator
    served: Served

    @property
    def feed(self) -> Feed:
        return self.served.runtime.feed

    @property
    def service(self) -> Service:
        return self.served.service

    @property
    def loop(self) -> Reconciler:
        return self.served.loop

    def callback_url(self, provider: str) -> str:
        return f"{self.served.url}/callbacks/{provider}"

    async def task(self, provider: str, task_id: str) -> Task:
        task = await self.service.get_task(TaskRef(provider, task_id))
        assert task is not None
        return task

    async def tasks(self, refs: Iterable[tuple[str, str]]) -> list[Task]:
        return [await self.task(provider, task_id) for provider, task_id in refs]


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path,
    clock: FakeClock,
    sim: Simulator,
    env: dict[str, str] | None = None,
    db: str = "db.sqlite",
) -> AsyncIterator[Harness]:
    environ = {
        **sim.environ(),
        "RECONCILER_FIRST_POLL_AFTER": str(FIRST_POLL_AFTER),
        "RECONCILER_RATE_LIMIT": "20",
        "RECONCILER_REQUEST_TIMEOUT": "5",
        **(env or {}),
    }
    async with serve(tmp_path / db, environ, clock, rng=random.Random(0)) as served:
        yield Harness(clock, sim, served)


async def drive(
    h: Harness,
    seconds: float,
    done: Callable[[], Awaitable[bool]] | None = None,
) -> list[PassReport]:
    """Passes, each at the next time something is due (a poll or a simulator callback),
    for at most `seconds` of fake time or until `done()`."""
    end = h.clock.now() + timedelta(seconds=seconds)
    reports = []
    while True:
        await h.sim.deliver_due()
        reports.append(await h.loop.run_once())
        if done is not None and await done():
            return reports
        candidates = [reports[-1].next_due_at, h.sim.world.next_due_at()]
        upcoming = min((t for t in candidates if t is not None), default=None)
        if upcoming is None or upcoming > end:
            return reports
        if upcoming > h.clock.now():
            h.clock.set(upcoming)


def all_terminal(h: Harness, refs: list[tuple[str, str]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(task.terminal for task in await h.tasks(refs))

    return check


def requests_of(sim: Simulator, provider: str) -> list[RecordedRequest]:
    return [r for r in sim.requests if r.provider == provider and r.kind != "create"]


async def register(h: Harness, provider: str, task_id: str, action: str) -> tuple[str, str]:
    await h.service.register(provider, task_id, action)
    return provider, task_id


@contextlib.asynccontextmanager
async def loop_running(h: Harness) -> AsyncIterator[asyncio.Task[None]]:
    """`h.loop.run()` as a task for the block; stopped, and awaited (within 10 s), after it."""
    running = asyncio.create_task(h.loop.run())
    try:
        yield running
    finally:
        h.loop.stop()
        async with asyncio.timeout(10):
            await running


async def register_apart(h: Harness, count: int, seconds: float) -> list[tuple[str, str]]:
    """`count` AceData tasks that stay running, registered `seconds` of the clock apart."""
    refs = []
    for _ in range(count):
        created = h.sim.create_task("acedata", finish_after=3600)
        refs.append(await register(h, "acedata", created.task_id, "text2video"))
        h.clock.advance(seconds)
    return refs


# --- recovery by polling -----------------------------------------------------------------


async def test_lost_callbacks_are_recovered_by_polling(
    tmp_path: Path, clock: FakeClock, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="reconciler")
    sim.faults = Faults(drop=1.0)
    plan = [
        ("kling", "text2video", "completed", 40),
        ("kling", "text2video", "failed", 150),
        ("kling", "image2video", "completed", 400),
        ("cometapi", "text2video", "completed", 90),
        ("cometapi", "text2video", "failed", 30),
        ("gateway", "text2video", "completed", 200),
        ("gateway", "image2video", "failed", 45),
        ("acedata", "text2video", "completed", 30),
        ("acedata", "text2video", "failed", 300),
        ("acedata", "image2video", "completed", 75),
        ("kie", "jobs", "completed", 50),
        ("kie", "veo", "completed", 120),
        ("kie", "jobs", "failed", 20),
    ]
    async with harness(tmp_path, clock, sim) as h:
        refs = []
        for provider, action, outcome, finish_after in plan:
            created = sim.create_task(
                provider,
                action=action,
                callback_url=h.callback_url(provider),
                outcome=outcome,  # type: ignore[arg-type]
                finish_after=finish_after,
            )
            refs.append(await register(h, provider, created.task_id, action))

        await drive(h, 3600, all_terminal(h, refs))

        assert sim.callbacks_sent and all(c.dropped for c in sim.callbacks_sent)
        for task in await h.tasks(refs):
            assert task.status.value == sim.truth(task.provider, task.task_id), task
            assert task.source is Source.POLL and task.callbacks == 0
            if task.status is Status.COMPLETED:
                assert task.videos and task.videos[0].url.startswith("https://")
            else:
                assert task.error
        # Recovered soon after the end, not at the backoff cap: at most a few polls each.
        assert len(sim.requests) < 4 * len(plan)
        # Every request was logged (path only), and no credential ever was.
        assert "acedata POST /acedata/kling/tasks -> 200" in caplog.text
        secrets = [v for k, v in sim.environ().items() if k.endswith(("_KEY", "_TOKEN"))]
        assert secrets and not any(secret in caplog.text for secret in secrets)
        assert "Bearer" not in caplog.text and "eyJ" not in caplog.text  # no JWT either


async def test_a_callback_before_the_first_due_poll_means_no_poll(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    async with harness(tmp_path, clock, sim) as h:
        refs = []
        for provider, action in [
            ("kling", "text2video"),
            ("acedata", "text2video"),
            ("kie", "jobs"),
        ]:
            created = sim.create_task(
                provider, action=action, callback_url=h.callback_url(provider), finish_after=20
            )
            refs.append(await register(h, provider, created.task_id, action))

        await drive(h, 3600)

        assert requests_of(sim, "kling") == requests_of(sim, "acedata") == []
        assert requests_of(sim, "kie") == []
        for task in await h.tasks(refs):
            assert task.status is Status.COMPLETED and task.source is Source.WEBHOOK
            assert task.polls == 0 and task.next_poll_at is None


async def test_due_tasks_are_batched(tmp_path: Path, clock: FakeClock, sim: Simulator) -> None:
    async with harness(tmp_path, clock, sim) as h:
        refs = []
        for provider, action, count in [
            ("acedata", "text2video", 15),
            ("acedata", "image2video", 5),
            ("kling", "text2video", 12),
            ("kling", "image2video", 3),
        ]:
            for _ in range(count):
                created = sim.create_task(provider, action=action, finish_after=30)
                refs.append(await register(h, provider, created.task_id, action))

        clock.advance(FIRST_POLL_AFTER)
        # Kling's second list waits one token (1/rate s) behind the first: two passes.
        reports = await drive(h, 1, all_terminal(h, refs))

        assert len(reports) == 2 and sum(r.settled for r in reports) == len(refs) == 35
        assert sum(r.batches for r in reports) == 3
        acedata = requests_of(sim, "acedata")
        assert [r.kind for r in acedata] == ["batch"]  # one retrieve_batch for both actions
        assert len(acedata[0].task_ids) == 20
        kling = requests_of(sim, "kling")
        assert sorted(r.path.rsplit("/", 1)[-1] for r in kling) == ["image2video", "text2video"]
        assert {r.kind for r in kling} == {"list"}
        assert sum(r.provider_requests for r in reports) == 3
        assert all(task.status is Status.COMPLETED for task in await h.tasks(refs))


async def test_the_tasks_of_one_exchange_fall_due_together_again(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """One jitter per exchange: its tasks are due again at one time, so that they make one
    batch again (with their rows and index entries side by side), while the tasks of
    another exchange are spread apart from them."""
    async with harness(tmp_path, clock, sim) as h:
        groups: list[list[tuple[str, str]]] = []
        for _ in range(2):
            group = []
            for _ in range(5):
                created = sim.create_task("acedata", finish_after=3600)
                group.append(await register(h, "acedata", created.task_id, "text2video"))
            groups.append(group)
            clock.advance(10)
        offsets = []
        for group in groups:
            due = min(task.next_poll_at for task in await h.tasks(group) if task.next_poll_at)
            clock.set(max(due, clock.now()))
            polled_at = clock.now()
            report = await h.loop.run_once()
            assert report.batches == 1 and report.settled == len(group)
            planned = {task.next_poll_at for task in await h.tasks(group)}
            assert len(planned) == 1  # the exchange's five tasks: one time
            [at] = planned
            assert at is not None
            offsets.append((at - polled_at).total_seconds())
        assert len(set(offsets)) == 2  # each exchange drew its own jitter
        assert all(15 * 0.8 <= offset <= 15 * 1.2 for offset in offsets)


async def test_poll_now_goes_through_the_loop(tmp_path: Path) -> None:
    """`POST /tasks/…/poll` is a commit (the task due now) that rings the sleeping loop's
    alarm, and a wait for the task to change: the loop polls it, within its provider's
    limits, and the answer is the polled task."""
    clock = FakeClock()  # a plain one: `run()` sleeps on it until the alarm rings
    async with Simulator(clock=clock, seed=3).serve() as sim, harness(tmp_path, clock, sim) as h:
        created = sim.create_task("acedata", finish_after=30)
        ref = await register(h, "acedata", created.task_id, "text2video")
        async with loop_running(h):
            clock.advance(10)  # not due for another 50 s: the API asks for it
            response = await h.served.client.post(f"/tasks/acedata/{created.task_id}/poll")

        assert response.status_code == 200, response.text
        task = response.json()
        assert task["polls"] == 1 and task["source"] == "poll"
        assert task["status"] == "processing"
        assert [r.kind for r in requests_of(sim, "acedata")] == ["query"]
        next_poll_at = (await h.task(*ref)).next_poll_at
        assert next_poll_at is not None and next_poll_at > clock.now()  # back on its schedule


async def test_poll_now_answers_at_once_for_a_held_provider_and_waits_boundedly(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    env = {"ACEDATA_API_TOKEN": "wrong-token", "KIE_REQUEST_TIMEOUT": "0.05"}
    async with harness(tmp_path, clock, sim, env=env) as h:
        paused = await register(h, "acedata", sim.create_task("acedata").task_id, "text2video")
        clock.advance(FIRST_POLL_AFTER)
        await h.loop.run_once()  # 401: paused
        assert "acedata" in h.service.health.paused
        sent = len(sim.requests)
        task = await h.service.poll_now(TaskRef(*paused))
        assert task.polls == 0 and len(sim.requests) == sent  # not asked

        # Nobody runs the loop here: the wait ends, bounded (twice the request timeout).
        unpolled = await register(h, "kie", sim.create_task("kie").task_id, "jobs")
        task = await h.service.poll_now(TaskRef(*unpolled))
        assert task.polls == 0 and task.next_poll_at == clock.now()  # due, for the loop
        assert len(sim.requests) == sent


# --- limits ------------------------------------------------------------------------------


async def test_a_429_storm_respects_the_rate_and_retry_after(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    rate, retry_after = 2.0, 3.0
    sim.faults = Faults(providers={"kie": Faults(rate_limit=0.4, retry_after=retry_after)})
    env = {"KIE_RATE_LIMIT": str(rate)}
    async with harness(tmp_path, clock, sim, env=env) as h:
        refs = []
        for index in range(12):
            created = sim.create_task("kie", action="jobs", finish_after=20 + index)
            refs.append(await register(h, "kie", created.task_id, "jobs"))

        await drive(h, 3600, all_terminal(h, refs))

        for task in await h.tasks(refs):
            assert task.status.value == sim.truth("kie", task.task_id)
        sent = requests_of(sim, "kie")
        limited = [r for r in sent if r.status == 429]
        assert limited, "the storm never happened"
        for index, request in enumerate(sent):
            window = [r for r in sent if request.at <= r.at < request.at + timedelta(seconds=1)]
            assert len(window) <= math.ceil(rate)
            if request.status == 429:
                resume = request.at + timedelta(seconds=retry_after)
                assert all(later.at >= resume for later in sent[index + 1 :])


async def test_a_failing_provider_opens_its_breaker_without_delaying_others(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    sim.faults = Faults(providers={"kie": Faults(server_error=1.0)})
    async with harness(tmp_path, clock, sim) as h:
        start = clock.now()
        broken, healthy = [], []
        for _ in range(4):
            created = sim.create_task("kie", action="jobs", finish_after=30)
            broken.append(await register(h, "kie", created.task_id, "jobs"))
            created = sim.create_task("cometapi", action="text2video", finish_after=30)
            healthy.append(await register(h, "cometapi", created.task_id, "text2video"))

        await drive(h, 900)

        limits = h.loop.limits["kie"]
        assert limits.breaker.state_at(clock.now()) is not BreakerState.CLOSED
        assert "kie" in h.service.health.breakers_open
        assert "cometapi" not in h.service.health.breakers_open
        kie = requests_of(sim, "kie")
        assert all(r.status == 500 for r in kie)
        # Five failures open it; then only a probe per cool-down (30, 60, 120, 240 s …).
        assert 5 <= len(kie) <= 10
        for task in await h.tasks(broken):
            assert not task.terminal and task.poll_failures > 0
        # The healthy provider was polled when due, every task once, paced at its rate.
        due = start + timedelta(seconds=FIRST_POLL_AFTER)
        comet = requests_of(sim, "cometapi")
        assert len(comet) == len(healthy)
        assert all(due <= r.at < due + timedelta(seconds=1) for r in comet)
        for task in await h.tasks(healthy):
            assert task.status is Status.COMPLETED and task.polls == 1


@pytest.mark.parametrize("provider", ["gateway", "kie"])
async def test_a_breaker_holds_its_provider_for_its_cool_down_only(
    tmp_path: Path, clock: FakeClock, sim: Simulator, provider: str
) -> None:
    """Seen: after 8 s of HTTP 500 from the gateway (3 s from Kie) its tasks waited 60 s,
    twice the documented first cool-down. The breaker opens on the fifth failure; its probe
    goes when the cool-down ends, and the tasks it held follow at once, at the rate."""
    sim.faults = Faults(drop=1.0, providers={provider: Faults(server_error=1.0)})
    env = {"RECONCILER_REQUEST_TIMEOUT": "30"}  # the default: what a probe may take
    action = "jobs" if provider == "kie" else "text2video"
    async with harness(tmp_path, clock, sim, env=env) as h:
        refs = []
        for _ in range(20):
            created = sim.create_task(provider, action=action, finish_after=30)
            refs.append(await register(h, provider, created.task_id, action))
        clock.advance(FIRST_POLL_AFTER)

        await drive(h, 8)  # the burst of 500s
        sim.faults = Faults(drop=1.0)
        await drive(h, 600, all_terminal(h, refs))

        sent = requests_of(sim, provider)
        failed = [r for r in sent if r.status == 500]
        assert len(failed) == BREAKER_THRESHOLD  # then it opened: nothing more was sent
        opened = failed[-1].at
        recovered = sent[len(failed) :]
        assert recovered[0].at == opened + timedelta(seconds=BREAKER_COOLDOWN_SECONDS)
        # Every task it held was polled right after the probe, paced at the rate (20/s).
        assert len(recovered) == len(refs)
        assert recovered[-1].at - recovered[0].at <= timedelta(seconds=len(refs) / 20)
        assert all(task.status is Status.COMPLETED for task in await h.tasks(refs))


async def test_rejected_credentials_pause_the_provider_and_show_on_health(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    env = {"ACEDATA_API_TOKEN": "wrong-token"}
    async with harness(tmp_path, clock, sim, env=env) as h:
        created = sim.create_task("acedata", finish_after=30)
        ref = await register(h, "acedata", created.task_id, "text2video")
        other = sim.create_task("kie", action="jobs", finish_after=30)
        kie_ref = await register(h, "kie", other.task_id, "jobs")

        clock.advance(FIRST_POLL_AFTER)
        await h.loop.run_once()

        assert "acedata" in h.service.health.paused
        assert "wrong-token" not in h.service.health.paused["acedata"]
        assert any("credentials rejected" in why for why in await h.service.readiness())
        assert (await h.task(*kie_ref)).status is Status.COMPLETED
        task = await h.task(*ref)
        assert not task.terminal and task.poll_failures == 0  # the provider's failing, not its
        paused_at = clock.now()
        assert task.next_poll_at == paused_at + timedelta(seconds=PAUSE_SECONDS)

        await drive(h, 200)  # paused: one probe a minute, nothing else
        sent = [r.at - paused_at for r in requests_of(sim, "acedata")]
        assert sent == [timedelta(seconds=s) for s in (0, 60, 120, 180)]


async def test_a_pause_probe_notices_access_that_came_back(
    tmp_path: Path, clock: FakeClock, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused, the provider gets one probe a minute for however many tasks are due; the
    first probe after the key works again ends the pause, and the tasks follow it."""
    sim.faults = Faults(drop=1.0)
    async with harness(tmp_path, clock, sim, env={"KIE_API_KEY": "rotated-key"}) as h:
        refs = []
        for _ in range(5):
            created = sim.create_task("kie", action="jobs", finish_after=30)
            refs.append(await register(h, "kie", created.task_id, "jobs"))
        clock.advance(FIRST_POLL_AFTER)
        paused_at = clock.now()
        await drive(h, 100)  # the first poll, then probes at +60 and +120 s: all 401
        assert "kie" in h.service.health.paused

        monkeypatch.setitem(sim_auth.BEARER_KEYS, "kie", "rotated-key")  # fixed there
        await drive(h, 600, all_terminal(h, refs))

        sent = requests_of(sim, "kie")
        assert [r.at - paused_at for r in sent if r.status == 401] == [
            timedelta(seconds=s) for s in (0, 60)
        ]
        answered = [r for r in sent if r.status == 200]
        assert answered[0].at == paused_at + timedelta(seconds=120)  # the next probe
        assert len(answered) == len(refs)
        assert answered[-1].at - answered[0].at <= timedelta(seconds=1)
        assert "kie" not in h.service.health.paused
        assert all(task.status is Status.COMPLETED for task in await h.tasks(refs))


async def test_a_restart_forgets_a_credentials_pause(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """An operator fixes the key and restarts: the pause was the old process's, so the tasks
    are polled when next due (at most a minute later), not after the old pause."""
    sim.faults = Faults(drop=1.0)
    refs: list[tuple[str, str]] = []
    async with harness(tmp_path, clock, sim, env={"KIE_API_KEY": "wrong-key"}) as h:
        for _ in range(3):
            created = sim.create_task("kie", action="jobs", finish_after=30)
            refs.append(await register(h, "kie", created.task_id, "jobs"))
        clock.advance(FIRST_POLL_AFTER)
        await drive(h, 30)
        assert "kie" in h.service.health.paused
        restarted_at = clock.now()
        latest = max(task.next_poll_at or restarted_at for task in await h.tasks(refs))
        assert latest <= restarted_at + timedelta(seconds=RECHECK_SECONDS)

    async with harness(tmp_path, clock, sim) as h:  # the right key
        assert h.service.health.paused == {}
        await drive(h, 600, all_terminal(h, refs))
        answered = [r for r in requests_of(sim, "kie") if r.status == 200]
        assert len(answered) == len(refs)
        assert all(r.at <= restarted_at + timedelta(seconds=RECHECK_SECONDS) for r in answered)
        assert all(task.status is Status.COMPLETED for task in await h.tasks(refs))


# --- giving up ---------------------------------------------------------------------------


async def test_a_task_past_its_deadline_expires(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    async with harness(tmp_path, clock, sim) as h:
        created = sim.create_task("kie", action="jobs", finish_after=10_000)
        await h.service.register("kie", created.task_id, "jobs", deadline_seconds=300)

        reports = await drive(h, 1000)

        task = await h.task("kie", created.task_id)
        assert task.status is Status.EXPIRED and task.source is Source.RECONCILER
        assert sum(r.expired for r in reports) == 1
        assert task.completed_at == task.deadline_at


async def test_a_task_at_its_deadline_gets_a_last_poll(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """The poll planned at the deadline is a last look: a video finished by then is kept."""
    sim.faults = Faults(drop=1.0)
    async with harness(tmp_path, clock, sim) as h:
        created = sim.create_task("kie", action="jobs", finish_after=FIRST_POLL_AFTER + 5)
        await h.service.register("kie", created.task_id, "jobs", deadline_seconds=70)
        deadline = clock.now() + timedelta(seconds=70)

        reports = await drive(h, 1000)

        task = await h.task("kie", created.task_id)
        assert task.status is Status.COMPLETED and task.source is Source.POLL
        assert [r.at for r in requests_of(sim, "kie")][-1] == deadline
        assert sum(r.expired for r in reports) == 0


async def test_a_failed_last_poll_expires_the_task(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    sim.faults = Faults(providers={"kie": Faults(server_error=1.0)})
    async with harness(tmp_path, clock, sim) as h:
        created = sim.create_task("kie", action="jobs", finish_after=10_000)
        await h.service.register("kie", created.task_id, "jobs", deadline_seconds=70)
        start = clock.now()

        reports = await drive(h, 1000)

        task = await h.task("kie", created.task_id)
        assert task.status is Status.EXPIRED and sum(r.expired for r in reports) == 1
        # The first poll, then one last look at the deadline: never polled again after it.
        sent = [(r.at - start).total_seconds() for r in requests_of(sim, "kie")]
        assert sent == [FIRST_POLL_AFTER, 70]


async def test_a_task_at_its_deadline_expires_unpolled_while_its_provider_is_held(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    async with harness(tmp_path, clock, sim, env={"ACEDATA_API_TOKEN": "wrong-token"}) as h:
        created = sim.create_task("acedata", finish_after=10_000)
        await h.service.register("acedata", created.task_id, "text2video", deadline_seconds=70)
        start = clock.now()

        reports = await drive(h, 1000)

        task = await h.task("acedata", created.task_id)
        assert task.status is Status.EXPIRED and sum(r.expired for r in reports) == 1
        assert task.completed_at == start + timedelta(seconds=70)
        # Paused by the 401 of its first poll, the provider got no last look to answer.
        assert [(r.at - start).total_seconds() for r in requests_of(sim, "acedata")] == [60]


async def test_success_without_url_is_polled_again_within_the_backoff_cap(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """Seen on Kling with a 9-s deadline and a 2-s cap: the poll after a success without a
    URL was planned at the deadline, and the task expired though the URL had come."""
    env = {
        "KLING_DEADLINE": "9",
        "KLING_POLL_INTERVAL_MAX": "2",
        "KLING_FIRST_POLL_AFTER": "1",
    }
    async with harness(tmp_path, clock, sim, env=env) as h:
        created = sim.create_task("kling", finish_after=1)
        url, created.video_url = created.video_url, None  # succeed, with no URL yet
        ref = await register(h, "kling", created.task_id, "text2video")
        start = clock.now()

        await drive(h, 1)
        task = await h.task(*ref)
        assert task.status is Status.PROCESSING and task.provider_status == "succeed"
        assert task.next_poll_at is not None
        assert task.next_poll_at <= start + timedelta(seconds=1 + 2)

        created.video_url = url  # the provider has it from +3 s
        await drive(h, 20, all_terminal(h, [ref]))

        task = await h.task(*ref)
        assert task.status is Status.COMPLETED and task.videos[0].url == url
        assert task.completed_at is not None
        assert task.completed_at <= start + timedelta(seconds=3)


async def test_a_task_never_found_fails(tmp_path: Path, clock: FakeClock, sim: Simulator) -> None:
    env = {"RECONCILER_NOT_FOUND_GRACE": "300"}
    async with harness(tmp_path, clock, sim, env=env) as h:
        refs = [
            await register(h, "acedata", "8d9c2f52-0c1e-4b6f-9a51-2f6d0e4b7c11", "text2video"),
            await register(h, "kling", "999999999999999999", "text2video"),
            await register(h, "cometapi", "888888888888888888", "text2video"),
            await register(h, "kie", "0123456789abcdef0123456789abcdef", "jobs"),
        ]

        await drive(h, 1000, all_terminal(h, refs))

        for task in await h.tasks(refs):
            assert task.status is Status.FAILED and task.error == NOT_FOUND_ERROR, task
            # Retried within the grace, then failed at its end.
            assert task.polls >= 2
            assert task.completed_at is not None
            grace_end = task.created_at + timedelta(seconds=300)
            assert grace_end <= task.completed_at < grace_end + timedelta(seconds=5)


# --- restarts and the real loop ----------------------------------------------------------


async def test_a_restart_loses_no_schedule(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    sim.faults = Faults(drop=1.0)
    refs: list[tuple[str, str]] = []
    async with harness(tmp_path, clock, sim) as h:
        for provider, action, finish_after in [
            ("acedata", "text2video", 100),
            ("acedata", "text2video", 400),
            ("kie", "jobs", 90),
            ("kie", "veo", 250),
            ("cometapi", "text2video", 500),
        ]:
            created = sim.create_task(provider, action=action, finish_after=finish_after)
            refs.append(await register(h, provider, created.task_id, action))
        await drive(h, 70)  # the first polls happened; nothing is finished yet
        assert not any(task.terminal for task in await h.tasks(refs))
        # A pass leases what is due, then the process dies before polling it.
        next_due = await h.service.next_due_at()
        assert next_due is not None
        clock.set(next_due)
        crashed = await h.service.lease_due(100, h.loop.lease_seconds)
        assert crashed
        schedule = {(t.provider, t.task_id): t.next_poll_at for t in await h.tasks(refs)}
        sent_before = len(sim.requests)

    async with harness(tmp_path, clock, sim) as h:
        after_restart = {(t.provider, t.task_id): t.next_poll_at for t in await h.tasks(refs)}
        assert after_restart == schedule
        lease_end = clock.now() + timedelta(seconds=h.loop.lease_seconds)
        for task in crashed:
            assert schedule[task.provider, task.task_id] == lease_end

        await drive(h, 3600, all_terminal(h, refs))

        for task in await h.tasks(refs):
            assert task.status.value == sim.truth(task.provider, task.task_id)
        crashed_ids = {task.task_id for task in crashed}
        for request in sim.requests[sent_before:]:
            if crashed_ids & set(request.task_ids):
                assert request.at >= lease_end  # retried when the lease ended, not lost


async def test_run_sleeps_until_due_and_stops_cleanly(tmp_path: Path) -> None:
    clock = FakeClock()  # a plain one: `run()` really sleeps on it until the test moves it
    async with Simulator(clock=clock, seed=2).serve() as sim, harness(tmp_path, clock, sim) as h:
        async with loop_running(h):
            refs = []
            for provider, action in [("acedata", "text2video")] * 3 + [("kling", "text2video")] * 3:
                created = sim.create_task(provider, action=action, finish_after=30)
                refs.append(await register(h, provider, created.task_id, action))
            clock.advance(FIRST_POLL_AFTER)  # wakes the loop's sleep: everything is due
            async with asyncio.timeout(10):
                while True:
                    seen = h.feed.last_seq
                    if all(task.terminal for task in await h.tasks(refs)):
                        break
                    await h.feed.wait(seen, 10)
            assert h.service.health.loop_running
            assert [r.kind for r in requests_of(sim, "acedata")] == ["batch"]
            assert [r.kind for r in requests_of(sim, "kling")] == ["list"]
            assert all(r.at == clock.now() for r in sim.requests if r.kind != "create")
        assert not h.service.health.loop_running


async def test_run_keeps_a_burst_in_memory_at_the_provider_rate(tmp_path: Path) -> None:
    """Ten single-task batches of one provider due at once: `run()` leases them in one pass
    and sends them one token apart, none handed back to the database (which had capped a
    fast provider at one batch per pass)."""
    clock = WatchedClock()
    async with (
        Simulator(clock=clock, seed=3).serve() as sim,
        harness(tmp_path, clock, sim, env={"KIE_RATE_LIMIT": "10"}) as h,
    ):
        refs = []
        for _ in range(10):
            created = sim.create_task("kie", action="jobs", finish_after=30)
            refs.append(await register(h, "kie", created.task_id, "jobs"))
        async with loop_running(h):
            clock.advance(FIRST_POLL_AFTER)
            start = clock.now()
            await polled(h, refs, 1)  # the first batch went at once; the others wait
            for count in range(2, len(refs) + 1):
                clock.set(clock.next_wake())  # the next batch's slot
                await polled(h, refs, count)
            sent = requests_of(sim, "kie")
            assert len(sent) == 10
            assert all(task.polls == 1 for task in await h.tasks(refs))
            times = sorted(r.at - start for r in sent)
            assert times == [timedelta(seconds=n / 10) for n in range(10)]


async def test_polls_falling_due_one_after_another_are_leased_a_pass_at_a_time(
    tmp_path: Path,
) -> None:
    """Ten AceData tasks fall due 10 ms apart (a burst's polls fall due thousands a second):
    `run()` does not chase each due time with a pass of its own (a lease and a commit for
    one task), but looks again `PASS_INTERVAL_SECONDS` after the pass before. Three batches
    instead of ten requests, and none polled later than that interval after its due time."""
    clock = WatchedClock()
    async with (
        Simulator(clock=clock, seed=5).serve() as sim,
        harness(tmp_path, clock, sim, env={"ACEDATA_RATE_LIMIT": "1000"}) as h,
    ):
        refs = await register_apart(h, 10, 0.01)
        due = {task.task_id: task.next_poll_at or task.created_at for task in await h.tasks(refs)}
        async with loop_running(h):
            for count in (1, 6, 10):
                await clock.until(lambda: bool(clock.sleeping))
                clock.set(max(clock.now(), clock.next_wake()))
                await polled(h, refs, count)
            sent = requests_of(sim, "acedata")
            assert [len(r.task_ids) for r in sent] == [1, 5, 4]
            for request in sent:
                for task_id in request.task_ids:
                    late = (request.at - due[task_id]).total_seconds()
                    assert 0 <= late <= PASS_INTERVAL_SECONDS + 1e-6


async def test_a_provider_without_room_leaves_its_backlog_due_and_holds_up_no_other(
    tmp_path: Path,
) -> None:
    """Twenty Kie tasks fall due, then a CometAPI one; the loop leases ten at a time. Kie
    (10 requests/s, 4 connections) can use eight batches at once: the first pass leases ten,
    and its lane is full. The next pass leases CometAPI's task by itself and leaves
    Kie's other ten in the database, due and untouched (they used to be leased and handed
    back, a write each, pass after pass). As Kie's exchanges end, its next tasks are leased:
    every Kie request still goes one token apart, every task polled once."""
    clock = WatchedClock()
    async with (
        Simulator(clock=clock, seed=4).serve() as sim,
        harness(tmp_path, clock, sim, env={"KIE_RATE_LIMIT": "10"}) as h,
    ):
        h.loop.chunk = 10
        kie = []
        for _ in range(20):
            created = sim.create_task("kie", action="jobs", finish_after=300)
            kie.append(await register(h, "kie", created.task_id, "jobs"))
        clock.advance(1)
        created = sim.create_task("cometapi", action="text2video", finish_after=300)
        comet = [await register(h, "cometapi", created.task_id, "text2video")]
        due = {ref: (await h.task(*ref)).next_poll_at for ref in kie}
        async with loop_running(h):
            clock.advance(FIRST_POLL_AFTER)
            start = clock.now()
            await polled(h, comet, 1)
            assert [r.at for r in requests_of(sim, "cometapi")] == [start]
            waiting = await h.tasks(kie)
            untouched = [t for t in waiting if t.polls == 0 and t.next_poll_at == due[t.ref]]
            assert len(untouched) == 10  # the backlog, still due, never leased
            await clock.until(lambda: start + timedelta(seconds=1) in clock.sleeping)

            for count in range(2, len(kie) + 1):
                clock.set(clock.next_wake())  # the next Kie batch's slot
                await polled(h, kie, count)
            assert all(task.polls == 1 for task in await h.tasks(kie))
            times = sorted(r.at - start for r in requests_of(sim, "kie"))
            assert times == [timedelta(seconds=n / 10) for n in range(20)]


class WatchedClock(FakeClock):
    """A FakeClock that knows who sleeps on it and until when, so a test of `run()` can move
    time on to the next moment someone waits for, once everyone is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()  # set whenever someone starts or stops sleeping
        self.sleeping: list[datetime | None] = []

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        self.sleeping.append(when)
        self.waiting.set()
        try:
            await super().sleep_until(when, wake)
        finally:
            self.sleeping.remove(when)
            self.waiting.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (on sleepers coming and going) until `condition()` holds."""
        async with asyncio.timeout(10):
            while not condition():
                self.waiting.clear()
                await self.waiting.wait()

    def next_wake(self) -> datetime:
        """The earliest time someone sleeps until."""
        return min(when for when in self.sleeping if when is not None)


async def polled(h: Harness, refs: list[tuple[str, str]], count: int) -> None:
    """Wait (on the feed's commits) until `count` polls of `refs` were written."""
    async with asyncio.timeout(10):
        while True:
            seen = h.feed.commits
            if sum(task.polls for task in await h.tasks(refs)) >= count:
                return
            await h.feed.wait_commit(seen, 10)


async def test_run_starts_the_batches_a_probe_held_as_soon_as_it_succeeds(
    tmp_path: Path,
) -> None:
    """Under `run()`, batches due with a probe wait in memory for its verdict, not for its
    timeout (30 s here), then go one token apart. The probe is a Kling task the provider
    does not know: its exchange needs a second request (the list), one token later."""
    clock = WatchedClock()
    env = {"KLING_RATE_LIMIT": "10", "RECONCILER_REQUEST_TIMEOUT": "30"}
    async with (
        Simulator(clock=clock, seed=3).serve() as sim,
        harness(tmp_path, clock, sim, env=env) as h,
    ):
        probe = await register(h, "kling", "424242424242424242", "effects")  # due first
        clock.advance(1)
        held = []
        for action in ("text2video", "image2video", "lip-sync", "video-extend"):
            created = sim.create_task("kling", action=action, finish_after=30)
            held.append(await register(h, "kling", created.task_id, action))
        limits = h.loop.limits["kling"]
        for _ in range(BREAKER_THRESHOLD):  # as five failed exchanges would
            limits.breaker.record_failure(clock.now())
        async with loop_running(h):
            clock.advance(FIRST_POLL_AFTER)  # past the cool-down: the probe and the rest
            due = clock.now()
            # The probe waits for its second token, the first of the others for its slot.
            turn = due + timedelta(seconds=0.1)
            await clock.until(lambda: clock.sleeping.count(turn) == 2)
            for count in range(1, len(held) + 2):  # the probe's verdict, then one by one
                clock.set(clock.next_wake())
                await polled(h, [probe, *held], count)
            sent = requests_of(sim, "kling")
            assert [r.at - due for r in sent] == [timedelta(seconds=n / 10) for n in range(6)]
            assert [r.kind for r in sent[:2]] == ["query", "list"]  # the probe
            assert limits.breaker.state is BreakerState.CLOSED
            assert all(task.polls == 1 for task in await h.tasks(held))


_NEVER = datetime.max.replace(tzinfo=UTC)


async def test_stop_abandons_a_poll_waiting_for_its_turn(tmp_path: Path) -> None:
    clock = WatchedClock()
    async with Simulator(clock=clock, seed=1).serve() as sim:
        # One token per 100 s: Kling's list request after the failed direct query must wait.
        async with harness(tmp_path, clock, sim, env={"KLING_RATE_LIMIT": "0.01"}) as h:
            ref = await register(h, "kling", "777777777777777777", "text2video")
            clock.advance(FIRST_POLL_AFTER)
            leased_at = clock.now()
            passing = asyncio.create_task(h.loop.run_once())
            async with asyncio.timeout(10):
                await clock.waiting.wait()
            h.loop.stop()
            async with asyncio.timeout(10):
                report = await passing

        assert report.abandoned == 1 and report.settled == 0
        assert [r.kind for r in requests_of(sim, "kling")] == ["query"]
        async with harness(tmp_path, clock, sim) as restarted:
            task = await restarted.task(*ref)
            # Untouched but for the lease: the next start polls it when the lease ends.
            assert task.polls == 0
            assert task.next_poll_at == leased_at + timedelta(seconds=h.loop.lease_seconds)


async def test_commits_ring_the_alarm_only_for_earlier_polls(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """Registrations and webhooks wake the loop through their commits, and only when they
    plan a poll before the loop's next look at the schedule."""
    async with harness(tmp_path, clock, sim) as h:
        service, alarm = h.service, h.feed.alarm
        assert h.loop.alarm is alarm
        alarm.reset(clock.now() + timedelta(seconds=10))
        body = b'{"task_id": "w1", "task_status": "processing"}'
        result = await service.ingest("kling", {}, body)
        assert result.task is not None and result.task.next_poll_at is not None
        assert result.task.next_poll_at > alarm.next_look
        assert not alarm.rung.is_set()  # the loop looks again before that poll is due

        alarm.reset(clock.now() + timedelta(seconds=FIRST_POLL_AFTER * 10))
        await service.register("kling", "w2")
        assert alarm.rung.is_set()  # due before the loop would have looked

        alarm.reset(None)  # the loop is reading the schedule
        await service.ingest("kling", {}, b'{"task_id": "w3", "task_status": "submitted"}')
        assert alarm.rung.is_set()


async def test_an_unconfigured_provider_is_not_polled_and_its_tasks_expire(
    start_service: StartService, clock: FakeClock
) -> None:
    served = await start_service({"RECONCILER_DEADLINE": "3600"}, clock)  # no credentials
    service, loop = served.runtime.service, served.runtime.reconciler
    body = b'{"code": 200, "msg": "ok", "data": {"taskId": "k1", "state": "generating"}}'
    result = await service.ingest("kie", {}, body)
    assert result.task is not None and result.task.next_poll_at is not None

    clock.set(result.task.next_poll_at)
    report = await loop.run_once()
    assert report.provider_requests == 0 and report.deferred == 1
    assert service.health.paused == {}  # not a rejected credential
    task = await service.get_task(TaskRef("kie", "k1"))
    assert task is not None and task.next_poll_at == task.deadline_at

    clock.set(task.deadline_at)
    await loop.run_once()
    task = await service.get_task(TaskRef("kie", "k1"))
    assert task is not None and task.status is Status.EXPIRED


async def test_stop_releases_batches_waiting_in_memory(tmp_path: Path) -> None:
    clock = WatchedClock()  # never advanced: the waiting batches' slots never come
    async with (
        Simulator(clock=clock, seed=4).serve() as sim,
        harness(tmp_path, clock, sim, env={"KIE_RATE_LIMIT": "5"}) as h,
    ):
        refs = []
        for _ in range(4):
            created = sim.create_task("kie", action="jobs", finish_after=30)
            refs.append(await register(h, "kie", created.task_id, "jobs"))
        clock.advance(FIRST_POLL_AFTER)
        async with loop_running(h):
            await polled(h, refs, 1)  # the first batch went; the others wait for their slots
            await clock.until(lambda: len([w for w in clock.sleeping if w and w < _NEVER]) >= 3)
        # The loop returned, although the waiting batches' slots never came.
        assert len(requests_of(sim, "kie")) == 1
        tasks = await h.tasks(refs)
        assert sum(task.polls for task in tasks) == 1
        # The others stay leased: due again when the lease ends, not lost.
        for task in tasks:
            if task.polls == 0:
                assert task.next_poll_at is not None and task.next_poll_at > clock.now()


async def test_success_without_url_is_polled_soon_then_failed(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    async with harness(tmp_path, clock, sim, env={"RECONCILER_NOT_FOUND_GRACE": "120"}) as h:
        ref = await register(h, "kling", "no-url", "text2video")
        task = await h.task(*ref)
        empty = PollResult("no-url", Observation("no-url", Status.COMPLETED, "succeed"))

        [settled] = await h.service.settle_polls([task], [empty])
        assert settled is not None and settled.status is Status.PROCESSING
        assert settled.next_poll_at == clock.now() + timedelta(seconds=10)  # soon

        clock.advance(121)
        [settled] = await h.service.settle_polls([settled], [empty])
        assert settled is not None and settled.status is Status.FAILED
        assert settled.error == RESULT_MISSING_ERROR and settled.next_poll_at is None


async def test_an_unknown_status_word_keeps_the_task_polled(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    async with harness(tmp_path, clock, sim) as h:
        ref = await register(h, "gateway", "odd", "text2video")
        task = await h.task(*ref)
        odd = PollResult("odd", Observation("odd", None, "UNKNOWN"))
        [settled] = await h.service.settle_polls([task], [odd])
        assert settled is not None and not settled.terminal
        assert settled.provider_status == "UNKNOWN" and settled.next_poll_at is not None


async def test_run_fills_a_waiting_batch_with_tasks_that_fall_due_meanwhile(
    tmp_path: Path,
) -> None:
    """AceData takes 50 tasks a request. When polls fall due one by one faster than its rate
    allows requests, a batch waiting for its turn is filled up by the passes after it: each
    request carries what fell due meanwhile, instead of one request per pass."""
    clock = WatchedClock()
    async with (
        Simulator(clock=clock, seed=3).serve() as sim,
        harness(tmp_path, clock, sim, env={"ACEDATA_RATE_LIMIT": "5"}) as h,
    ):
        refs = await register_apart(h, 100, 0.001)  # due one millisecond apart
        async with loop_running(h):
            clock.advance(FIRST_POLL_AFTER - 0.1)

            def asked() -> int:
                return len({i for r in requests_of(sim, "acedata") for i in r.task_ids})

            def settled(after: datetime) -> bool:
                """The loop sleeps again, and nobody waits for a moment already past."""
                return h.loop.alarm.next_look in clock.sleeping and all(
                    when is None or when > after for when in clock.sleeping
                )

            now = clock.now()
            for _ in range(1000):
                await clock.until(lambda now=now: settled(now))
                if asked() >= len(refs):
                    break
                now = clock.next_wake()  # the next moment anyone waits for
                clock.set(now)
            sent = requests_of(sim, "acedata")
            assert asked() == len(refs)
            # Batches filled up while they waited; one per pass would have been 100 requests.
            assert len(sent) <= 4, [len(r.task_ids) for r in sent]


async def test_a_hand_back_leaves_a_task_rescheduled_since_its_lease(
    tmp_path: Path, clock: FakeClock, sim: Simulator
) -> None:
    """The loop hands a leased task back (its provider's limits) only while the task is
    still under that lease: one made due meanwhile (`POST …/poll`, or a webhook that
    re-planned it) keeps its new time."""
    async with harness(tmp_path, clock, sim) as h:
        created = sim.create_task("kie", action="jobs", finish_after=3600)
        provider, task_id = await register(h, "kie", created.task_id, "jobs")
        clock.advance(FIRST_POLL_AFTER)
        now = clock.now()
        [leased] = await h.service.lease_due(10, 120, now)
        lease = {leased.ref: now + timedelta(seconds=120)}
        later = now + timedelta(seconds=30)

        # Made due meanwhile, as `POST /tasks/…/poll` does.
        made_due = await h.served.runtime.store.apply(
            [leased.ref], lambda t: None if t is None else Change(t.replace(next_poll_at=now), None)
        )
        assert made_due.task is not None
        await h.service.defer([leased], later, leases=lease)
        assert (await h.task(provider, task_id)).next_poll_at == now  # kept: not our lease

        [again] = await h.service.lease_due(10, 120, now)
        await h.service.defer([again], later, leases=lease)
        assert (await h.task(provider, task_id)).next_poll_at == later  # still ours: back


async def test_run_survives_a_store_that_cannot_commit_and_recovers_with_it(
    tmp_path: Path,
) -> None:
    """SPEC §4: a store that cannot commit (full disk, database gone) must not end the loop:
    its pass is tried again a few seconds later, and polls go on once the store is back."""
    clock = WatchedClock()
    async with (
        Simulator(clock=clock, seed=3).serve() as sim,
        harness(tmp_path, clock, sim) as h,
    ):
        created = sim.create_task("kie", action="jobs", finish_after=3600)
        ref = await register(h, "kie", created.task_id, "jobs")
        async with SQLiteStore(tmp_path / "gone.sqlite") as gone:
            pass  # a real store that refuses every operation
        working, h.service.store = h.service.store, gone
        async with loop_running(h) as running:
            try:
                failed_at = clock.now() + timedelta(seconds=FIRST_POLL_AFTER)
                clock.set(failed_at)
                retry = failed_at + timedelta(seconds=STORE_RETRY_SECONDS)
                await clock.until(lambda: retry in clock.sleeping)  # the pass failed; it waits
                assert not running.done() and h.loop.health.loop_running
                h.service.store = working
                clock.set(retry)
                await polled(h, [ref], 1)
            finally:
                h.service.store = working

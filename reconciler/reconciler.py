"""The reconciler loop (SPEC §3): sleep until the earliest due poll or the alarm, lease the
due tasks in bounded chunks, batch them per provider, run each batch's exchange through its
provider's lane, and hand every ending to the service.

This module owns the passes and the loop's own state: its `Health` (read by the service as
a `LoopHealth`) and what each pass did (`PassReport`). Provider I/O is `polling` (one `Lane`
per provider: limits, connection pool, batches waiting for a turn; `exchange`: one batch's
requests). It does not own timing rules (`schedule.py`, applied by the service), what an
answer means (the adapters) or storage: it reaches the store only through `Service`
(`lease_due`, `settle_polls`, `poll_failed`, `defer`, `expire`, `next_due_at`). It wakes on
the feed's `Alarm`, which commits ring, so nothing calls into it but `run`, `run_once` and
`stop`.

The database is the queue. A pass leases at most `chunk` due tasks; a task's lease pushes
its `next_poll_at` forward, so a poll abandoned by a crash or a shutdown is simply retried
when the lease ends. Batches a provider cannot take now (token bucket empty, Retry-After,
open breaker, paused credentials, all its connections busy) wait in their lane when their
slot is near, or are handed back due at it, paced at the provider's rate, so that nothing
waits long in memory, no provider holds up another, and nothing spins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType

from reconciler.clock import Clock
from reconciler.errors import BadPayload, ProviderError, ServerError, StoreError
from reconciler.feed import Alarm
from reconciler.limits import BreakerState, Permit, ProviderLimits, after
from reconciler.metrics import Metrics
from reconciler.model import Status, Task, TaskRef
from reconciler.polling.exchange import Ending, exchange
from reconciler.polling.lane import WAIT_HORIZON_SECONDS, Lane
from reconciler.providers import PollResult, Provider
from reconciler.service import Service

logger = logging.getLogger(__name__)

_NEVER = datetime.max.replace(tzinfo=UTC)
# A replica that could not reach the database to wait for the loop's lock asks again after.
LEADERSHIP_RETRY_SECONDS = 1.0
# A pass the store failed (full disk, database gone) is tried again after this.
STORE_RETRY_SECONDS = 5.0
# Passes for polls falling due later begin at least this far apart (`_next_look`).
PASS_INTERVAL_SECONDS = 0.05

# The loop's lock, from the store: entering waits until this process may run the loop; the
# Event it yields is set if that may have ended.
Leadership = Callable[[], AbstractAsyncContextManager[asyncio.Event]]


@dataclass
class PassReport:
    """What one pass did (flows of the pass update it as they finish)."""

    leased: int = 0
    expired: int = 0  # at their deadline: after a last poll, or with their provider held
    batches: int = 0  # batch exchanges started
    dispatched: int = 0  # tasks in those batches
    settled: int = 0  # tasks whose poll result (an observation or a task error) was applied
    backed_off: int = 0  # tasks whose exchange failed as a whole
    deferred: int = 0  # tasks handed back for a provider's limits
    abandoned: int = 0  # tasks left leased (shutdown): retried when the lease ends
    requests: Counter[str] = field(default_factory=Counter)  # provider -> requests sent
    # Providers whose lane had no room for more (`Lane.room`): their due tasks were left
    # in the database, and leases were taken per provider for the others.
    full: set[str] = field(default_factory=set)
    more: bool = False  # a per-provider lease took as many as it asked: more may be due
    next_due_at: datetime | None = None

    @property
    def provider_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class Health:
    """The loop's own account of itself: written here only, read by the service as its
    `LoopHealth` (`/readyz`, `/metrics`, `/stats`)."""

    loop_running: bool = False  # passes are running here: this process leads
    # Waiting for the loop's lock while another replica leads (PostgreSQL): this process
    # serves the API and webhooks, and takes the loop over when the leader goes.
    standby: bool = False
    paused: dict[str, str] = field(default_factory=dict)  # provider -> why
    breakers_open: set[str] = field(default_factory=set)
    lag_seconds: float = 0.0  # how late the oldest task of the last pass was


class Reconciler:
    def __init__(
        self,
        service: Service,
        providers: Mapping[str, Provider],
        clock: Clock,
        *,
        alarm: Alarm | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
        leadership: Leadership | None = None,
        chunk: int = 500,
        lease_seconds: float = 120.0,
    ) -> None:
        if chunk < 1 or lease_seconds <= 0:
            raise ValueError("chunk must be >= 1 and lease_seconds > 0")
        self.service = service
        self.clock = clock
        self.alarm = alarm or Alarm()
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.chunk = chunk
        self.lease_seconds = lease_seconds
        self._leadership = leadership or _always_leading
        self._lanes = {name: Lane(provider, clock) for name, provider in providers.items()}
        # The poll time each task leased here and not yet settled or handed back got from
        # its lease: a hand-back applies only while the task is still under it.
        self._leases: dict[TaskRef, datetime] = {}
        self._opened = False
        self._closed = False
        # Set while a provider's lane has no room for more: an exchange that ends then rings
        # the alarm, so that the loop leases that provider's next due tasks at once.
        self._waiting_for_room = False
        self._stop = asyncio.Event()
        # Set by `run()`: batches due within the horizon wait for their slot in memory.
        # `run_once()` does only what is due at its `now`, and hands the rest back.
        self._wait_in_memory = False

    @property
    def limits(self) -> Mapping[str, ProviderLimits]:
        return {name: lane.limits for name, lane in self._lanes.items()}

    # --- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> Reconciler:
        if self._opened:
            raise RuntimeError("this Reconciler was already opened")
        self._opened = True
        for lane in self._lanes.values():
            lane.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._closed = True
        for lane in self._lanes.values():
            await lane.close()

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise RuntimeError("use the Reconciler inside `async with`, once")

    def stop(self) -> None:
        """Ask `run()` to return: no new polls start, waits for a turn are abandoned, and
        polls already talking to their provider finish (bounded by its request timeout)."""
        self._stop.set()
        self.alarm.ring()
        for lane in self._lanes.values():
            lane.stop_waiting()

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Lead, then run passes until `stop()`, sleeping until the earliest due poll or the
        alarm.

        One process in a deployment runs the passes: the one holding the loop's lock
        (`leadership`, from the store: at once and for good on SQLite, a session lock on
        PostgreSQL). Until it holds it, this waits on `standby`; if it loses it, the passes
        end (polls under way finish) and it waits again. Polls started by a pass run on
        while the loop sleeps and starts later passes: a slow or hanging provider delays
        only its own tasks. Neither a provider's failures nor a store that cannot commit
        end it: a pass the store failed is tried again `STORE_RETRY_SECONDS` later.
        """
        self._check_open()
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                self.health.standby = True
                term = asyncio.create_task(self._term(), name="reconciler-term")
                await asyncio.wait({term, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not term.done() and self.health.standby:
                    term.cancel()  # stopped while waiting for the lock
                try:
                    await term
                except asyncio.CancelledError:
                    if not self._stop.is_set():
                        raise
                except StoreError as error:
                    if not self.health.standby:
                        raise
                    # The database did not answer the wait for the lock: wait a moment and
                    # ask again, serving meanwhile.
                    logger.warning("waiting to lead the loop failed (%s); trying again", error)
                    retry = after(self.clock.now(), LEADERSHIP_RETRY_SECONDS)
                    await self.clock.sleep_until(retry, self.alarm.rung)
        finally:
            stopping.cancel()
            self.health.standby = False

    async def _term(self) -> None:
        """Wait for the loop's lock, then run passes until `stop()` or the lock is lost."""
        async with self._leadership() as lost:
            self.health.standby = False
            if lost.is_set() or self._stop.is_set():
                return
            logger.info("this process runs the reconciler loop")
            ring = asyncio.create_task(_ring_on(lost, self.alarm))
            try:
                await self._passes(lost)
            finally:
                ring.cancel()
            if lost.is_set() and not self._stop.is_set():
                logger.error("lost the reconciler loop's lock; waiting to lead again")

    async def _passes(self, lost: asyncio.Event) -> None:
        alarm = self.alarm
        self.health.loop_running = True
        self._wait_in_memory = True
        try:
            async with asyncio.TaskGroup() as group:
                while not self._stop.is_set() and not lost.is_set():
                    # The pass sees every poll due by its start, so earlier rings are spent;
                    # during it only polls planned before its start could be missed (none
                    # are planned in the past); while the next due time is read, any may.
                    now = self.clock.now()
                    alarm.reset(now)
                    report = PassReport()
                    try:
                        await self._pass(group, report)
                        alarm.next_look = None
                        report.next_due_at = _next_look(
                            await self.service.next_due_at(), report, now
                        )
                    except* StoreError as failed:
                        # The store cannot commit or answer (full disk, database gone): the
                        # loop waits and tries again, so that it recovers by itself when
                        # the store does (SPEC §4); what it leased stays leased meanwhile.
                        logger.error(
                            "reconciler pass failed on the store (%s); trying again in %g s",
                            failed.exceptions[0],
                            STORE_RETRY_SECONDS,
                        )
                        report.next_due_at = after(now, STORE_RETRY_SECONDS)
                    alarm.next_look = report.next_due_at or _NEVER
                    if self._stop.is_set() or lost.is_set():
                        break
                    await self.clock.sleep_until(report.next_due_at, alarm.rung)
        except ExceptionGroup as failures:
            raise _first(failures) from None
        finally:
            self.health.loop_running = False
            self._wait_in_memory = False
            alarm.next_look = None

    async def run_once(self) -> PassReport:
        """One pass, awaited to the end: lease the due tasks chunk by chunk (each chunk's
        polls finish before the next is leased), batch, poll, settle."""
        self._check_open()
        report = PassReport()
        try:
            while not self._stop.is_set():
                async with asyncio.TaskGroup() as group:
                    leased = await self._pass(group, report)
                if leased < self.chunk:
                    break
        except ExceptionGroup as failures:
            raise _first(failures) from None
        report.next_due_at = await self.service.next_due_at()
        return report

    async def _pass(self, group: asyncio.TaskGroup, report: PassReport) -> int:
        """Lease one chunk and start its work in `group`; returns how many were leased."""
        now = self.clock.now()
        leased = await self._lease(now, report)
        until = now + timedelta(seconds=self.lease_seconds)  # as the store wrote it
        for task in leased:
            self._leases[task.ref] = until
        report.leased += len(leased)
        due = [task.next_poll_at for task in leased if task.next_poll_at is not None]
        self.health.lag_seconds = max(0.0, (now - min(due)).total_seconds()) if due else 0.0
        by_provider: dict[str, list[Task]] = {}
        for task in leased:
            by_provider.setdefault(task.provider, []).append(task)
        # Expiries and hand-backs are committed before the pass ends, so that the loop's
        # next `next_due_at` already sees them; only the polls outlive the pass.
        async with asyncio.TaskGroup() as writes:
            for name, tasks in by_provider.items():
                self._dispatch(group, writes, name, tasks, now, report)
        return len(leased)

    async def _lease(self, now: datetime, report: PassReport) -> list[Task]:
        """The due tasks this pass takes: the earliest `chunk` of them; or, while a polled
        provider has no room for more (`Lane.room`: its connections busy, a backlog waiting
        for them), up to each other provider's room of its own due tasks. The full one's
        backlog then stays in the database, due, until its exchanges end (each rings the
        alarm), rather than being leased, held past the horizon and handed back pass after
        pass; and it holds up no other provider's polls.

        Only `run()` holds batches in memory; `run_once()` takes the earliest chunk."""
        rooms = {}
        for name, lane in self._lanes.items():
            held = lane.limits.held_until(now) is not None
            # Nobody to ask, or a provider on hold: its due tasks are handed back at once.
            rooms[name] = lane.room() if lane.configured and not held else self.chunk
        report.full = {name for name, room in rooms.items() if room == 0}
        self._waiting_for_room = bool(report.full) and self._wait_in_memory
        if not self._waiting_for_room:
            return await self.service.lease_due(self.chunk, self.lease_seconds, now)
        wanted = {name: min(room, self.chunk) for name, room in rooms.items() if room > 0}
        async with asyncio.TaskGroup() as leases:  # concurrent: SQLite's writer takes them as one
            taken = {
                name: leases.create_task(
                    self.service.lease_due(limit, self.lease_seconds, now, name)
                )
                for name, limit in wanted.items()
            }
        leased = [task for job in taken.values() for task in job.result()]
        report.more = any(len(taken[name].result()) >= limit for name, limit in wanted.items())
        leased.sort(key=lambda task: task.next_poll_at or now)
        return leased

    def _dispatch(
        self,
        group: asyncio.TaskGroup,
        writes: asyncio.TaskGroup,
        name: str,
        tasks: list[Task],
        now: datetime,
        report: PassReport,
    ) -> None:
        """Start the batches the provider can take now in `group`; the others wait in its
        lane or are handed back in `writes`, due at the provider's projected slots."""
        lane = self._lanes.get(name)
        if lane is None or not lane.configured:
            # No adapter (a provider dropped from the code but still in the database), or
            # no base URL or credentials: nothing to ask. The tasks (created by callbacks
            # to a provider this deployment does not poll) still settle by webhook, or
            # expire at their deadline; this is not a rejected credential, so /readyz
            # stays green.
            logger.warning(
                "%s is not polled here (%s): %d task(s) left to webhooks until their deadline",
                name,
                "no adapter" if lane is None else "not configured",
                len(tasks),
            )
            for task in tasks:
                until = task.deadline_at
                writes.create_task(self._hand_back([task], until, report, held=True))
            return
        limits = lane.limits
        if limits.held_until(now) is not None:
            # A task at its deadline gets its last look only from a provider that answers.
            late = [task for task in tasks if now >= task.deadline_at]
            if late:
                writes.create_task(self._hand_back(late, now, report, held=True))
                tasks = [task for task in tasks if now < task.deadline_at]
        if self._wait_in_memory:
            tasks = lane.fill(tasks)  # into batches already waiting for their turn
        waiting: list[list[Task]] = []
        for batch in _batches(lane.provider, tasks):
            # Once one batch must wait, the later ones wait behind it: due order is kept.
            permit = None if waiting or lane.waiting else limits.start(now)
            if permit is not None:
                group.create_task(self._poll(lane, permit, batch, report))
            else:
                waiting.append(batch)
        self._publish(lane, now)
        # Batches due within the horizon wait for their slot in the lane (the lease covers
        # them); handing them back would cost a write and a pass each, which is what
        # capped a fast provider at one batch per pass.
        horizon = after(now, WAIT_HORIZON_SECONDS)
        held = limits.held_until(now) is not None
        for position, batch in enumerate(waiting, start=lane.waiting):
            slot = limits.slot_at(now, position)
            if self._wait_in_memory and not held and slot <= horizon:
                lane.queued(batch)
                group.create_task(self._poll_at(lane, batch, slot, report))
            else:
                writes.create_task(self._hand_back(batch, slot, report, held=held))

    async def _poll_at(
        self, lane: Lane, batch: list[Task], slot: datetime, report: PassReport
    ) -> None:
        """Start `batch` when its lane gives it a turn; hand it back if the provider is held
        meanwhile or no turn comes within the horizon. On shutdown the batch stays leased
        and is polled again when the lease ends."""
        try:
            turn = await lane.wait_turn(slot)
        finally:
            lane.dequeued(batch)
        if turn.permit is not None:
            await self._poll(lane, turn.permit, batch, report)
        elif turn.until is not None:
            await self._hand_back(batch, turn.until, report, held=turn.held)
        else:
            report.abandoned += len(batch)

    async def _hand_back(
        self,
        tasks: list[Task],
        until: datetime,
        report: PassReport,
        *,
        held: bool,
        met: ProviderError | None = None,
    ) -> None:
        """Give leased tasks back to the database, due at `until`. When the provider is
        `held` (Retry-After, breaker, pause, or nobody to ask), a task at its deadline gets
        no last look: it expires now instead of waiting past its deadline. `met`: the
        provider-wide answer (429, 401) their own exchange got, counted as their outcome."""
        now = self.clock.now()
        late = [task for task in tasks if held and now >= task.deadline_at]
        waiting = [task for task in tasks if not (held and now >= task.deadline_at)]
        leases = {
            t.ref: lease for t in tasks if (lease := self._leases.pop(t.ref, None)) is not None
        }
        async with asyncio.TaskGroup() as writes:  # concurrent, so the store commits them as one
            for task in late:
                writes.create_task(self.service.expire(task))
            if waiting:
                writes.create_task(self.service.defer(waiting, until, leases=leases, met=met))
        report.expired += len(late)
        report.deferred += len(waiting)

    # --- one batch ---------------------------------------------------------------------

    async def _poll(
        self, lane: Lane, permit: Permit, tasks: list[Task], report: PassReport
    ) -> None:
        """One batch exchange (already `start`ed), then its ending through the service.
        (Their commits ring the alarm if they plan a poll before the loop's next look.)"""
        report.batches += 1
        report.dispatched += len(tasks)
        ending = await exchange(
            lane, permit, tasks, stop=self._stop, metrics=self.metrics, sent=report.requests
        )
        if self._waiting_for_room:
            self.alarm.ring()  # room for a provider that had none: lease its next polls
        self._publish(lane, self.clock.now())
        try:
            await self._settle(lane, tasks, ending, report)
        except* StoreError as failed:
            # The store cannot commit (full disk, database gone): the answers are lost, the
            # tasks stay leased and are polled again when the lease ends.
            for task in tasks:
                self._leases.pop(task.ref, None)
            logger.error(
                "%s: could not record the polls of %d task(s) (%s); they are polled again "
                "when their lease ends",
                lane.name,
                len(tasks),
                failed.exceptions[0],
            )
            report.abandoned += len(tasks)

    async def _settle(
        self, lane: Lane, tasks: list[Task], ending: Ending, report: PassReport
    ) -> None:
        if ending.results is not None:
            for task in tasks:
                self._leases.pop(task.ref, None)
            by_id = {result.task_id: result for result in ending.results}
            results = [
                by_id.get(task.task_id)
                or PollResult(
                    task.task_id,
                    error=BadPayload(f"{lane.name}: the answer omits task {task.task_id}"),
                )
                for task in tasks
            ]
            # One store operation for the whole exchange.
            settled = await self.service.settle_polls(tasks, results)
            failed = [
                task
                for task, outcome in zip(tasks, settled, strict=True)
                if isinstance(outcome, Exception)
            ]
            report.settled += len(tasks) - len(failed)
            # Those whose last look, at the deadline, found them still running:
            report.expired += sum(
                1 for t in settled if isinstance(t, Task) and t.status is Status.EXPIRED
            )
            if failed:
                # A rule that chokes on one answer must not stop the loop, nor retry at once.
                error = ServerError("applying the poll result failed")
                await self.service.poll_failed(failed, error)
                report.backed_off += len(failed)
        elif ending.resume_at is not None:
            # A 429 or 401 holds the provider, not these tasks: they are counted with that
            # outcome and handed back, with no failure of their own to back off from.
            await self._hand_back(tasks, ending.resume_at, report, held=True, met=ending.error)
        elif ending.error is not None:
            for task in tasks:
                self._leases.pop(task.ref, None)
            written = await self.service.poll_failed(tasks, ending.error)
            report.backed_off += len(tasks)
            report.expired += sum(1 for task in written if task and task.status is Status.EXPIRED)
        else:
            report.abandoned += len(tasks)

    def _publish(self, lane: Lane, now: datetime) -> None:
        """Mirror a provider's breaker and pause into the loop's health (the gauges of
        /metrics are set from it when scraped)."""
        name, limits, health = lane.name, lane.limits, self.health
        if limits.breaker.state_at(now) is not BreakerState.CLOSED:
            health.breakers_open.add(name)
        else:
            health.breakers_open.discard(name)
        if limits.paused is not None:
            health.paused[name] = limits.paused
        else:
            health.paused.pop(name, None)


@contextlib.asynccontextmanager
async def _always_leading() -> AsyncIterator[asyncio.Event]:
    yield asyncio.Event()


async def _ring_on(lost: asyncio.Event, alarm: Alarm) -> None:
    await lost.wait()
    alarm.ring()


def _next_look(due: datetime | None, report: PassReport, now: datetime) -> datetime | None:
    """When the loop looks at the schedule again after `report`'s pass (which began at
    `now`): at the earliest due poll; but while a provider waits for room, its backlog is
    that poll, and it is looked at when one of its exchanges ends (the alarm) or, for the
    other providers' polls falling due meanwhile, within the horizon. A poll due in the
    future waits until `PASS_INTERVAL_SECONDS` after this pass began, so that polls falling
    due one after another (thousands a second in a burst) are leased a pass's worth at a
    time, not one pass (a lease, a commit) each; what is already due is looked at at once."""
    if due is None:
        return None
    if report.full and not report.more:
        due = max(due, after(now, WAIT_HORIZON_SECONDS))
    if due > now:
        due = max(due, after(now, PASS_INTERVAL_SECONDS))
    return due


def _batches(provider: Provider, tasks: Sequence[Task]) -> list[list[Task]]:
    """Tasks grouped by the adapter's batch key, cut to its batch size, in due order."""
    groups: dict[Hashable, list[Task]] = {}
    for task in tasks:
        groups.setdefault(provider.batch_key(task), []).append(task)
    size = max(1, provider.batch_size)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _first(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error inside (nested) task groups, to re-raise as itself."""
    leaf: BaseException = failures
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    if len(failures.exceptions) > 1:
        logger.error(
            "%d errors in the reconciler pass; raising the first", len(failures.exceptions)
        )
    return leaf


__all__ = ["Health", "PassReport", "Reconciler"]

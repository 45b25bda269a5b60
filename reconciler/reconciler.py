"""The reconciler loop (SPEC §3): sleep until the earliest due poll or a wake-up, lease the
due tasks in bounded chunks, batch them per provider, send the adapters' requests within
each provider's limits, and hand every answer to the service.

This module owns provider I/O: the HTTP clients, the per-provider limits (`limits.py`), the
timeouts, and the request metrics; and its own health (`Health`, read by the service as a
`LoopHealth`). It does not own timing rules (`schedule.py`, applied by the service), what
an answer means (the adapters) or storage (reached only through `Service`: `lease_due`,
`settle_poll`, `poll_failed`, `defer`, `expire`, `next_due_at`). It wakes on the feed's
`Alarm`, which commits ring, so nothing calls into it but `run`, `run_once` and `stop`.

The database is the queue. A pass leases at most `chunk` due tasks; a task's lease pushes
its `next_poll_at` forward, so a poll abandoned by a crash or a shutdown is simply retried
when the lease ends. Batches a provider cannot take now (token bucket empty, Retry-After,
open breaker, paused credentials, all its connections busy) are handed back due at the
provider's projected free slot, paced at its rate, so that nothing waits in memory, no
provider holds up another, and nothing spins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

import httpx

from reconciler.clock import Clock
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
    StoreError,
    TemporaryError,
    Timeout,
)
from reconciler.feed import Alarm
from reconciler.limits import (
    BreakerState,
    Outcome,
    Permit,
    ProviderLimits,
    after,
)
from reconciler.metrics import Metrics
from reconciler.model import Status, Task, iso
from reconciler.providers import PollFlow, PollResult, Provider
from reconciler.service import Service

logger = logging.getLogger(__name__)

# Batches a provider can take within this many seconds wait for their turn in memory;
# later ones are handed back to the database, due at their slot.
WAIT_HORIZON_SECONDS = 1.0
_NEVER = datetime.max.replace(tzinfo=UTC)

Step = httpx.Request | list[PollResult]


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
    next_due_at: datetime | None = None

    @property
    def provider_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class Health:
    """The loop's own account of itself: written here only, read by the service as its
    `LoopHealth` (`/readyz`, `/metrics`, `/stats`)."""

    loop_running: bool = False
    paused: dict[str, str] = field(default_factory=dict)  # provider -> why
    breakers_open: set[str] = field(default_factory=set)
    lag_seconds: float = 0.0  # how late the oldest task of the last pass was


class _Held(Exception):
    """The provider became unavailable in the middle of an exchange: stop, hand back."""

    def __init__(self, until: datetime) -> None:
        super().__init__(iso(until))
        self.until = until


class _Abandoned(Exception):
    """Shutting down while an exchange waited for its turn."""


@dataclass
class _Lane:
    provider: Provider
    limits: ProviderLimits
    auth: httpx.Auth | None = None
    client: httpx.AsyncClient | None = None
    # Batches whose slot has come but whose provider has all its exchanges in flight, in
    # arrival order: each exchange that ends wakes the first one still waiting.
    room_waiters: deque[asyncio.Event] = field(default_factory=deque)


@dataclass
class _Verdict:
    results: list[PollResult] | None = None
    error: ProviderError | None = None
    held_until: datetime | None = None  # hand the tasks back due then
    delay: float | None = None  # back the tasks off this long (None: schedule's backoff)


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
        transport: httpx.AsyncBaseTransport | None = None,
        chunk: int = 500,
        lease_seconds: float = 120.0,
    ) -> None:
        if chunk < 1 or lease_seconds <= 0:
            raise ValueError("chunk must be >= 1 and lease_seconds > 0")
        self.service = service
        self.providers = providers
        self.clock = clock
        self.alarm = alarm or Alarm()
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.chunk = chunk
        self.lease_seconds = lease_seconds
        self._transport = transport
        self._lanes = {
            name: _Lane(provider, ProviderLimits.from_settings(provider.settings))
            for name, provider in providers.items()
        }
        self._clients: list[httpx.AsyncClient] = []
        self._opened = False
        self._closed = False
        self._stop = asyncio.Event()
        self._slot_waiters: set[asyncio.Event] = set()  # batches waiting for their slot
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
        shared = None
        if self._transport is not None:
            # A test transport serves every provider; per-provider pools would not apply.
            shared = httpx.AsyncClient(transport=self._transport)
            self._clients.append(shared)
        for lane in self._lanes.values():
            settings = lane.provider.settings
            lane.auth = lane.provider.auth()
            if shared is not None:
                lane.client = shared
                continue
            # One pool per provider: a provider whose connections hang cannot take the
            # sockets another one needs. The concurrency limit is the pool size.
            lane.client = httpx.AsyncClient(
                timeout=httpx.Timeout(settings.request_timeout),
                limits=httpx.Limits(
                    max_connections=settings.concurrency,
                    max_keepalive_connections=settings.concurrency,
                ),
            )
            self._clients.append(lane.client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._closed = True
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()
        for lane in self._lanes.values():
            lane.client = None

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise RuntimeError("use the Reconciler inside `async with`, once")

    def stop(self) -> None:
        """Ask `run()` to return: no new polls start, waits for a turn are abandoned, and
        polls already talking to their provider finish (bounded by its request timeout)."""
        self._stop.set()
        self.alarm.ring()
        for wake in self._slot_waiters:
            wake.set()

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Passes until `stop()`, sleeping until the earliest due poll or a wake-up.

        Polls started by a pass run on while the loop sleeps and starts later passes: a slow
        or hanging provider delays only its own tasks. A store error ends the loop (and the
        process, through the runtime); a provider's failures never do.
        """
        self._check_open()
        alarm = self.alarm
        self.health.loop_running = True
        self._wait_in_memory = True
        try:
            async with asyncio.TaskGroup() as group:
                while not self._stop.is_set():
                    # The pass sees every poll due by its start, so earlier rings are spent;
                    # during it only polls planned before its start could be missed (none
                    # are planned in the past); while the next due time is read, any may.
                    alarm.reset(self.clock.now())
                    report = PassReport()
                    await self._pass(group, report)
                    alarm.next_look = None
                    report.next_due_at = await self.service.next_due_at()
                    alarm.next_look = report.next_due_at or _NEVER
                    if self._stop.is_set():
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
        polls finish before the next is leased), expire, batch, poll, settle."""
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
        leased = await self.service.lease_due(self.chunk, self.lease_seconds)
        report.leased += len(leased)
        self._record_lag(now, leased)
        by_provider: dict[str, list[Task]] = {}
        for task in leased:
            by_provider.setdefault(task.provider, []).append(task)
        # Expiries and hand-backs are committed before the pass ends, so that the loop's
        # next `next_due_at` already sees them; only the polls outlive the pass.
        async with asyncio.TaskGroup() as writes:
            for name, tasks in by_provider.items():
                self._dispatch(group, writes, name, tasks, now, report)
        return len(leased)

    def _record_lag(self, now: datetime, leased: Sequence[Task]) -> None:
        due = [task.next_poll_at for task in leased if task.next_poll_at is not None]
        self.health.lag_seconds = max(0.0, (now - min(due)).total_seconds()) if due else 0.0

    def _dispatch(
        self,
        group: asyncio.TaskGroup,
        writes: asyncio.TaskGroup,
        name: str,
        tasks: list[Task],
        now: datetime,
        report: PassReport,
    ) -> None:
        """Start the batches the provider can take now in `group`; hand the rest back in
        `writes`, due at the provider's projected slots."""
        lane = self._lanes.get(name)
        if lane is None or not lane.provider.settings.configured:
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
        if lane.limits.held_until(now) is not None:
            # A task at its deadline gets its last look only from a provider that answers.
            late = [task for task in tasks if now >= task.deadline_at]
            if late:
                writes.create_task(self._hand_back(late, now, report, held=True))
                tasks = [task for task in tasks if now < task.deadline_at]
        held: list[list[Task]] = []
        for batch in _batches(lane.provider, tasks):
            # Once one batch must wait, the later ones wait behind it: due order is kept.
            permit = None if held else lane.limits.start(now)
            if permit is not None:
                report.batches += 1
                report.dispatched += len(batch)
                group.create_task(self._poll_batch(lane, permit, batch, report))
            else:
                held.append(batch)
        self._publish(lane, now)
        # The n-th held batch is due when the provider is free and has had time for n more
        # requests; never at `now` itself, so a provider whose connections are all busy is
        # not asked again at once. Batches due within the horizon wait for their slot in
        # memory (the lease covers them); handing them back would cost a write and a pass
        # each, which is what capped a fast provider at one batch per pass.
        rate = lane.limits.bucket.rate
        horizon = after(now, WAIT_HORIZON_SECONDS)
        for position, batch in enumerate(held):
            until = max(lane.limits.slot_at(now, position), after(now, (position + 1) / rate))
            if self._wait_in_memory and until <= horizon and lane.limits.held_until(now) is None:
                group.create_task(self._poll_at(lane, batch, until, report))
            else:
                writes.create_task(self._hand_back(batch, until, report, held=False))

    async def _poll_at(
        self, lane: _Lane, batch: list[Task], slot: datetime, report: PassReport
    ) -> None:
        """Start `batch` at its `slot` (or as soon after as the provider allows, within
        the horizon); hand it back if the provider is held meanwhile. On shutdown the batch
        stays leased and is retried when the lease ends."""
        limits = lane.limits
        give_up = after(self.clock.now(), WAIT_HORIZON_SECONDS)
        # Thousands of these may wait at once: each on an Event of its own, since waiters
        # of one shared Event are removed from its queue one by one (quadratic at a timeout).
        # `stop()` sets every one of them.
        wake = asyncio.Event()
        self._slot_waiters.add(wake)
        when: datetime | None = slot
        try:
            while True:
                await self.clock.sleep_until(when, wake)
                if self._stop.is_set():
                    report.abandoned += len(batch)
                    return
                wake.clear()
                now = self.clock.now()
                permit = limits.start(now)
                if permit is not None:
                    break
                ready = limits.ready_at(now)
                if ready is None and (now < give_up or limits.probing):
                    # Only the concurrency limit or a probe in flight is in the way: wait for
                    # an exchange to end rather than asking again on a timer (thousands of
                    # batches asking every 1/rate seconds took a sixth of the loop's CPU).
                    # A probe's verdict is waited for past the horizon: these batches are
                    # the ones it held, and they go as soon as it says the provider is back.
                    lane.room_waiters.append(wake)
                    when = None if limits.probing else give_up
                    continue
                if limits.held_until(now) is not None:
                    await self._hand_back(batch, limits.slot_at(now, 0), report, held=True)
                    return
                retry = ready or after(now, 1 / limits.bucket.rate)
                if retry > give_up:
                    await self._hand_back(batch, retry, report, held=False)
                    return
                when = retry
        finally:
            self._slot_waiters.discard(wake)
        report.batches += 1
        report.dispatched += len(batch)
        await self._poll_batch(lane, permit, batch, report)

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
        report.expired += len(late)
        report.deferred += len(waiting)
        async with asyncio.TaskGroup() as writes:  # concurrent, so the store commits them as one
            for task in late:
                writes.create_task(self.service.expire(task))
            if waiting:
                writes.create_task(self.service.defer(waiting, until, met=met))

    def _wake(self, lane: _Lane, *, everyone: bool) -> None:
        """An exchange ended: the first batch still waiting for room may try to start, or
        after a probe's verdict every waiting batch (those it held go at once, at the rate;
        if it failed they find the provider held and are handed back)."""
        while lane.room_waiters:
            wake = lane.room_waiters.popleft()
            if wake in self._slot_waiters and not wake.is_set():
                wake.set()
                if not everyone:
                    return

    # --- one batch ---------------------------------------------------------------------

    async def _poll_batch(
        self, lane: _Lane, permit: Permit, tasks: list[Task], report: PassReport
    ) -> None:
        """One batch exchange (already `start`ed), then its results through the service.
        (Their commits ring the alarm if they plan a poll before the loop's next look.)"""
        verdict = await self._exchange_batch(lane, permit, tasks, report)
        if verdict.results is not None:
            await self._settle(lane, tasks, verdict.results, report)
        elif verdict.held_until is not None:
            # A 429 or 401 holds the provider, not these tasks: they are counted with that
            # outcome and handed back, with no failure of their own to back off from.
            until = verdict.held_until
            await self._hand_back(tasks, until, report, held=True, met=verdict.error)
        elif verdict.error is not None:
            report.backed_off += len(tasks)
            written = await self.service.poll_failed(tasks, verdict.error, verdict.delay)
            report.expired += sum(1 for task in written if task and task.status is Status.EXPIRED)
        else:
            report.abandoned += len(tasks)

    async def _exchange_batch(
        self, lane: _Lane, permit: Permit, tasks: list[Task], report: PassReport
    ) -> _Verdict:
        """Run the adapter's flow and classify how it ended; `limits.finish` is always
        called, also when cancelled, so that no probe or concurrency slot leaks."""
        name = lane.provider.name
        outcome = Outcome.ABANDONED
        retry_after: float | None = None
        reason: str | None = None
        verdict = _Verdict()
        until: datetime | None = None
        try:
            try:
                results = await self._exchange(lane, tasks, report)
            except NotFound as error:
                # Single-task adapters say "unknown task" for the whole exchange.
                results = [PollResult(task.task_id, error=error) for task in tasks]
            outcome = Outcome.SUCCESS
            verdict = _Verdict(results=results)
        except RateLimited as error:
            outcome, retry_after = Outcome.RATE_LIMITED, error.retry_after
            verdict = _Verdict(error=error)
        except AuthRejected as error:
            outcome, reason = Outcome.REJECTED, str(error)
            verdict = _Verdict(error=error)
        except ProviderError as error:
            outcome = Outcome.FAILURE
            logger.warning("%s: a poll of %d task(s) failed: %s", name, len(tasks), error)
            delay = error.delay if isinstance(error, TemporaryError) else None
            verdict = _Verdict(error=error, delay=delay)
        except _Held:
            verdict = _Verdict(held_until=lane.limits.resume_at(self.clock.now()))
        except _Abandoned:
            pass
        finally:
            now = self.clock.now()
            until = lane.limits.finish(now, permit, outcome, retry_after=retry_after, reason=reason)
            self._publish(lane, now)
            self._wake(lane, everyone=permit.probe)
        if until is not None:
            # The tasks of the exchange that met the hold come back with the provider.
            verdict = _Verdict(error=verdict.error, held_until=lane.limits.resume_at(now))
            if outcome is Outcome.RATE_LIMITED:
                logger.warning("%s: rate limited, holding requests until %s", name, iso(until))
            else:
                logger.error(
                    "%s: credentials rejected, next probe at %s: %s", name, iso(until), reason
                )
        return verdict

    async def _exchange(
        self, lane: _Lane, tasks: list[Task], report: PassReport
    ) -> list[PollResult]:
        """Drive the sans-I/O flow: each request it yields is sent within the limits (the
        first on the token `start` took), each response sent back in."""
        flow = _start(lane.provider, tasks)
        try:
            step = _advance(lane.provider.name, flow, None)
            first = True
            while isinstance(step, httpx.Request):
                if not first:
                    await self._take_turn(lane)
                first = False
                response = await self._send(lane, step, report)
                step = _advance(lane.provider.name, flow, response)
            return step
        finally:
            flow.close()

    async def _take_turn(self, lane: _Lane) -> None:
        while True:
            if self._stop.is_set():
                raise _Abandoned()
            now = self.clock.now()
            stopped = lane.limits.stopped_until(now)
            if stopped is not None:
                raise _Held(stopped)
            wait_until = lane.limits.take_turn(now)
            if wait_until is None:
                return
            await self.clock.sleep_until(wait_until, self._stop)

    async def _send(
        self, lane: _Lane, request: httpx.Request, report: PassReport
    ) -> httpx.Response:
        provider = lane.provider
        assert lane.client is not None, "the Reconciler is not open"
        seconds = provider.settings.request_timeout
        request.extensions["timeout"] = httpx.Timeout(seconds).as_dict()
        metrics = self.metrics
        async with lane.limits.semaphore:
            started = time.perf_counter()
            status = "error"
            try:
                async with asyncio.timeout(seconds):
                    response = await lane.client.send(request, auth=lane.auth)
                status = str(response.status_code)
                return response
            except (TimeoutError, httpx.TimeoutException):
                status = "timeout"
                raise Timeout(f"{provider.name}: no answer within {seconds:g} s") from None
            except httpx.HTTPError as error:
                # Connection refused, reset, protocol errors: the provider is not answering.
                raise ServerError(f"{provider.name}: {type(error).__name__}: {error}") from None
            finally:
                # The path only: never headers (Authorization) in logs.
                logger.debug(
                    "%s %s %s -> %s", provider.name, request.method, request.url.path, status
                )
                report.requests[provider.name] += 1
                metrics.provider_requests.labels(provider.name, status).inc()
                metrics.provider_latency.labels(provider.name).observe(
                    time.perf_counter() - started
                )

    async def _settle(
        self, lane: _Lane, tasks: list[Task], results: list[PollResult], report: PassReport
    ) -> None:
        by_id = {result.task_id: result for result in results}
        async with asyncio.TaskGroup() as group:  # concurrent, so the store commits them as one
            for task in tasks:
                result = by_id.get(task.task_id) or PollResult(
                    task.task_id,
                    error=BadPayload(f"{lane.provider.name}: the answer omits task {task.task_id}"),
                )
                group.create_task(self._settle_one(task, result, report))

    async def _settle_one(self, task: Task, result: PollResult, report: PassReport) -> None:
        try:
            settled = await self.service.settle_poll(task, result)
        except StoreError:
            raise
        except Exception:
            # A rule that chokes on one answer must not stop the loop, nor retry at once.
            logger.exception("%s: applying its poll result failed", task.ref)
            report.backed_off += 1
            await self.service.poll_failed([task], ServerError("applying the poll result failed"))
            return
        report.settled += 1
        if settled is not None and settled.status is Status.EXPIRED:
            report.expired += 1  # its last look, at the deadline, found it still running

    def _publish(self, lane: _Lane, now: datetime) -> None:
        """Mirror a provider's breaker and pause into the loop's health (the gauges of
        /metrics are set from it when scraped)."""
        name, limits, health = lane.provider.name, lane.limits, self.health
        if limits.breaker.state_at(now) is not BreakerState.CLOSED:
            health.breakers_open.add(name)
        else:
            health.breakers_open.discard(name)
        if limits.paused is not None:
            health.paused[name] = limits.paused
        else:
            health.paused.pop(name, None)


def _batches(provider: Provider, tasks: Sequence[Task]) -> list[list[Task]]:
    """Tasks grouped by the adapter's batch key, cut to its batch size, in due order."""
    groups: dict[Hashable, list[Task]] = {}
    for task in tasks:
        groups.setdefault(provider.batch_key(task), []).append(task)
    size = max(1, provider.batch_size)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _start(provider: Provider, tasks: Sequence[Task]) -> PollFlow:
    try:
        return provider.poll(tasks)
    except ProviderError:
        raise
    except Exception as error:  # see `_advance`
        logger.exception("%s: the adapter failed to start a poll", provider.name)
        raise ServerError(
            f"{provider.name}: the adapter failed ({type(error).__name__})"
        ) from error


def _advance(name: str, flow: PollFlow, response: httpx.Response | None) -> Step:
    """The flow's next request, or its results when it is done."""
    try:
        return next(flow) if response is None else flow.send(response)
    except StopIteration as done:
        results: list[PollResult] = done.value
        return results
    except ProviderError:
        raise
    except Exception as error:
        # An adapter bug or an answer it did not foresee: counted like an unreadable answer
        # (backoff, breaker) instead of ending the loop.
        logger.exception("%s: the adapter failed on an answer", name)
        raise ServerError(f"{name}: the adapter failed ({type(error).__name__})") from error


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

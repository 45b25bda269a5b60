"""Use cases: ingest a webhook, register a task, settle a poll, poll now, read tasks and
events.

This is where the pure rules (`state`, `schedule`), the adapters (`providers`) and the
store meet. The API and the reconciler loop call only this module; neither touches the store
or an adapter's parsing directly. Every write is one `store.apply`/`store.ingest` whose
`decide` closure is pure, so the store can batch it into a group commit.

The service does not drive the loop. Every commit tells the feed the earliest poll it
planned, and the feed's alarm wakes the loop (on whichever replica runs it); "poll now" is
such a commit plus a wait for the task to change. What the loop says about itself
(`LoopHealth`) is the loop's own, read here for `/readyz`, `/metrics` and `/stats`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from reconciler import codec, schedule
from reconciler.clock import Clock
from reconciler.config import MAX_DURATION_SECONDS, Settings
from reconciler.errors import BadPayload, ProviderError, ReconcilerError, StoreError, Verdict
from reconciler.feed import Feed
from reconciler.metrics import Metrics
from reconciler.model import (
    Change,
    EventRow,
    EventType,
    Observation,
    Pruned,
    RowKind,
    Source,
    Status,
    Task,
    TaskRef,
    iso,
    parse_iso,
)
from reconciler.providers import PollResult, Provider, RawDelivery
from reconciler.schedule import Timing
from reconciler.state import Registration, expire, fail, merge, new_task, register
from reconciler.store import Store
from reconciler.store.base import (
    Accepted,
    Applying,
    ApplyResult,
    IngestResult,
    ListPosition,
    NewDelivery,
    Rejected,
)

logger = logging.getLogger(__name__)

MAX_TASK_ID_LENGTH = 256
# The longest deadline a registration may ask for. Ten years is past any generation job, and
# keeps the deadline (and every poll planned before it) well inside what a datetime holds.
MAX_DEADLINE_SECONDS = MAX_DURATION_SECONDS
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NOT_FOUND_ERROR = "not found at provider"
RESULT_MISSING_ERROR = "the provider reported success but gave no result URL"
# Headers worth keeping with a delivery: enough to re-verify a signature or trace a sender.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-webhook-timestamp",
    "x-webhook-signature",
    "x-forwarded-for",
)


class Invalid(ReconcilerError):
    """A client request that names a bad field (422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownTask(ReconcilerError):
    pass


class CursorExpired(ReconcilerError):
    """A reader's cursor fell off the log: retention pruned events it has not read (410).

    `after` has fallen off when `after < oldest_seq - 1`, `oldest_seq` being the seq of the
    oldest kept event, or the seq the next event will get when retention pruned every one.
    `after=0` never falls off: it means "from the oldest kept event"."""

    def __init__(self, after: int, oldest_seq: int) -> None:
        super().__init__(
            f"events after seq {after} were pruned: the oldest kept event is seq {oldest_seq}; "
            f"read again from after={oldest_seq - 1} (or after=0)"
        )
        self.after = after
        self.oldest_seq = oldest_seq


# The longest "poll now" waits for its answer (as `GET /tasks/…?wait=` at most).
POLL_NOW_MAX_WAIT_SECONDS = 60.0


class LoopHealth(Protocol):
    """What the reconciler loop says about itself. The loop owns and writes it; the service
    and, through it, `/readyz`, `/metrics` and `/stats` only read it."""

    @property
    def loop_running(self) -> bool: ...

    @property
    def standby(self) -> bool: ...  # another replica runs the loop; this one waits to

    @property
    def paused(self) -> Mapping[str, str]: ...  # provider -> why (credentials rejected)

    @property
    def breakers_open(self) -> AbstractSet[str]: ...

    @property
    def lag_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class NoLoop:
    """The health of a service with no loop attached (tools, and tests of the API alone)."""

    loop_running: bool = False
    standby: bool = False
    paused: Mapping[str, str] = field(default_factory=dict)
    breakers_open: AbstractSet[str] = frozenset()
    lag_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


# How a task was settled, per provider: by its callback, recovered by a poll, or given up on
# by the reconciler. "open" counts the tasks not settled yet.
SETTLED_BY = ("callback", "poll", "failed", "expired", "open")


def settled_by(status: Status, source: Source) -> str:
    """Which `SETTLED_BY` bucket a task with this status and last source belongs to."""
    if not status.terminal:
        return "open"
    if status is Status.EXPIRED:
        return "expired"
    if source is Source.POLL:
        return "poll"
    if source is Source.RECONCILER:
        return "failed"  # e.g. not found at the provider, or success without a result
    # WEBHOOK, and REGISTER: a registration that arrives after the task settled becomes its
    # last source. Such a task was created by a callback (nothing else creates unregistered
    # tasks), so the callback is by far the likeliest settler; the row keeps no better record.
    return "callback"


@dataclass(frozen=True, slots=True)
class Overview:
    tasks: Mapping[tuple[str, str], int]  # (provider, status) -> count
    settled: Mapping[str, Mapping[str, int]]  # provider -> SETTLED_BY word -> count
    lag_seconds: float
    last_seq: int


def valid_task_id(task_id: str) -> str | None:
    """Why `task_id` is unusable, or None when it is fine."""
    if not task_id:
        return "the task id is empty"
    if len(task_id) > MAX_TASK_ID_LENGTH:
        return f"the task id is longer than {MAX_TASK_ID_LENGTH} characters"
    if _CONTROL.search(task_id):
        return "the task id contains control characters"
    return None


class Service:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Mapping[str, Provider],
        clock: Clock,
        feed: Feed,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        health: LoopHealth | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.clock = clock
        self.feed = feed
        self.metrics = metrics or Metrics()
        self.rng = rng or random.Random()
        self.timings = {name: Timing.of(p.settings) for name, p in providers.items()}
        self._health: LoopHealth = health or NoLoop()

    @property
    def health(self) -> LoopHealth:
        return self._health

    # --- webhooks ----------------------------------------------------------------------

    def provider(self, name: str) -> Provider | None:
        return self.providers.get(name)

    def verify(self, provider: str, headers: Mapping[str, str], body: bytes) -> None:
        """Check the provider's own signature; raises `SignatureError`."""
        self.providers[provider].verify(RawDelivery(headers, body))

    async def ingest(self, provider: str, headers: Mapping[str, str], body: bytes) -> IngestResult:
        kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
        delivery = NewDelivery(
            provider, self.clock.now(), kept, body, hashlib.sha256(body).hexdigest()
        )
        result = await self.store.ingest(delivery, self.interpret)
        self.metrics.delivered(provider, result.outcome.value)
        return result

    def interpret(self, delivery: NewDelivery) -> Accepted | Rejected:
        """Pure: what a stored delivery says, as a decision for the store to apply."""
        adapter = self.providers[delivery.provider]
        try:
            payload = codec.loads(delivery.body)
        except RecursionError:
            return Rejected("invalid_json", "the body nests JSON too deeply to be read")
        except ValueError as error:  # includes UnicodeDecodeError
            return Rejected("invalid_json", f"the body is not valid UTF-8 JSON: {error}")
        try:
            observation = adapter.parse_callback(payload)
        except RecursionError:
            return Rejected("bad_payload", "the body nests too deeply to be read")
        except BadPayload as error:
            return Rejected("bad_payload", str(error))
        problem = valid_task_id(observation.task_id)
        if problem:
            return Rejected("bad_payload", f"{delivery.provider}: {problem}")
        candidates = [TaskRef(delivery.provider, observation.task_id)]
        external = observation.external_task_id
        if external and external != observation.task_id and not valid_task_id(external):
            candidates.append(TaskRef(delivery.provider, external))
        now = delivery.received_at

        def decide(task: Task | None) -> Change | None:
            return self._observe(candidates[0], task, observation, Source.WEBHOOK, now)

        return Accepted(candidates, decide)

    async def replay(
        self, delivery_ids: Sequence[int] | None = None, failed: bool = False
    ) -> list[IngestResult]:
        if delivery_ids is None:
            stored = await self.store.deliveries(rejected_only=failed)
            delivery_ids = [delivery.id for delivery in stored]
        return [await self.store.replay(did, self.interpret) for did in delivery_ids]

    # --- rules with timing -------------------------------------------------------------

    def _observe(
        self,
        ref: TaskRef,
        task: Task | None,
        observation: Observation,
        source: Source,
        now: datetime,
        rng: random.Random | None = None,
    ) -> Change:
        timing = self.timings[ref.provider]
        created = task is None
        if task is None:
            action = observation.action or self.providers[ref.provider].default_action
            task = new_task(ref, action, now, timing.deadline, source)
        change = merge(task, observation, now, source, self.settings.progress_event_interval)
        updated = change.task
        if source is Source.POLL:
            if updated.poll_failures:
                updated = updated.replace(poll_failures=0)
            if schedule.result_missing_expired(updated, now, timing):
                failed = fail(updated, now, RESULT_MISSING_ERROR)
                if failed is not None:
                    return self._planned(failed, None)
            next_at = schedule.after_poll(updated, now, timing, rng or self.rng)
        elif created or change.event is not None or updated.next_poll_at is None:
            next_at = schedule.first_poll(updated, now, timing)  # the webhook re-plans
        else:
            next_at = updated.next_poll_at
        if created:
            event = change.event or EventType.for_status(updated.status)
            change = Change(updated, event, None)
        return self._planned(Change(updated, change.event, change.previous_status), next_at)

    @staticmethod
    def _planned(change: Change, next_at: datetime | None) -> Change:
        task = change.task
        next_at = None if task.terminal else next_at
        return Change(task.replace(next_poll_at=next_at), change.event, change.previous_status)

    # --- registration ------------------------------------------------------------------

    async def register(
        self,
        provider: str,
        task_id: str,
        action: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        deadline_seconds: float | None = None,
    ) -> tuple[Task, bool]:
        """Track a task; returns it and whether it is new. Idempotent."""
        if provider not in self.providers:
            raise Invalid("provider", f"unknown provider {provider!r}")
        problem = valid_task_id(task_id)
        if problem:
            raise Invalid("task_id", problem)
        if deadline_seconds is not None and not 0 < deadline_seconds <= MAX_DEADLINE_SECONDS:
            raise Invalid(
                "deadline_seconds",
                f"deadline_seconds must be more than 0 and at most {MAX_DEADLINE_SECONDS:.0f} "
                "(ten years)",
            )
        problem = codec.flaw(metadata or {}, "metadata")
        if problem:
            raise Invalid("metadata", problem)
        timing = self.timings[provider]
        adapter = self.providers[provider]
        now = self.clock.now()
        request = Registration(TaskRef(provider, task_id), action, metadata or {}, deadline_seconds)

        def decide(task: Task | None) -> Change | None:
            change = register(task, request, now, adapter.default_action, timing.deadline)
            if change is None:
                return None
            next_at = change.task.next_poll_at or schedule.first_poll(change.task, now, timing)
            if next_at is not None:
                next_at = min(next_at, change.task.deadline_at)
            return self._planned(change, next_at)

        result = await self.store.apply([request.ref], decide)
        if result.task is None:  # registering an existing task that changed nothing
            task = await self.store.get_task(request.ref)
            assert task is not None
            return task, False
        return result.task, result.created

    # --- polling (called by the reconciler loop) ---------------------------------------

    async def lease_due(
        self,
        limit: int,
        lease_seconds: float,
        now: datetime | None = None,
        provider: str | None = None,
    ) -> list[Task]:
        """Take up to `limit` due tasks (of `provider` only, if given) for a poll; each is
        held (its `next_poll_at` moved to `now + lease_seconds`) until its poll's result, a
        hand-back, or the lease's end."""
        return await self.store.lease_due(now or self.clock.now(), limit, lease_seconds, provider)

    async def next_due_at(self) -> datetime | None:
        return await self.store.next_due_at()

    async def expire(self, task: Task) -> Task | None:
        now = self.clock.now()
        result = await self.store.apply([task.ref], lambda current: _maybe(current, expire, now))
        return result.task

    async def settle_polls(
        self, tasks: Sequence[Task], results: Sequence[PollResult]
    ) -> list[Task | Exception | None]:
        """Apply one exchange's results, one per task (an observation, or a task-level
        error), as one store operation. Per task: the task as written (None if it was gone
        or already terminal), or the exception its rule raised."""
        now = self.clock.now()
        self._count_polls(
            (task.provider, "observed" if result.error is None else result.error.outcome)
            for task, result in zip(tasks, results, strict=True)
        )
        rng = schedule.OneDraw(self.rng)  # one jitter for the exchange's tasks

        def deciding(task: Task, result: PollResult) -> Applying:
            ref = task.ref
            timing = self.timings[ref.provider]

            def decide(current: Task | None) -> Change | None:
                if current is None or current.terminal:
                    return None
                # The answer first, then the deadline: a poll at the deadline is the task's
                # last look, and a video finished by then is kept rather than thrown away.
                if result.observation is not None:
                    observation = result.observation
                    change = self._observe(ref, current, observation, Source.POLL, now, rng)
                else:
                    change = self._task_error(current, result.error, now, timing, rng)
                return _expired_at_deadline(current, change, now)

            return Applying([ref], decide)

        applied = await self.store.apply_many(
            [deciding(task, result) for task, result in zip(tasks, results, strict=True)]
        )
        return [_written(result) for result in applied]

    def _count_polls(self, outcomes: Iterable[tuple[str, str]]) -> None:
        """Count poll results, a (provider, outcome) per task: one increment per pair."""
        for (provider, outcome), count in Counter(outcomes).items():
            self.metrics.polled(provider, outcome, count)

    def _task_error(
        self,
        current: Task,
        error: ProviderError | None,
        now: datetime,
        timing: Timing,
        rng: random.Random,
    ) -> Change:
        """A poll whose answer concerned this task but carried no observation of it."""
        counted = current.replace(
            polls=current.polls + 1,
            version=current.version + 1,
            poll_failures=current.poll_failures + 1,
        )
        if error is not None and error.verdict is Verdict.ANSWERED:  # unknown there (yet)
            if schedule.not_found_expired(current, now, timing):
                failed = fail(counted, now, NOT_FOUND_ERROR)
                return self._planned(failed or Change(counted, None), None)
            next_at = schedule.after_not_found(counted, now, timing, rng)
            return self._planned(Change(counted, None), next_at)
        delay = error.delay if error is not None else None
        next_at = schedule.after_error(current, now, timing, rng, delay)
        return self._planned(Change(counted, None), next_at)

    async def poll_failed(self, tasks: Sequence[Task], error: ProviderError) -> list[Task | None]:
        """A whole exchange failed: back each task off (by the error's `delay` when the
        provider said). Returns the tasks as written (None for those gone or terminal)."""
        delay = error.delay
        now = self.clock.now()
        self._count_polls((task.provider, error.outcome) for task in tasks)
        timing_of = self.timings
        rng = schedule.OneDraw(self.rng)  # one jitter for the exchange's tasks

        def backoff(ref: TaskRef) -> Callable[[Task | None], Change | None]:
            def decide(current: Task | None) -> Change | None:
                if current is None or current.terminal:
                    return None
                timing = timing_of[ref.provider]
                failures = current.poll_failures + 1
                counted = current.replace(poll_failures=failures, version=current.version + 1)
                next_at = schedule.after_error(current, now, timing, rng, delay)
                # A failed last look is the end: planned at the deadline, it would be due
                # again at once, and polled again, for as long as the provider fails.
                planned = self._planned(Change(counted, None), next_at)
                return _expired_at_deadline(current, planned, now)

            return decide

        applied = await self.store.apply_many([Applying([t.ref], backoff(t.ref)) for t in tasks])
        return [None if isinstance(result, Exception) else result.task for result in applied]

    async def defer(
        self,
        tasks: Sequence[Task],
        until: datetime,
        *,
        leases: Mapping[TaskRef, datetime] | None = None,
        met: ProviderError | None = None,
    ) -> None:
        """Hand leased tasks back due at `until` (see `schedule.handed_back`) without counting
        a failed poll: the loop held them for a provider's own limits (rate, Retry-After,
        breaker, pause), not because anything went wrong with them. With `leases` (each task's
        poll time as its lease wrote it), only a task still under that lease is handed back:
        one that a webhook re-planned, or `poll` made due, meanwhile keeps its new time.
        `met`: the provider-wide answer their exchange got (429, 401), counted as their
        outcome."""
        now = self.clock.now()
        if met is not None:
            self._count_polls((task.provider, met.outcome) for task in tasks)

        def hold(leased_until: datetime | None) -> Callable[[Task | None], Change | None]:
            def decide(current: Task | None) -> Change | None:
                if current is None or current.terminal:
                    return None
                if leased_until is not None and current.next_poll_at != leased_until:
                    return None  # no longer under the lease this loop took
                due = schedule.handed_back(current, now, until)
                return Change(current.replace(next_poll_at=due), None)

            return decide

        leased = leases or {}
        await self.store.apply_many([Applying([t.ref], hold(leased.get(t.ref))) for t in tasks])

    async def poll_now(self, ref: TaskRef) -> Task:
        """`POST /tasks/…/poll`: make the task due now and wait for it to change. The commit
        wakes the loop (the feed's alarm, on whichever replica runs it), which polls the
        task within its provider's limits. The task is answered as it is when its provider
        is not configured for polling or known to be held, or when the wait (twice the
        provider's request timeout, at most a minute) ends first."""
        task = await self._known(ref)
        adapter = self.providers.get(ref.provider)
        health = self.health
        if (
            task.terminal
            or adapter is None
            or not adapter.settings.configured
            or ref.provider in health.paused
            or ref.provider in health.breakers_open
        ):
            return task  # nobody to ask now
        now = self.clock.now()

        def due_now(current: Task | None) -> Change | None:
            if current is None or current.terminal:
                return None
            return Change(current.replace(next_poll_at=now), None)

        made = (await self.store.apply([ref], due_now)).task
        if made is None:  # it became terminal meanwhile
            return await self._known(ref)
        seconds = min(POLL_NOW_MAX_WAIT_SECONDS, 2 * adapter.settings.request_timeout)
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            seen = self.feed.commits
            current = await self._known(ref)
            remaining = deadline - asyncio.get_running_loop().time()
            # The schedule's own writes (due now, the lease, a hand-back) keep the version;
            # a poll's result, or a webhook meanwhile, moves it.
            if current.version != made.version or current.terminal or remaining <= 0:
                return current
            await self.feed.wait_commit(seen, remaining)

    async def _known(self, ref: TaskRef) -> Task:
        task = await self.store.get_task(ref)
        if task is None:  # pruned, or never there
            raise UnknownTask(f"no task {ref}")
        return task

    # --- reads -------------------------------------------------------------------------

    async def get_task(self, ref: TaskRef, wait: float = 0.0) -> Task | None:
        """The task; with `wait`, as soon as it is terminal or when the wait ends."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            seen = self.feed.last_seq
            task = await self.store.get_task(ref)
            remaining = deadline - asyncio.get_running_loop().time()
            if task is None or task.terminal or remaining <= 0:
                return task
            await self.feed.wait(seen, remaining)

    async def list_tasks(
        self,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        before = _decode_cursor(cursor) if cursor else None
        tasks = await self.store.list_tasks(status, provider, limit + 1, before)
        next_cursor = None
        if len(tasks) > limit:
            tasks = tasks[:limit]
            last = tasks[-1]
            next_cursor = _encode_cursor((last.created_at, last.provider, last.task_id))
        return Page(tasks, next_cursor)

    async def events(
        self,
        after: int,
        limit: int,
        provider: str | None = None,
        task_id: str | None = None,
        wait: float = 0.0,
    ) -> list[EventRow]:
        """Events after `after` in seq order; with `wait`, block until one arrives."""
        deadline = asyncio.get_running_loop().time() + wait
        cursor = after
        while True:
            seen = self.feed.last_seq
            rows = await self.store.events_after(cursor, limit, provider, task_id)
            if cursor == after:
                await self.check_cursor(after, rows)
            remaining = deadline - asyncio.get_running_loop().time()
            if rows or remaining <= 0:
                return rows
            # Nothing matched up to `seen`: skip past it and wait for newer events.
            cursor = max(cursor, seen)
            await self.feed.wait(seen, remaining)

    async def last_seq(self) -> int:
        return await self.store.last_seq()

    async def check_cursor(self, after: int, read: Sequence[EventRow] = ()) -> None:
        """Raise `CursorExpired` when `after` fell off the log. `read` is what was just read
        after it, if anything: checked *after* that read, so a prune that committed in
        between is seen. A first event right after the cursor proves nothing was skipped,
        and costs no query."""
        if after == 0 or (read and read[0].seq == after + 1):
            return
        oldest = await self.store.oldest_seq()
        if after < oldest - 1:
            raise CursorExpired(after, oldest)

    # --- retention (SPEC §5), run by `retention.Retention` and `reconciler prune` ------

    def retention_cutoff(self, kind: RowKind) -> datetime | None:
        """Rows of `kind` older than this go; None when they are kept forever."""
        seconds = {
            RowKind.EVENTS: self.settings.retain_events,
            RowKind.DELIVERIES: self.settings.retain_deliveries,
            RowKind.TASKS: self.settings.retain_tasks,
        }[kind]
        return None if seconds == 0 else self.clock.now() - timedelta(seconds=seconds)

    async def prune(self, kind: RowKind, limit: int, after: int = 0) -> Pruned:
        """One small batch of `kind` past its retention (nothing when kept forever)."""
        cutoff = self.retention_cutoff(kind)
        if cutoff is None:
            return Pruned(0, False, after)
        pruned = await self.store.prune(kind, cutoff, limit, after)
        self.metrics.pruned.labels(kind.value).inc(pruned.removed)
        return pruned

    async def prunable(self, kind: RowKind) -> int:
        """How many rows of `kind` a prune would remove now (`reconciler prune --dry-run`)."""
        cutoff = self.retention_cutoff(kind)
        return 0 if cutoff is None else await self.store.prunable(kind, cutoff)

    async def oldest_seq(self) -> int:
        return await self.store.oldest_seq()

    async def database_bytes(self) -> int:
        return await self.store.size_bytes()

    # --- operations: /readyz, /metrics and the dashboard's /stats ----------------------

    async def readiness(self, timeout_seconds: float = 2.0) -> list[str]:
        """Why the service should not receive traffic; empty when it is ready."""
        reasons = []
        try:
            async with asyncio.timeout(timeout_seconds):
                await self.store.ping()
        except TimeoutError:
            reasons.append(f"database did not answer within {timeout_seconds:g} s")
        except Exception as error:  # whatever the driver raises, the answer is "not reachable"
            # Only the class name: a driver's message may quote the connection string.
            reasons.append(f"database unreachable ({type(error).__name__})")
        if not self.health.loop_running and not self.health.standby:
            reasons.append("reconciler loop not running")
        for name, why in sorted(self.health.paused.items()):
            reasons.append(f"{name}: credentials rejected ({why})")
        if failure := await self._write_failure(timeout_seconds):  # e.g. a full disk (SPEC §4)
            reasons.append(failure)
        return reasons

    async def _write_failure(self, timeout_seconds: float) -> str | None:
        """Why the store cannot commit; None when it can. After a failed write this tries a
        tiny one (`Store.probe`), so readiness comes back by itself when the
        disk has room again, even when no traffic arrives to show it (a load balancer sends
        none to a replica that is not ready)."""
        if self.store.write_failure() is None:
            return None
        try:
            async with asyncio.timeout(timeout_seconds):
                await self.store.probe()
        except (TimeoutError, StoreError):
            pass
        failure = self.store.write_failure()
        return None if failure is None else f"database cannot commit writes: {failure}"

    async def overview(self) -> Overview:
        """Task counts, how terminal tasks were settled, lag and the log head, in one read."""
        counts: dict[tuple[str, str], int] = {}
        settled = {name: dict.fromkeys(SETTLED_BY, 0) for name in self.providers}
        for row in await self.store.settled_counts():
            counts[row.provider, row.status] = counts.get((row.provider, row.status), 0) + row.count
            by = settled_by(Status(row.status), Source(row.source))
            settled.setdefault(row.provider, dict.fromkeys(SETTLED_BY, 0))[by] += row.count
        now = self.clock.now()
        due = await self.store.next_due_at()
        # The loop's own figure, or the database's when the loop is stuck or not running.
        overdue = (now - due).total_seconds() if due is not None else 0.0
        lag = max(self.health.lag_seconds, overdue, 0.0)
        return Overview(counts, settled, lag, await self.store.last_seq())


def _expired_at_deadline(before: Task, change: Change | None, now: datetime) -> Change | None:
    """`change`, unless it leaves the task running at or past its deadline: then the task
    expires, with what the change learnt kept (provider status, progress)."""
    if change is None or change.task.terminal or not schedule.past_deadline(change.task, now):
        return change
    expired = expire(change.task, now)
    assert expired is not None
    # One event for the pair: the expiry, from the status the task had before this change.
    return Service._planned(Change(expired.task, expired.event, before.status), None)


def _written(result: ApplyResult | Exception) -> Task | Exception | None:
    return result if isinstance(result, Exception) else result.task


def _maybe(
    task: Task | None, rule: Callable[[Task, datetime], Change | None], now: datetime
) -> Change | None:
    if task is None:
        return None
    change = rule(task, now)
    return None if change is None else Service._planned(change, None)


def _encode_cursor(position: ListPosition) -> str:
    created_at, provider, task_id = position
    key = json.dumps([iso(created_at), provider, task_id])
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> ListPosition:
    """The position `_encode_cursor` wrote: the last task's creation time (RFC 3339 text) and
    key. Cursors handed out before carried the time as Unix seconds: they are read too.
    Anything else, however it decodes, is refused."""
    try:
        key = codec.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError):  # binascii.Error is a ValueError
        key = None
    if isinstance(key, list) and len(key) == 3:
        created, provider, task_id = key
        created_at: datetime | None = None
        try:
            if isinstance(created, str):
                created_at = parse_iso(created)
            elif isinstance(created, int | float) and not isinstance(created, bool):
                created_at = datetime.fromtimestamp(created, UTC)
        except (ValueError, OverflowError, OSError):
            created_at = None
        if created_at is not None and isinstance(provider, str) and isinstance(task_id, str):
            return created_at, provider, task_id
    raise Invalid("cursor", "the cursor is not one this service handed out")

"""Group commit and the write batch: what every backend shares.

Writes are operations queued to one `Writer` per store. It drains whatever has queued
while the previous transaction ran, and hands the batch to its backend, which opens one
transaction and calls `write_batch(tx, ops)`:

1. interpret the new and replayed bodies (pure: JSON, adapter, rules);
2. lock what the batch may write (`tx.lock`: a no-op where one writer owns the database,
   advisory locks where several replicas write);
3. look up duplicates of the batch's bodies and load every task the batch touches;
4. run each operation's pure `decide` in arrival order against those tasks: duplicates,
   conflicts and outcomes are decided here, and each changed task is encoded once;
5. write deliveries, tasks and events (`tx.write`, which numbers the events), then lease
   due tasks, prune (`Prune`: one small retention batch, where the backend prunes through
   its writer) and probe (`Probe`: a tiny write that tells whether the store can commit).

The backend commits, and only then are the callers resolved (`settle`), so no caller
resumes before the commit that holds its write. A backend only runs statements: it never
decides what a delivery means nor how an answer looks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import operator
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from reconciler.errors import StoreError
from reconciler.model import Change, Commit, Outcome, Pruned, RowKind, Task, TaskRef
from reconciler.store.base import (
    Accepted,
    Applying,
    ApplyResult,
    Decide,
    IngestResult,
    Interpret,
    NewDelivery,
    Rejected,
)
from reconciler.store.rows import event_json, public_json, task_to_json

logger = logging.getLogger(__name__)

MAX_BATCH = 1024

# --- operations ----------------------------------------------------------------------------


@dataclass(eq=False)
class Op:
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    @property
    def weight(self) -> int:
        """How much of a backlog this operation is (`Writer`'s spill): its tasks."""
        return 1


@dataclass(eq=False)
class Ingest(Op):
    delivery: NewDelivery
    interpret: Interpret


@dataclass(eq=False)
class Apply(Op):
    """Decisions about several tasks, each applied on its own (one failing rule fails only
    its own item): the results of one poll exchange, one hand-back, one registration."""

    items: Sequence[Applying]

    @property
    def weight(self) -> int:
        return len(self.items)


@dataclass(eq=False)
class Replay(Op):
    delivery_id: int
    interpret: Interpret


@dataclass(eq=False)
class Lease(Op):
    now: datetime
    limit: int
    lease_seconds: float
    provider: str | None = None


@dataclass(eq=False)
class Prune(Op):
    """One retention batch (see `Store.prune`). Queued like any write, it commits between
    (or with) webhook batches, so a webhook waits at most for one small batch."""

    kind: RowKind
    before: datetime
    limit: int
    after: int


@dataclass(eq=False)
class Probe(Op):
    at: datetime


# --- what a backend does inside one transaction ------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    delivery: NewDelivery
    outcome: Outcome
    error: str | None
    task_id: str | None


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    id: int
    outcome: Outcome
    error: str | None
    task_id: str | None


@dataclass(frozen=True, slots=True)
class TaskRow:
    task: Task
    # `rows.task_to_json(task)`; None when only its counters moved since the stored row
    # (`COUNTERS`, and the poll time): a backend may then update those in the stored JSON
    # rather than write all of it again (`json`). Most polls change nothing else.
    data: str | None
    # The row exists and none of its indexed columns (status, source, external id) moved:
    # an update of the rest (poll time, version, JSON) does, and costs no index rewrite.
    in_place: bool = False

    def json(self) -> str:
        return self.data if self.data is not None else task_to_json(self.task)


# What a poll that learns nothing new changes in a task, besides its poll time.
COUNTERS = ("polls", "version", "poll_failures")
# Every other field of a task, but its poll time.
_BESIDES_COUNTERS = operator.attrgetter(
    *(f.name for f in dataclasses.fields(Task) if f.name not in (*COUNTERS, "next_poll_at"))
)


@dataclass(frozen=True, slots=True)
class EventRecord:
    provider: str
    task_id: str
    type: str
    at: datetime
    body: str  # `rows.event_json`: without its seq, which `Transaction.write` assigns


@dataclass
class Writes:
    """The rows one batch writes."""

    deliveries: list[DeliveryRow] = field(default_factory=list)
    delivery_updates: list[DeliveryUpdate] = field(default_factory=list)
    tasks: dict[TaskRef, TaskRow] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.deliveries or self.delivery_updates or self.tasks or self.events)


class Transaction(Protocol):
    """The statements of one write transaction, as a backend runs them."""

    async def lock(self, keys: Collection[str]) -> None:
        """Keep other writers away from these keys until the transaction ends."""

    async def duplicates(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str | None]:
        """(provider, sha256) of stored, readable deliveries -> the task id each named."""
        ...

    async def stored_deliveries(self, ids: Collection[int]) -> dict[int, NewDelivery]: ...

    async def tasks(self, refs: Collection[TaskRef]) -> list[Task]: ...

    async def delivery_ids(self, count: int) -> list[int]:
        """Ids for `count` new deliveries."""
        ...

    async def write(self, writes: Writes) -> None:
        """Write the deliveries, tasks and delivery updates (not the events)."""
        ...

    async def lease(
        self, now: datetime, limit: int, until: datetime, provider: str | None
    ) -> list[Task]:
        """Due tasks (`next_poll_at <= now`; of `provider` only, if given), earliest first,
        as they were (due), their `next_poll_at` moved to `until`."""
        ...

    async def append(self, events: Sequence[EventRecord], earliest_due: datetime | None) -> int:
        """The transaction's last statements: number `events` contiguously, in order, after
        the log's head and write them; tell other replicas (if any) what was committed.
        Returns the first seq given (the head + 1)."""
        ...

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int) -> Pruned:
        """One retention batch, as `Store.prune` describes it."""
        ...

    async def probe(self, at: datetime) -> None:
        """Write one tiny row that needs new space (see `Store.probe`)."""
        ...


# --- the batch -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Duplicate:
    """A body already stored for this provider; `candidates` name the task it concerned."""

    candidates: Sequence[TaskRef]


_Plan = Accepted | Rejected | _Duplicate | None


class _Batch:
    """One write transaction's view: tasks as the batch has left them, and its rows."""

    def __init__(self, tasks: dict[TaskRef, Task | None]) -> None:
        self.tasks = tasks
        self.stored = dict(tasks)  # as the database holds them, before this batch
        self.writes = Writes()
        self.public: dict[TaskRef, str] = {}  # each written task's public JSON, encoded once
        # id() of an operation or an Applying -> the index of its event in writes.events
        self.event_index: dict[int, int] = {}

    def json_of(self, task: Task | None) -> str | None:
        """`task`'s public JSON: as this batch encoded it when it wrote this version, else
        encoded now (a duplicate's task, unchanged)."""
        if task is None:
            return None
        encoded = self.public.get(task.ref)
        if encoded is not None and self.tasks.get(task.ref) is task:
            return encoded
        return public_json(task)

    def pick(self, candidates: Sequence[TaskRef]) -> Task | None:
        for ref in candidates:
            task = self.tasks.get(ref)
            if task is not None:
                return task
        return None

    def decide(
        self, key: object, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None
    ) -> tuple[Task | None, Change | None]:
        task = self.pick(candidates)
        change = decide(task)
        if change is None:
            return task, None
        updated = change.task
        ref = updated.ref
        self.tasks[ref] = updated
        stored = self.stored.get(ref)
        if change.event is None and _counters_only(stored, updated):
            self.writes.tasks[ref] = TaskRow(updated, None, in_place=True)
            return updated, change
        self.public[ref] = public = public_json(updated)
        in_place = (
            stored is not None
            and stored.status is updated.status
            and stored.source is updated.source
            and stored.external_task_id == updated.external_task_id
        )
        self.writes.tasks[ref] = TaskRow(updated, task_to_json(updated, public), in_place)
        if change.event is not None:
            self.event_index[id(key)] = len(self.writes.events)
            self.writes.events.append(
                EventRecord(
                    updated.provider,
                    updated.task_id,
                    change.event.value,
                    updated.updated_at,
                    event_json(change, delivery_id, updated.updated_at, public),
                )
            )
        return updated, change

    def settle_delivery(
        self, op: Op, plan: _Plan, delivery_id: int
    ) -> tuple[Outcome, Task | None, Rejected | None]:
        if isinstance(plan, Rejected):
            return Outcome.REJECTED, None, plan
        if isinstance(plan, _Duplicate):
            return Outcome.DUPLICATE, self.pick(plan.candidates), None
        assert isinstance(plan, Accepted)
        before = self.pick(plan.candidates)
        try:
            task, change = self.decide(op, plan.candidates, plan.decide, delivery_id)
        except Exception as error:
            logger.exception("rule failed on delivery %d", delivery_id)
            return Outcome.REJECTED, None, Rejected("internal_error", f"could not apply: {error}")
        if change is not None and before is not None and change.task.conflicts > before.conflicts:
            return Outcome.CONFLICT, task, None
        applied = change is not None and change.event is not None
        return (Outcome.APPLIED if applied else Outcome.UNCHANGED), task, None


# --- retention: which rows of a scanned batch go (the same rules on every backend) ----------

Moment = TypeVar("Moment", float, datetime)  # a backend's own time: Unix seconds or datetime


def events_to_prune(head: Sequence[tuple[int, Moment]], before: Moment, limit: int) -> Pruned:
    """`head`: the log's oldest events (seq, at), at most `limit`, in seq order. Only a
    prefix of the log is ever removed, so that every kept event follows the oldest kept one
    without a gap and a cursor either falls off the log or reads on exactly (SPEC §2): the
    prefix ends at the first event at or after `before`. The answer's `after` is the last
    seq to remove (every seq up to it goes)."""
    removed = last = 0
    for seq, at in head:
        if at >= before:
            return Pruned(removed, False, last)
        removed, last = removed + 1, seq
    return Pruned(removed, len(head) >= limit, last)


def deliveries_to_prune(
    scanned: Sequence[tuple[int, Moment, bool]], before: Moment, limit: int, after: int
) -> tuple[list[int], Pruned]:
    """`scanned`: at most `limit` deliveries after id `after`, in id order, as (id,
    received_at, settled: its task is terminal, gone or was never named). Ids follow arrival
    closely, so the scan of a pass stops at the first batch that meets a delivery received
    at or after `before`; the old ones of that batch still go. Returns the ids to remove and
    where the next batch starts."""
    doomed = [did for did, at, settled in scanned if settled and at < before]
    young = any(at >= before for _, at, _ in scanned)
    last = scanned[-1][0] if scanned else after
    return doomed, Pruned(len(doomed), len(scanned) >= limit and not young, last)


DELIVERIES_PER_READ = 5000  # `count_prunable_deliveries`: deliveries per read of the scan

Scan = Callable[[int, int], Awaitable[Sequence[tuple[int, Moment, bool]]]]


async def count_prunable_deliveries(scan: Scan[Moment], before: Moment) -> int:
    """How many deliveries a prune to `before` would remove now (`Store.prunable`): the
    backend's `scan(after, limit)` (the rows `deliveries_to_prune` takes) read page by page."""
    count, after, more = 0, 0, True
    while more:
        scanned = await scan(after, DELIVERIES_PER_READ)
        doomed, pruned = deliveries_to_prune(scanned, before, DELIVERIES_PER_READ, after)
        count, after, more = count + len(doomed), pruned.after, pruned.more
    return count


def task_key(ref: TaskRef) -> str:
    return f"task:{ref.provider}:{ref.task_id}"


def body_key(provider: str, sha256: str) -> str:
    return f"body:{provider}:{sha256}"


async def write_batch(tx: Transaction, ops: Sequence[Op]) -> tuple[list[object], Commit | None]:
    """Run `ops` in `tx` (see the module docstring); returns each op's result (or the
    exception for that op alone) and what the transaction will have committed, for
    `settle` to hand out once the backend has committed."""
    ingests = [op for op in ops if isinstance(op, Ingest)]
    replays = [op for op in ops if isinstance(op, Replay)]
    stored = await tx.stored_deliveries([op.delivery_id for op in replays]) if replays else {}

    plans: dict[int, _Plan] = {}
    for op in ops:
        if isinstance(op, Ingest):
            plans[id(op)] = _interpret(op.interpret, op.delivery)
        elif isinstance(op, Replay):
            replayed = stored.get(op.delivery_id)
            plans[id(op)] = None if replayed is None else _interpret(op.interpret, replayed)

    writing: set[TaskRef] = set()
    for op in ops:
        plan = plans.get(id(op))
        if isinstance(plan, Accepted):
            writing.update(plan.candidates)
        elif isinstance(op, Apply):
            for item in op.items:
                writing.update(item.candidates)
    bodies = {(op.delivery.provider, op.delivery.sha256) for op in ingests}
    await tx.lock([body_key(*key) for key in bodies] + [task_key(ref) for ref in writing])

    # Duplicates: an earlier, readable delivery of the same provider and body, stored before
    # or earlier in this batch.
    seen = await tx.duplicates(bodies) if bodies else {}
    in_batch: dict[tuple[str, str], Sequence[TaskRef]] = {}
    wanted = set(writing)
    for op in ingests:
        key = (op.delivery.provider, op.delivery.sha256)
        if key in seen or key in in_batch:
            task_id = seen.get(key)
            refs = [TaskRef(key[0], task_id)] if task_id else in_batch.get(key, [])
            plans[id(op)] = _Duplicate(refs)
            wanted.update(refs)
        elif isinstance(plan := plans[id(op)], Accepted):
            in_batch[key] = plan.candidates
    loaded: dict[TaskRef, Task | None] = dict.fromkeys(wanted)
    for task in await tx.tasks(wanted) if wanted else []:
        loaded[task.ref] = task
    batch = _Batch(loaded)
    new_ids = iter(await tx.delivery_ids(len(ingests)) if ingests else [])

    results: list[object] = []
    for op in ops:
        try:
            results.append(_run(batch, op, plans.get(id(op)), new_ids))
        except Exception as error:  # a bug in a rule must not fail the whole batch
            logger.exception("operation failed inside the write batch")
            results.append(error)

    writes = batch.writes
    if writes:
        await tx.write(writes)
    due = [row.task.next_poll_at for row in writes.tasks.values() if row.task.next_poll_at]
    for index, op in enumerate(ops):
        if isinstance(op, Lease):
            until = op.now + timedelta(seconds=op.lease_seconds)
            leased = await tx.lease(op.now, op.limit, until, op.provider)
            results[index] = leased
            if leased:
                due.append(until)
        elif isinstance(op, Prune):
            results[index] = await tx.prune(op.kind, op.before, op.limit, op.after)
        elif isinstance(op, Probe):
            await tx.probe(op.at)
    if not writes and not due:
        return results, None
    # Numbered last: where several replicas write, the log's head is locked from here to
    # COMMIT, so writers commit in seq order and a reader never sees seq N+1 before N.
    earliest_due = min(due, default=None)
    first_seq = await tx.append(writes.events, earliest_due)
    for op, result in zip(ops, results, strict=True):
        if isinstance(op, Apply) and isinstance(result, list):
            for position, (item, applied) in enumerate(zip(op.items, result, strict=True)):
                event = batch.event_index.get(id(item))
                if event is not None and isinstance(applied, ApplyResult):
                    result[position] = ApplyResult(applied.task, applied.created, first_seq + event)
    events = len(writes.events)
    return results, Commit(first_seq + events - 1 if events else 0, events, earliest_due)


def _run(batch: _Batch, op: Op, plan: _Plan, new_ids: Any) -> object:
    if isinstance(op, Apply):
        applied: list[ApplyResult | Exception] = []
        for item in op.items:
            try:
                existed = batch.pick(item.candidates) is not None
                task, _ = batch.decide(item, item.candidates, item.decide, item.delivery_id)
            except Exception as failed:  # a bug in one rule fails only its own item
                logger.exception("a decision failed inside the write batch")
                applied.append(failed)
                continue
            applied.append(ApplyResult(task, not existed and task is not None, None))
        return applied
    if isinstance(op, Ingest):
        delivery_id: int = next(new_ids)
        outcome, task, error = batch.settle_delivery(op, plan, delivery_id)
        batch.writes.deliveries.append(
            DeliveryRow(
                delivery_id,
                op.delivery,
                outcome,
                error.message if error else None,
                task.task_id if task else None,
            )
        )
        return IngestResult(delivery_id, outcome, task, error, batch.json_of(task))
    if isinstance(op, Replay):
        if plan is None:
            return StoreError(f"no delivery {op.delivery_id}")
        outcome, task, error = batch.settle_delivery(op, plan, op.delivery_id)
        batch.writes.delivery_updates.append(
            DeliveryUpdate(
                op.delivery_id,
                outcome,
                error.message if error else None,
                task.task_id if task else None,
            )
        )
        return IngestResult(op.delivery_id, outcome, task, error, batch.json_of(task))
    return None  # leases, prunes and probes run after the batch's other writes


def _counters_only(stored: Task | None, updated: Task) -> bool:
    """Whether `updated` differs from the stored task in its counters and poll time only."""
    return stored is not None and _BESIDES_COUNTERS(updated) == _BESIDES_COUNTERS(stored)


def _interpret(interpret: Interpret, delivery: NewDelivery) -> Accepted | Rejected:
    try:
        return interpret(delivery)
    except Exception as error:  # a bug must not lose the delivery: keep it, replay later
        logger.exception("interpreting a %s delivery failed", delivery.provider)
        return Rejected("internal_error", f"could not interpret the delivery: {error}")


def settle(ops: Sequence[Op], results: Sequence[object]) -> None:
    """Resolve each caller with its result (after the commit), or its own error."""
    for op, result in zip(ops, results, strict=True):
        if op.future.done():
            continue
        if isinstance(result, BaseException):
            op.future.set_exception(result)
        else:
            op.future.set_result(result)


def fail(ops: Sequence[Op], error: Exception) -> None:
    """The transaction failed: every caller gets a `StoreError` (nothing was written)."""
    failure = error if isinstance(error, StoreError) else StoreError(f"write failed: {error}")
    for op in ops:
        if not op.future.done():
            op.future.set_exception(failure)


class Writer:
    """`lanes` tasks draining queued operations in batches of at most `max_batch`, each lane
    one batch at a time through `run(ops, lane)` (which commits and settles them). One lane
    where one connection owns the database (SQLite). Several where a batch waits mostly on
    the database's round trips and several transactions may run at once (PostgreSQL, whose
    locks order them as they order several replicas); the first lane takes whatever is
    queued, and each further lane starts a batch only when operations weighing `spill`
    wait (a webhook weighs one, a poll exchange's results one per task), so that a light
    load still commits in groups (a transaction's fixed cost is most of a small one's) and
    only a backlog is worth a transaction of its own. `close()` drains what is queued
    before it returns."""

    def __init__(
        self,
        run: Callable[[list[Op], int], Awaitable[None]],
        max_batch: int = MAX_BATCH,
        lanes: int = 1,
        spill: int = 16,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.lanes = lanes
        self.spill = spill
        self._queue: asyncio.Queue[Op | None] = asyncio.Queue()
        self._waiting = 0  # the weight of the queued operations
        self._backlog = asyncio.Event()  # set when `spill` of it waits, or at close
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def start(self, name: str) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(lane), name=f"{name}-{lane}")
            for lane in range(self.lanes)
        ]

    async def submit(self, op: Op) -> Any:
        if self._closing or not self._tasks:
            raise StoreError("the store is closed")
        self._queue.put_nowait(op)
        self._waiting += op.weight
        if self._waiting >= self.spill:
            self._backlog.set()
        return await op.future

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for _ in self._tasks:
            self._queue.put_nowait(None)  # each lane drains what is queued, then stops
        self._backlog.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, lane: int) -> None:
        stopping = False
        while not stopping:
            if lane > 0:
                await self._spilled()
            first = await self._queue.get()  # at once after a spill: nothing yields between
            ops: list[Op] = []
            if first is None:
                stopping = True
            else:
                ops.append(first)
            # Each lane takes exactly one of close()'s stop marks, so every lane stops.
            while not stopping and len(ops) < self.max_batch and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:
                    stopping = True
                else:
                    ops.append(op)
            self._waiting -= sum(op.weight for op in ops)
            if ops:
                await self._run(ops, lane)

    async def _spilled(self) -> None:
        """Until operations weighing `spill` wait (or the writer closes)."""
        while not self._closing and self._waiting < self.spill:
            self._backlog.clear()
            await self._backlog.wait()


class Batched:
    """The write operations of the `Store` protocol, queued to the backend's `Writer`: what
    every backend offers the same way (each runs the batches in its own `Transaction`)."""

    _writer: Writer

    async def ingest(self, delivery: NewDelivery, interpret: Interpret) -> IngestResult:
        result: IngestResult = await self._writer.submit(Ingest(delivery, interpret))
        return result

    async def apply(
        self, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None = None
    ) -> ApplyResult:
        [result] = await self.apply_many([Applying(candidates, decide, delivery_id)])
        if isinstance(result, Exception):
            raise result
        return result

    async def apply_many(self, items: Sequence[Applying]) -> list[ApplyResult | Exception]:
        if not items:
            return []
        results: list[ApplyResult | Exception] = await self._writer.submit(Apply(items))
        return results

    async def replay(self, delivery_id: int, interpret: Interpret) -> IngestResult:
        result: IngestResult = await self._writer.submit(Replay(delivery_id, interpret))
        return result

    async def lease_due(
        self, now: datetime, limit: int, lease_seconds: float, provider: str | None = None
    ) -> list[Task]:
        result: list[Task] = await self._writer.submit(Lease(now, limit, lease_seconds, provider))
        return result

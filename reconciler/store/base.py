"""The storage interface the rest of Reconciler talks to, shaped by its use cases.

There is no generic `execute`. Writes are *operations* handed to the backend, which groups
concurrent ones into one transaction (group commit) and resolves each caller only after
the commit that holds its write:

- `ingest(NewDelivery, interpret)`: store a webhook body and, in the same transaction,
  apply what it says (or record why it could not be read);
- `apply(candidates, decide)`: load a task inside the transaction, call the pure
  `decide(task | None) -> Change | None`, write the task and its event atomically;
- `lease_due(now, limit, lease_seconds)`: take due tasks and push their `next_poll_at`
  forward by the lease, so a crash mid-poll only delays them;
- `prune(kind, before, limit, after)`: remove one small batch of rows older than `before`
  (retention, SPEC §5), never a non-terminal task nor a delivery of one.

What a batch of operations means (duplicates, conflicts, the rows and events it writes) is
decided once for every backend, in `store/batch.py`; a backend runs the statements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from reconciler.model import Change, Delivery, EventRow, Outcome, Pruned, RowKind, Task, TaskRef

Decide = Callable[[Task | None], Change | None]


@dataclass(frozen=True, eq=False, slots=True)
class Applying:
    """One decision of `Store.apply_many`: the task (first existing candidate wins, else the
    first is created) and the pure rule that decides what becomes of it."""

    candidates: Sequence[TaskRef]
    decide: Decide
    delivery_id: int | None = None


@dataclass(frozen=True, slots=True)
class NewDelivery:
    provider: str
    received_at: datetime
    headers: Mapping[str, str]
    body: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A delivery that was read: the task it concerns (first existing candidate wins, else
    the first is created) and what to do with it."""

    candidates: Sequence[TaskRef]
    decide: Decide


@dataclass(frozen=True, slots=True)
class Rejected:
    code: str
    message: str


Interpretation = Accepted | Rejected
Interpret = Callable[[NewDelivery], Interpretation]


@dataclass(frozen=True, slots=True)
class IngestResult:
    delivery_id: int
    outcome: Outcome
    task: Task | None = None
    error: Rejected | None = None
    task_json: str | None = None  # `task` as SPEC §2's JSON object (None with no task)

    @property
    def duplicate(self) -> bool:
        return self.outcome is Outcome.DUPLICATE


@dataclass(frozen=True, slots=True)
class ApplyResult:
    task: Task | None  # None when the task does not exist and decide created nothing
    created: bool
    event_seq: int | None


@dataclass(frozen=True, slots=True)
class Settled:
    provider: str
    status: str
    source: str
    count: int


# A position in the newest-first task list: the last task of a page, by creation time and key.
ListPosition = tuple[datetime, str, str]


class Store(Protocol):
    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def close(self) -> None:
        """Finish the queued writes, then release every connection; idempotent."""
        ...

    async def ingest(self, delivery: NewDelivery, interpret: Interpret) -> IngestResult: ...

    async def apply(
        self, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None = None
    ) -> ApplyResult: ...

    async def apply_many(self, items: Sequence[Applying]) -> list[ApplyResult | Exception]:
        """Several `apply`s as one operation (the results of one poll exchange): each item
        decided on its own, its result or the exception its rule raised, in order."""
        ...

    async def replay(self, delivery_id: int, interpret: Interpret) -> IngestResult: ...

    async def lease_due(
        self, now: datetime, limit: int, lease_seconds: float, provider: str | None = None
    ) -> list[Task]:
        """Take up to `limit` due tasks (of `provider` only, if given), earliest first, each
        held until `now + lease_seconds`."""
        ...

    async def next_due_at(self) -> datetime | None: ...

    async def get_task(self, ref: TaskRef) -> Task | None: ...

    async def list_tasks(
        self,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        before: ListPosition | None = None,
    ) -> list[Task]: ...

    async def events_after(
        self,
        after: int,
        limit: int,
        provider: str | None = None,
        task_id: str | None = None,
    ) -> list[EventRow]: ...

    async def last_seq(self) -> int: ...

    async def deliveries(
        self, ids: Sequence[int] | None = None, rejected_only: bool = False, limit: int = 1000
    ) -> list[Delivery]: ...

    async def settled_counts(self) -> list[Settled]: ...

    async def ping(self) -> None: ...

    # --- retention (SPEC §5) and the full-disk check (SPEC §4) -----------------------------

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int = 0) -> Pruned:
        """Remove at most `limit` rows of `kind` older than `before`, in one transaction:
        events: the oldest ones, a prefix of the log up to the first event at or after
        `before`; deliveries: received before `before`, among the `limit` after id `after`,
        whose task is terminal, gone, or was never named; tasks: terminal ones last changed
        before `before`."""
        ...

    async def prunable(self, kind: RowKind, before: datetime) -> int:
        """How many rows of `kind` a prune to `before` would remove now (reads only)."""
        ...

    async def oldest_seq(self) -> int:
        """The seq of the oldest kept event; with no event kept, the seq the next one gets."""
        ...

    async def size_bytes(self) -> int:
        """The database's size on disk."""
        ...

    def write_failure(self) -> str | None:
        """Why the last write transaction failed (e.g. the disk is full), or None once a
        later one committed."""
        ...

    async def probe(self) -> None:
        """Commit one tiny write that needs new space, as a failed batch did; success clears
        `write_failure()`. Raises StoreError when it cannot commit."""
        ...

    def leadership(self) -> AbstractAsyncContextManager[asyncio.Event]:
        """Wait until this process may run the reconciler loop (one process in the whole
        deployment does); the Event it yields is set if that may have ended."""
        ...

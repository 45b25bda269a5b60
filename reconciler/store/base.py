"""The storage interface the rest of Reconciler talks to, shaped by its use cases.

There is no generic `execute`. Writes are *operations* handed to the backend, which groups
concurrent ones into one transaction (group commit) and resolves each caller only after
the commit that holds its write:

- `ingest(NewDelivery, interpret)`: store a webhook body and, in the same transaction,
  apply what it says (or record why it could not be read);
- `apply(candidates, decide)`: load a task inside the transaction, call the pure
  `decide(task | None) -> Change | None`, write the task and its event atomically;
- `lease_due(now, limit, lease_seconds)`: take due tasks and push their `next_poll_at`
  forward by the lease, so a crash mid-poll only delays them.

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

from reconciler.model import Change, Delivery, EventRow, Outcome, Task, TaskRef

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

    async def lease_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Task]: ...

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

    def leadership(self) -> AbstractAsyncContextManager[asyncio.Event]:
        """Wait until this process may run the reconciler loop (one process in the whole
        deployment does); the Event it yields is set if that may have ended."""
        ...

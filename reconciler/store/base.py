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

Rules stay pure (`state.py`), the backends stay simple. This module also holds the row codec
shared by every backend: a task is stored as its JSON with a few indexed columns beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from reconciler.codec import dumps, loads
from reconciler.model import (
    Change,
    Delivery,
    EventType,
    Outcome,
    Source,
    Status,
    Task,
    TaskRef,
    Video,
    iso,
    parse_iso,
)

Decide = Callable[[Task | None], Change | None]


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
class EventRow:
    """One stored event: `body` is its JSON text exactly as served."""

    seq: int
    provider: str
    task_id: str
    type: str
    body: str


@dataclass(frozen=True, slots=True)
class Settled:
    provider: str
    status: str
    source: str
    count: int


class Store(Protocol):
    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def ingest(self, delivery: NewDelivery, interpret: Interpret) -> IngestResult: ...

    async def apply(
        self, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None = None
    ) -> ApplyResult: ...

    async def replay(self, delivery_id: int, interpret: Interpret) -> IngestResult: ...

    async def lease_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Task]: ...

    async def next_due_at(self) -> datetime | None: ...

    async def get_task(self, ref: TaskRef) -> Task | None: ...

    async def list_tasks(
        self,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        before: tuple[float, str, str] | None = None,
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


# --- row codec -------------------------------------------------------------------------


def epoch(moment: datetime) -> float:
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def public_json(task: Task) -> str:
    """The task object of SPEC §2 as JSON text: encoded once per change, then spliced into
    the stored row, the event and the webhook's answer."""
    return dumps(task.to_json())


def task_to_json(task: Task, public: str | None = None) -> str:
    """The stored form: the public object plus the bookkeeping readers never see."""
    internal = {
        "provider_updated_at": iso(task.provider_updated_at),
        "poll_failures": task.poll_failures,
        "result_missing_since": iso(task.result_missing_since),
        "progress_event_at": iso(task.progress_event_at),
        "conflicts": task.conflicts,
    }
    public = public or public_json(task)
    return f'{public[:-1]},"internal":{dumps(internal)}}}'


def task_from_json(text: str) -> Task:
    data: dict[str, Any] = loads(text)
    internal = data.get("internal", {})
    created_at = parse_iso(data["created_at"])
    updated_at = parse_iso(data["updated_at"])
    deadline_at = parse_iso(data["deadline_at"])
    assert created_at and updated_at and deadline_at
    return Task(
        provider=data["provider"],
        task_id=data["task_id"],
        action=data["action"],
        status=Status(data["status"]),
        created_at=created_at,
        updated_at=updated_at,
        deadline_at=deadline_at,
        source=Source(data["source"]),
        provider_status=data["provider_status"],
        progress=data["progress"],
        videos=tuple(Video.from_json(video) for video in data["videos"]),
        error=data["error"],
        metadata=data["metadata"],
        completed_at=parse_iso(data["completed_at"]),
        callbacks=data["callbacks"],
        polls=data["polls"],
        next_poll_at=parse_iso(data["next_poll_at"]),
        version=data["version"],
        registered=data.get("registered", False),
        external_task_id=data.get("external_task_id"),
        provider_updated_at=parse_iso(internal.get("provider_updated_at")),
        poll_failures=internal.get("poll_failures", 0),
        result_missing_since=parse_iso(internal.get("result_missing_since")),
        progress_event_at=parse_iso(internal.get("progress_event_at")),
        conflicts=internal.get("conflicts", 0),
    )


def event_json(
    seq: int, change: Change, delivery_id: int | None, at: datetime, task_json: str
) -> str:
    """The event object of SPEC §2 as JSON text, with the task's JSON spliced in."""
    assert change.event is not None
    task = change.task
    head = {
        "seq": seq,
        "type": change.event.value,
        "provider": task.provider,
        "task_id": task.task_id,
        # A late registration of a settled task keeps the task's source; its event is
        # still the registration's.
        "source": (Source.REGISTER if change.event is EventType.REGISTERED else task.source).value,
        "status": task.status.value,
        "previous_status": change.previous_status.value if change.previous_status else None,
        "delivery_id": delivery_id,
        "at": iso(at),
    }
    return f'{dumps(head)[:-1]},"task":{task_json}}}'

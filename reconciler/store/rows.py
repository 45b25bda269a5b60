"""How tasks and events are kept as text, the same in every backend.

A task is stored as its public JSON (SPEC §2's task object) with the bookkeeping readers
never see appended under `internal`; the indexed columns beside it are each backend's own,
and the `next_poll_at` column is the truth (`task_from_json`).
An event is stored as its public JSON *without* `seq`: a backend learns the seqs of a
batch's events only when it writes them (PostgreSQL takes them from a counter as the last
step before COMMIT), so `seq` is put in front when the event is read (`served`).
Whole rows as kept (`StoredTask`, `StoredDelivery`, `StoredEvent`) are what moves when a
database is copied to another backend: stored text as is, times as datetimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.codec import dumps, loads
from reconciler.model import (
    Change,
    EventType,
    Source,
    Status,
    Task,
    TaskRef,
    Video,
    iso,
    parse_iso,
)


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


def task_from_json(text: str, next_poll_at: datetime | None) -> Task:
    """A stored task. Its `next_poll_at` is the row's column, not the JSON's: a lease moves
    only the column (one small update), so the JSON may still hold the time before it."""
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
        next_poll_at=next_poll_at,
        version=data["version"],
        registered=data.get("registered", False),
        external_task_id=data.get("external_task_id"),
        provider_updated_at=parse_iso(internal.get("provider_updated_at")),
        poll_failures=internal.get("poll_failures", 0),
        result_missing_since=parse_iso(internal.get("result_missing_since")),
        progress_event_at=parse_iso(internal.get("progress_event_at")),
        conflicts=internal.get("conflicts", 0),
    )


def event_json(change: Change, delivery_id: int | None, at: datetime, task_json: str) -> str:
    """The event object of SPEC §2 as stored: without `seq`, the task's JSON spliced in."""
    assert change.event is not None
    task = change.task
    head = {
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


def served(seq: int, stored: str) -> str:
    """A stored event's JSON as served: `seq` first, then what was stored."""
    return f'{{"seq":{seq},{stored[1:]}'


# --- whole rows, for moving a database to another backend (`store/transfer.py`) ----------


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task row as kept: its columns and its stored JSON, which is copied as is."""

    provider: str
    task_id: str
    status: str
    source: str
    external_task_id: str | None
    created_at: datetime
    updated_at: datetime
    next_poll_at: datetime | None
    version: int
    data: str


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    id: int
    provider: str
    received_at: datetime
    headers: str  # the JSON object as stored
    body: bytes
    sha256: str
    outcome: str
    error: str | None
    task_id: str | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    provider: str
    task_id: str
    type: str
    at: datetime
    body: str  # as stored: without its seq


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows of one table, a few thousand at most: what an export yields and an import
    writes with one statement."""

    tasks: Sequence[StoredTask] = ()
    deliveries: Sequence[StoredDelivery] = ()
    events: Sequence[StoredEvent] = ()
    # The largest seq and delivery id the source ever gave, pruned ones included (retention
    # may have removed the newest rows): an export's last chunk carries them, and an import
    # continues the numbering after them, so no seq or id is ever given twice.
    last_seq: int = 0
    last_delivery: int = 0


@dataclass(frozen=True, slots=True)
class Copied:
    tasks: int
    deliveries: int
    events: int
    last_seq: int  # the log's head after the copy


class Leased:
    """The tasks a store leased for polls, as it read them. When a poll's result is applied,
    its row is read again inside the write transaction; a row whose version and last change
    have not moved since the lease holds this very task (the lease moved only the poll-time
    column), so its JSON need not be parsed a second time: a tenth of the loop's CPU when
    100,000 polls fall due together (bench/burst.py). Where the store knows that nothing
    but its own transactions wrote since (`held`), the row need not be read at all."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        # ref -> (the task as read, the poll time the lease wrote)
        self._tasks: dict[TaskRef, tuple[Task, datetime | None]] = {}

    def keep(self, tasks: list[Task], until: datetime | None = None) -> list[Task]:
        """Remember `tasks`, just leased; the lease moved their poll time to `until`."""
        for task in tasks:
            self._tasks[task.ref] = (task, until)
        while len(self._tasks) > self.size:  # leases never settled (abandoned): oldest first
            del self._tasks[next(iter(self._tasks))]
        return tasks

    def __contains__(self, ref: TaskRef) -> bool:
        return ref in self._tasks

    def clear(self) -> None:
        self._tasks.clear()

    def held(self, ref: TaskRef) -> Task | None:
        """The leased task as its row now is, for a store that knows the row was written
        by nothing but the lease since (each write of a task reads it first, through `take`
        or this, so an entry still here was not written by this store; another writer, or a
        failed transaction, must `clear` them all). It is forgotten."""
        entry = self._tasks.pop(ref, None)
        if entry is None:
            return None
        task, until = entry
        return task if task.next_poll_at == until else task.replace(next_poll_at=until)

    def take(
        self, ref: TaskRef, version: int, updated_at: datetime, next_poll_at: datetime | None
    ) -> Task | None:
        """The leased task, with the row's poll time, if the row (its `version` and last
        change) still holds it; else None. Either way it is forgotten."""
        entry = self._tasks.pop(ref, None)
        if entry is None:
            return None
        task = entry[0]
        if task.version != version or task.updated_at != updated_at:
            return None
        return (
            task if task.next_poll_at == next_poll_at else task.replace(next_poll_at=next_poll_at)
        )

    def read(
        self,
        ref: TaskRef,
        version: int,
        updated_at: datetime,
        data: str,
        next_poll_at: datetime | None,
    ) -> Task:
        """The stored task: the leased one when the row still holds it, else `data` parsed."""
        return self.take(ref, version, updated_at, next_poll_at) or task_from_json(
            data, next_poll_at
        )

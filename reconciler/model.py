"""The normalized vocabulary of Reconciler: statuses, tasks, observations, events, deliveries,
and the kinds of rows retention prunes.

Plain frozen values with no I/O. Provider shapes are turned into these by `providers/`,
rules over them live in `state.py`, and a task's JSON form (SPEC §2) is `Task.to_json()`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple


class Status(enum.StrEnum):
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def rank(self) -> int:
        """Lifecycle order: submitted < processing < every terminal status."""
        return _RANK[self]


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.EXPIRED})
_RANK = {
    Status.SUBMITTED: 0,
    Status.PROCESSING: 1,
    Status.COMPLETED: 2,
    Status.FAILED: 2,
    Status.EXPIRED: 2,
}


class Source(enum.StrEnum):
    """What last changed a task."""

    REGISTER = "register"
    WEBHOOK = "webhook"
    POLL = "poll"
    RECONCILER = "reconciler"


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 UTC with a `Z` and a fixed six-digit fraction (SPEC §2), so that as text
    times sort in time order, and a stored task's times read back exactly."""
    if moment is None:
        return None
    return _iso(moment)


# A task's JSON repeats a few instants (created, updated and completed are often one `now`),
# and each is encoded again for its event and its stored row: remembering the last few
# thousand saves most of the formatting on the webhook path.
@functools.lru_cache(maxsize=4096)
def _iso(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # 2026-11-25T18:00:00.123000+00:00: the fraction is written even when it is zero.
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


def parse_iso(text: str | None) -> datetime | None:
    if text is None:
        return None
    # Python reads the `Z` itself, and gives `UTC` for it (and for `+00:00`).
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


class TaskRef(NamedTuple):
    """A task's key. A tuple rather than a dataclass: the write batch builds and hashes
    several per delivery, and a tuple does both in C."""

    provider: str
    task_id: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.task_id}"


@dataclass(frozen=True, slots=True)
class Video:
    url: str
    cover_url: str | None = None
    duration: float | None = None
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "cover_url": self.cover_url,
            "duration": self.duration,
            "id": self.id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Video:
        return cls(data["url"], data.get("cover_url"), data.get("duration"), data.get("id"))


# Not `frozen`, as `Task` (below) and for the same reason: an adapter builds one per task
# of every poll answer (2.3 against 0.4 us). Treat it as immutable all the same.
@dataclass(slots=True)
class Observation:
    """What one webhook delivery or one poll says about one task.

    `status` is None when the provider used a status word the adapter does not know: such an
    observation is never terminal, and only `provider_status` records the word. A `COMPLETED`
    status without any video URL is a success report whose result is not there yet:
    `effective_status` treats it as still processing (SPEC §1).
    """

    task_id: str
    status: Status | None
    provider_status: str | None = None
    progress: int | None = None
    videos: tuple[Video, ...] = ()
    error: str | None = None
    provider_created_at: datetime | None = None
    provider_updated_at: datetime | None = None
    external_task_id: str | None = None
    action: str | None = None
    raw: Any = None

    @property
    def result_missing(self) -> bool:
        return self.status is Status.COMPLETED and not any(video.url for video in self.videos)

    @property
    def effective_status(self) -> Status | None:
        return Status.PROCESSING if self.result_missing else self.status


# Not `frozen`: a frozen dataclass sets each of these 25 fields through
# `object.__setattr__`, which made building a Task 9x slower (3.7 against 0.4 us), and the
# webhook path builds several per delivery. Treat a Task as immutable all the same: derive
# a new one with `replace`, never assign to a field.
@dataclass(slots=True)
class Task:
    provider: str
    task_id: str
    action: str
    status: Status
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime
    source: Source
    provider_status: str | None = None
    progress: int | None = None
    videos: tuple[Video, ...] = ()
    error: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    completed_at: datetime | None = None
    callbacks: int = 0
    polls: int = 0
    next_poll_at: datetime | None = None
    version: int = 1
    registered: bool = False
    external_task_id: str | None = None
    provider_updated_at: datetime | None = None
    # Internal bookkeeping, not part of the JSON task object.
    poll_failures: int = 0
    result_missing_since: datetime | None = None
    progress_event_at: datetime | None = None
    conflicts: int = 0

    @property
    def ref(self) -> TaskRef:
        return TaskRef(self.provider, self.task_id)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def replace(self, **changes: Any) -> Task:
        """A copy with `changes` (`dataclasses.replace`, at a third of its cost)."""
        values = list(_TASK_VALUES(self))
        for name, value in changes.items():
            values[_TASK_FIELD_INDEX[name]] = value
        return Task(*values)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "task_id": self.task_id,
            "action": self.action,
            "status": self.status.value,
            "provider_status": self.provider_status,
            "progress": self.progress,
            "videos": [video.to_json() for video in self.videos],
            "error": self.error,
            "metadata": dict(self.metadata),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "completed_at": iso(self.completed_at),
            "deadline_at": iso(self.deadline_at),
            "source": self.source.value,
            "callbacks": self.callbacks,
            "polls": self.polls,
            "next_poll_at": iso(self.next_poll_at),
            "version": self.version,
            "registered": self.registered,
            "external_task_id": self.external_task_id,
        }


_TASK_FIELDS = tuple(task_field.name for task_field in dataclasses.fields(Task))
_TASK_FIELD_INDEX = {name: index for index, name in enumerate(_TASK_FIELDS)}

_TASK_VALUES = operator.attrgetter(*_TASK_FIELDS)


class EventType(enum.StrEnum):
    REGISTERED = "task.registered"
    SUBMITTED = "task.submitted"
    PROCESSING = "task.processing"
    COMPLETED = "task.completed"
    FAILED = "task.failed"
    EXPIRED = "task.expired"

    @classmethod
    def for_status(cls, status: Status) -> EventType:
        return cls("task." + status.value)


@dataclass(frozen=True, slots=True)
class Change:
    """The outcome of a rule: the task as it is now, and the event to log (None when the
    change is bookkeeping only, e.g. a coalesced progress tick or a re-planned poll)."""

    task: Task
    event: EventType | None
    previous_status: Status | None = None


class Outcome(enum.StrEnum):
    """What became of a stored webhook delivery."""

    APPLIED = "applied"  # changed the task (an event was written)
    UNCHANGED = "unchanged"  # parsed, but said nothing new
    DUPLICATE = "duplicate"  # same provider and body as an earlier delivery
    CONFLICT = "conflict"  # a different terminal report for a task already terminal
    REJECTED = "rejected"  # could not be parsed; `error` says why; `replay` retries it


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event of the log as read: `body` is its JSON text exactly as served (SPEC §2's
    event object, `seq` included), spliced into answers rather than re-encoded."""

    seq: int
    provider: str
    task_id: str
    type: str
    body: str


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    provider: str
    received_at: datetime
    headers: Mapping[str, str]
    body: bytes
    sha256: str
    outcome: Outcome
    error: str | None = None
    task_id: str | None = None


class RowKind(enum.StrEnum):
    """What retention prunes, in the order a pass prunes them."""

    EVENTS = "events"
    DELIVERIES = "deliveries"
    TASKS = "tasks"


@dataclass(frozen=True, slots=True)
class Pruned:
    """One prune batch: `removed` rows; `more` when the next batch (from `after`, the last
    key the batch looked at) may find more to remove."""

    removed: int
    more: bool
    after: int = 0


@dataclass(frozen=True, slots=True)
class Commit:
    """What one write transaction committed, as the store reports it (see `feed.py`)."""

    last_seq: int  # the log's head after this commit (0 when it appended no event)
    events: int = 0  # events this commit appended
    earliest_due: datetime | None = None  # the earliest `next_poll_at` it wrote, if any

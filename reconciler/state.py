"""The state rules of SPEC §1 as pure functions: (task, input, now) → Change | None.

- Terminal states absorb. A different terminal report for a terminal task is counted in
  `conflicts` and changes nothing else.
- Out-of-order reports are resolved by lifecycle rank (submitted < processing < terminal)
  and, at equal rank, by the provider's own `updated_at` where it gives one.
- A report that changes nothing visible writes no event; a progress-only change writes at
  most one event per task per `progress_interval` seconds.
- A success without a result URL stays non-terminal (`result_missing_since` remembers since
  when, so the caller can give up after a limit).

Poll timing is not decided here: `schedule.py` plans `next_poll_at` over the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from reconciler.model import Change, EventType, Observation, Source, Status, Task, TaskRef


@dataclass(frozen=True, slots=True)
class Registration:
    ref: TaskRef
    action: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    deadline_seconds: float | None = None
    external_task_id: str | None = None


def new_task(
    ref: TaskRef, action: str, now: datetime, deadline_seconds: float, source: Source
) -> Task:
    return Task(
        provider=ref.provider,
        task_id=ref.task_id,
        action=action,
        status=Status.SUBMITTED,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=deadline_seconds),
        source=source,
        version=0,
    )


def register(
    task: Task | None, request: Registration, now: datetime, default_action: str, deadline: float
) -> Change | None:
    """Registration is idempotent: metadata merges; the first one logs `task.registered`."""
    deadline_seconds = request.deadline_seconds or deadline
    previous = None if task is None else task.status  # a new task had no status before
    if task is None:
        task = new_task(
            request.ref, request.action or default_action, now, deadline_seconds, Source.REGISTER
        )
    if task.registered:
        metadata = {**task.metadata, **request.metadata}
        if metadata == dict(task.metadata):
            return None
        return Change(_touch(task, now, metadata=metadata), None, task.status)
    changes: dict[str, Any] = {
        "registered": True,
        "metadata": {**task.metadata, **request.metadata},
    }
    if not task.terminal:
        # A late registration of a settled task keeps the source that settled it: that is
        # how /metrics tells callbacks from polls.
        changes["source"] = Source.REGISTER
    if request.action:
        changes["action"] = request.action
    if request.deadline_seconds:
        changes["deadline_at"] = task.created_at + timedelta(seconds=request.deadline_seconds)
    if request.external_task_id and not task.external_task_id:
        changes["external_task_id"] = request.external_task_id
    return Change(_touch(task, now, **changes), EventType.REGISTERED, previous)


def merge(
    task: Task,
    observation: Observation,
    now: datetime,
    source: Source,
    progress_interval: float = 5.0,
) -> Change:
    """Apply one observation. Always returns a Change (the callback/poll counters move);
    its `event` is None when nothing a reader cares about changed."""
    counted = _counted(task, source)
    new_status = observation.effective_status
    if task.terminal:
        if new_status is not None and new_status.terminal and new_status is not task.status:
            counted["conflicts"] = task.conflicts + 1
        return Change(_touch(task, now, **counted), None, task.status)

    if new_status is not None and new_status.rank < task.status.rank:
        return Change(_touch(task, now, **counted), None, task.status)  # stale, out of order
    # At equal rank (or with no rank: an unknown word), an older report is stale too.
    if (
        (new_status is None or new_status.rank == task.status.rank)
        and observation.provider_updated_at is not None
        and task.provider_updated_at is not None
        and observation.provider_updated_at < task.provider_updated_at
    ):
        return Change(_touch(task, now, **counted), None, task.status)

    status = task.status if new_status is None else new_status
    visible: dict[str, Any] = {}
    if status is not task.status:
        visible["status"] = status
    if (
        observation.provider_status is not None
        and observation.provider_status != task.provider_status
    ):
        visible["provider_status"] = observation.provider_status
    # Progress only moves forward, and a failure's "100%" (new-api's synthetic value) is not
    # progress at all.
    progress = 100 if status is Status.COMPLETED else observation.progress
    if status is Status.FAILED:
        progress = None
    if progress is not None and (task.progress is None or progress > task.progress):
        visible["progress"] = progress
    if observation.videos and observation.videos != task.videos and status is Status.COMPLETED:
        visible["videos"] = observation.videos
    if status is Status.COMPLETED:
        if task.error is not None:
            visible["error"] = None  # an earlier transient complaint is not the outcome
    elif observation.error and observation.error != task.error:
        visible["error"] = observation.error

    quiet: dict[str, Any] = dict(counted)
    if observation.provider_updated_at is not None and (
        task.provider_updated_at is None
        or observation.provider_updated_at > task.provider_updated_at
    ):
        quiet["provider_updated_at"] = observation.provider_updated_at
    if observation.external_task_id and not task.external_task_id:
        quiet["external_task_id"] = observation.external_task_id
    if observation.action and not task.registered and observation.action != task.action:
        quiet["action"] = observation.action
    if observation.result_missing:
        if task.result_missing_since is None:
            quiet["result_missing_since"] = now
    elif task.result_missing_since is not None:
        quiet["result_missing_since"] = None

    if not visible:
        return Change(_touch(task, now, **quiet), None, task.status)
    if status.terminal:
        quiet["completed_at"] = now
    only_progress = set(visible) <= {"progress"}
    if only_progress and task.progress_event_at is not None:
        if (now - task.progress_event_at).total_seconds() < progress_interval:
            return Change(_touch(task, now, **visible, **quiet), None, task.status)
    if "progress" in visible or status is Status.PROCESSING:
        quiet["progress_event_at"] = now
    updated = _touch(task, now, source=source, **visible, **quiet)
    return Change(updated, EventType.for_status(status), task.status)


def expire(task: Task, now: datetime) -> Change | None:
    """The reconciler gives up on a task past its deadline."""
    if task.terminal:
        return None
    return fail(task, now, "no terminal status by the deadline", status=Status.EXPIRED)


def fail(task: Task, now: datetime, error: str, status: Status = Status.FAILED) -> Change | None:
    """The reconciler decides a task has failed (not found at the provider, no result URL)."""
    if task.terminal:
        return None
    updated = _touch(
        task, now, status=status, error=error, source=Source.RECONCILER, completed_at=now
    )
    return Change(updated, EventType.for_status(status), task.status)


def _counted(task: Task, source: Source) -> dict[str, Any]:
    if source is Source.WEBHOOK:
        return {"callbacks": task.callbacks + 1}
    if source is Source.POLL:
        return {"polls": task.polls + 1}
    return {}


def _touch(task: Task, now: datetime, **changes: Any) -> Task:
    visible = set(changes) & {
        "status",
        "provider_status",
        "progress",
        "videos",
        "error",
        "metadata",
        "registered",
        "action",
        "deadline_at",
    }
    if visible:
        changes.setdefault("updated_at", now)
    return task.replace(version=task.version + 1, **changes)

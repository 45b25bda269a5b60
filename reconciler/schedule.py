"""Pure poll timing (SPEC §3): when a task is next due, and when to give up on it.

Every function takes `now` and returns the next `next_poll_at`, never later than the task's
deadline: one index on `next_poll_at` also finds the tasks that reach it, and each of those
gets a last poll there before it may expire. (Only a task already past its deadline, handed
back while its provider paces requests, waits a little beyond it for that last poll.)
Jitter comes from a caller-supplied random source so that tests are deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from reconciler.config import ProviderSettings
from reconciler.model import Task

BACKOFF_BASE_SECONDS = 15.0
JITTER = 0.2  # ±20%: tasks registered together do not stay in lock-step
# A success without a result URL is looked at again soon (the URL usually follows within
# seconds), and never later than the backoff's cap.
RESULT_MISSING_RETRY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Timing:
    first_poll_after: float
    poll_interval_max: float
    deadline: float
    not_found_grace: float

    @classmethod
    def of(cls, settings: ProviderSettings) -> Timing:
        return cls(
            settings.first_poll_after,
            settings.poll_interval_max,
            settings.deadline,
            settings.not_found_grace,
        )

    @property
    def result_missing_limit(self) -> float:
        """How long a success without a URL may stay so before the task fails."""
        return self.not_found_grace


class OneDraw(random.Random):
    """A random source that gives one draw of `rng` again and again: the tasks that one
    exchange polled get one jitter, and so fall due together again (one batch, the next time
    too, whose rows and index entries lie side by side), while each exchange's tasks still
    spread apart from every other's."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(0)
        self._draw = rng.random()

    def random(self) -> float:
        return self._draw


def _at(task: Task, when: datetime) -> datetime:
    return min(when, task.deadline_at)


def _jittered(seconds: float, rng: random.Random) -> float:
    return seconds * (1.0 + rng.uniform(-JITTER, JITTER))


def backoff(attempt: int, timing: Timing, rng: random.Random) -> float:
    """Seconds before poll number `attempt` + 1 of a task still running (attempt ≥ 1)."""
    exponent = min(max(attempt - 1, 0), 30)
    seconds = min(timing.poll_interval_max, BACKOFF_BASE_SECONDS * 2.0**exponent)
    return min(timing.poll_interval_max, _jittered(seconds, rng))


def first_poll(task: Task, now: datetime, timing: Timing) -> datetime | None:
    """A registered or webhook-moved task is next due when its callback should have come."""
    if task.terminal:
        return None
    return _at(task, now + timedelta(seconds=timing.first_poll_after))


def after_poll(task: Task, now: datetime, timing: Timing, rng: random.Random) -> datetime | None:
    """After a successful poll that left the task running."""
    if task.terminal:
        return None
    if task.result_missing_since is not None:
        seconds = min(RESULT_MISSING_RETRY_SECONDS, timing.poll_interval_max)
        return _at(task, now + timedelta(seconds=seconds))
    return _at(task, now + timedelta(seconds=backoff(max(task.polls, 1), timing, rng)))


def after_error(
    task: Task, now: datetime, timing: Timing, rng: random.Random, delay: float | None
) -> datetime:
    """After a failed exchange: the provider's own delay if it gave one, else backoff on the
    number of consecutive failures."""
    seconds = delay if delay is not None else backoff(task.poll_failures + 1, timing, rng)
    return _at(task, now + timedelta(seconds=seconds))


def not_found_expired(task: Task, now: datetime, timing: Timing) -> bool:
    return (now - task.created_at).total_seconds() >= timing.not_found_grace


def after_not_found(task: Task, now: datetime, timing: Timing, rng: random.Random) -> datetime:
    """Retry within the not-found grace; the last try lands exactly at its end."""
    grace_end = task.created_at + timedelta(seconds=timing.not_found_grace)
    retry = now + timedelta(seconds=backoff(task.poll_failures + 1, timing, rng))
    return _at(task, min(retry, max(grace_end, now)))


def result_missing_expired(task: Task, now: datetime, timing: Timing) -> bool:
    since = task.result_missing_since
    return since is not None and (now - since).total_seconds() >= timing.result_missing_limit


def past_deadline(task: Task, now: datetime) -> bool:
    return not task.terminal and now >= task.deadline_at


def handed_back(task: Task, now: datetime, until: datetime) -> datetime:
    """When a task the loop could not poll now (its provider's limits) is due again: at
    `until`, but not past its deadline, so that it still gets its last look there; a task
    already at its deadline waits for `until` itself (its last look, at the provider's pace)."""
    return until if now >= task.deadline_at else min(until, task.deadline_at)

"""What a commit tells the rest of the process, without anyone polling the database.

The store reports each write transaction it committed as a `model.Commit` (the log's
head, how many events it appended, the earliest poll time it wrote). `Feed.publish(commit)` then:

- wakes readers waiting for events after some seq (long-polls, SSE) or for any commit (a
  caller waiting for one task to change, e.g. "poll now");
- tells the reconciler loop's `Alarm` that a poll may now be due earlier than the loop
  planned to look, so a registration or webhook never waits for the loop's next pass.

With several replicas on PostgreSQL, the LISTEN bridge publishes the other replicas' commits
here too: the notification is only a wake-up, the database stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from reconciler.model import Commit


class Alarm:
    """The reconciler loop's wake-up, rung by commits. A commit that planned a poll at
    `when` (its `earliest_due`) rings it when that is before the loop's next look at the
    schedule, so a registration, a webhook or "poll now" never waits for a pass that was
    not coming, and one that plans a later poll costs the loop nothing.

    The loop keeps `next_look` current: `reset(start)` as a pass begins (meanwhile only a
    poll planned before its start rings), None while it reads the schedule (any poll
    rings), then the time it sleeps until. `stop()` of the loop rings it to end the sleep."""

    def __init__(self) -> None:
        self.rung = asyncio.Event()
        self.next_look: datetime | None = None

    def due(self, when: datetime | None) -> None:
        if when is not None and (self.next_look is None or when < self.next_look):
            self.rung.set()

    def ring(self) -> None:
        self.rung.set()

    def reset(self, next_look: datetime | None) -> None:
        """A pass starts at `next_look`: it sees every poll due by then, so earlier rings
        are spent; during it, only a poll planned before its start rings."""
        self.rung.clear()
        self.next_look = next_look


class Feed:
    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.commits = 0  # commits published so far (a generation, for `wait_commit`)
        self.alarm = Alarm()
        self._changed = asyncio.Event()

    def publish(self, commit: Commit) -> None:
        self.commits += 1
        if commit.last_seq > self.last_seq:
            self.last_seq = commit.last_seq
        self.alarm.due(commit.earliest_due)
        # Wake everyone waiting now, and give later waiters a fresh event to wait on.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, after: int, seconds: float) -> bool:
        """Wait until an event after `after` exists or `seconds` pass; True if one does."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.last_seq <= after:
                    await self._changed.wait()
        return self.last_seq > after

    async def wait_commit(self, seen: int, seconds: float) -> bool:
        """Wait until a commit after generation `seen` (a `commits` value read earlier) or
        until `seconds` pass; True if there was one."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.commits <= seen:
                    await self._changed.wait()
        return self.commits > seen

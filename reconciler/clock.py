"""Time as a dependency: the service reads `now()` and waits with `sleep_until()`.

`SystemClock` is the real one; tests use `FakeClock` (in tests/) or the simulator's own,
and advance time explicitly instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        """Return at `when` (never if None) or as soon as `wake` is set, whichever is first."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        timeout = None if when is None else max(0.0, (when - self.now()).total_seconds())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await wake.wait()


class FakeClock:
    """A clock that moves only when told to. `sleep_until` returns once `advance()`/`set()`
    reach its time, or when woken, so a loop under test never waits for real time."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, asyncio.Event]] = []

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self.set(self._now + timedelta(seconds=seconds))

    def set(self, when: datetime) -> None:
        if when < self._now:
            raise ValueError("a FakeClock never goes back")
        self._now = when
        for due, event in self._sleepers:
            if due <= when:
                event.set()

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        if wake.is_set() or (when is not None and when <= self._now):
            return
        reached = asyncio.Event()
        entry = (when or datetime.max.replace(tzinfo=UTC), reached)
        self._sleepers.append(entry)
        waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(reached.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._sleepers.remove(entry)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

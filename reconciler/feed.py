"""The in-process notification that an event was written: long-polls and SSE streams wait
on it instead of polling the database. The store calls `publish(last_seq)` after each commit
that wrote events; readers call `wait(after, timeout)`.

With several replicas on PostgreSQL, a LISTEN bridge will call `publish` too.
"""

from __future__ import annotations

import asyncio
import contextlib


class Feed:
    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self._changed = asyncio.Event()

    def publish(self, last_seq: int) -> None:
        if last_seq <= self.last_seq:
            return
        self.last_seq = last_seq
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

"""Retention (SPEC §5): the pruner that runs inside `serve`, and the pass `reconciler prune`
runs once.

A pass prunes in batches of at most `batch_rows` rows of one kind, each its own small
transaction, taking the kinds in turn (events, deliveries, tasks, events, …, so that a large
backlog of one never holds up the others), and waits `pause_seconds` on the clock between
two batches, so that pruning takes a small share of the store's writer however large
the backlog is (on SQLite a batch is queued to the one writer between webhook batches; on
PostgreSQL it runs beside the writer). Passes start every `interval_seconds`, the first one at
start-up. After each pass the gauges of what retention bounds are refreshed: the oldest kept
seq and the database's size on disk.

This module owns the pacing only. What is old enough to go comes from the settings
(`Service.retention_cutoff`), and what may go (never a non-terminal task nor a delivery of
one) is the store's rule (`Store.prune`). A pass the store refuses (a full disk, a database
that is down) is logged and tried again at the next interval: retention never ends the
process; the webhook path and /readyz say what is wrong with the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from reconciler.errors import StoreError
from reconciler.model import RowKind
from reconciler.service import Service

logger = logging.getLogger(__name__)

# Measured on SQLite (2 cores, 1.5 KB callbacks): a batch of 500 rows holds the writer 3 ms
# (events) to 8 ms (deliveries: each one touches a random page of the sha256 index), a few
# webhook batches' worth; 1,000 rows held it 8-20 ms, which a webhook queued behind it would
# feel. A pause of half a second between batches keeps pruning under 2% of the writer's
# time and still removes up to 1,000 rows a second: some fifteen times what a million tasks a
# day (about five rows each) leave behind, so a backlog shrinks and a steady load never grows.
BATCH_ROWS = 500
PAUSE_SECONDS = 0.5
INTERVAL_SECONDS = 60.0


class Retention:
    def __init__(
        self,
        service: Service,
        *,
        batch_rows: int = BATCH_ROWS,
        pause_seconds: float = PAUSE_SECONDS,
        interval_seconds: float = INTERVAL_SECONDS,
    ) -> None:
        if batch_rows < 1 or pause_seconds < 0 or interval_seconds <= 0:
            raise ValueError("batch_rows must be >= 1, pause_seconds >= 0, interval_seconds > 0")
        self.service = service
        self.clock = service.clock
        self.batch_rows = batch_rows
        self.pause_seconds = pause_seconds
        self.interval_seconds = interval_seconds
        self.passes = 0  # passes run by `run()`, failed ones included
        self.batches = 0  # prune batches committed
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()

    def stop(self) -> None:
        """Ask `run()` (or a pass in progress) to return after the batch in flight."""
        self._stop.set()

    async def prune_once(self) -> dict[RowKind, int]:
        """One pass: batches of every kind in turn (events, deliveries, tasks, events, …)
        until none is left to remove; returns the rows removed per kind. Raises StoreError
        when the store refuses a batch."""
        removed = dict.fromkeys(RowKind, 0)
        # Where each kind's next batch starts; a kind kept forever makes no batch at all.
        pending = {kind: 0 for kind in RowKind if self.service.retention_cutoff(kind) is not None}
        first = True
        while pending and not self._stop.is_set():
            for kind, after in list(pending.items()):
                if not first:
                    await self._pause()
                    if self._stop.is_set():
                        break
                first = False
                pruned = await self.service.prune(kind, self.batch_rows, after)
                removed[kind] += pruned.removed
                if pruned.more:
                    pending[kind] = pruned.after
                else:
                    del pending[kind]
                self.batches += 1
                self._notify()
        return removed

    async def prunable(self) -> dict[RowKind, int]:
        """What a pass would remove now, per kind (reads only)."""
        return {kind: await self.service.prunable(kind) for kind in RowKind}

    async def refresh(self) -> None:
        """Set the gauges retention bounds: the oldest kept seq, the database's size."""
        metrics = self.service.metrics
        metrics.oldest_seq.set(await self.service.oldest_seq())
        metrics.database_bytes.set(await self.service.database_bytes())

    async def run(self) -> None:
        """Passes until `stop()`, one every `interval_seconds`, the first at once."""
        while not self._stop.is_set():
            started = self.clock.now()
            try:
                removed = await self.prune_once()
                await self.refresh()
            except StoreError as error:
                logger.warning(
                    "retention pass failed (%s); trying again in %g s", error, self.interval_seconds
                )
            else:
                if any(removed.values()):
                    logger.info(
                        "retention removed %s",
                        ", ".join(f"{count} {kind}" for kind, count in removed.items()),
                    )
            self.passes += 1
            self._notify()
            wake_at = started + timedelta(seconds=self.interval_seconds)
            await self.clock.sleep_until(wake_at, self._stop)

    async def wait_until(self, condition: Callable[[Retention], bool]) -> None:
        """Wait until `condition(self)` holds, checked after each batch and each pass (e.g.
        `passes >= 2`)."""
        while not condition(self):
            await self._changed.wait()

    async def _pause(self) -> None:
        if self.pause_seconds > 0:
            wake_at = self.clock.now() + timedelta(seconds=self.pause_seconds)
            await self.clock.sleep_until(wake_at, self._stop)

    def _notify(self) -> None:
        # Wake the current waiters; later ones wait on a fresh event (as in `Feed`).
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


__all__ = ["Retention"]

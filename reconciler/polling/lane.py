"""One provider's lane: its adapter, its limits (`limits.ProviderLimits`), its HTTP
connection pool, and the batches waiting in memory for their turn.

A batch whose slot is near (within `WAIT_HORIZON_SECONDS`) waits here rather than being
handed back to the database, which would cost a write and a pass per batch, and later passes
fill it up while it waits (`fill`). It waits on the
clock for its slot, and for an exchange to end when only the concurrency limit or a probe
in flight is in the way: an ending exchange wakes the first batch waiting for room, and a
probe's verdict wakes them all. Nothing here decides what happens to tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from datetime import datetime

import httpx

from reconciler.clock import Clock
from reconciler.limits import Permit, ProviderLimits, after
from reconciler.model import Task
from reconciler.providers import Provider

# Batches a provider can take within this many seconds wait for their turn in memory;
# later ones are handed back to the database, due at their slot.
WAIT_HORIZON_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Turn:
    """What waiting for a turn came to: a `permit` to start the exchange; or not now, hand
    the batch back due `until` (`held`: because the provider is held); or neither, when the
    loop is stopping (the batch stays leased, and is polled again when its lease ends)."""

    permit: Permit | None = None
    until: datetime | None = None
    held: bool = False


class Lane:
    def __init__(self, provider: Provider, clock: Clock) -> None:
        self.provider = provider
        self.name = provider.name
        self.clock = clock
        self.limits = ProviderLimits.from_settings(provider.settings)
        self.auth: httpx.Auth | None = None
        self._clients: list[httpx.AsyncClient] = []  # idle ones; see `open`
        # Batches that may start as soon as an exchange ends (room, or a probe's verdict),
        # in arrival order.
        self._room_waiters: deque[asyncio.Event] = deque()
        # Every batch waiting here, so that `stop_waiting` can release them all. Each has
        # an Event of its own: thousands may wait at once, and waiters of one shared Event
        # are removed from its queue one by one (quadratic at a timeout).
        self._waiters: set[asyncio.Event] = set()
        self._stopping = False
        # Batches waiting here for their turn, and per batch key the newest of them while it
        # is not full: a later pass fills it up instead of starting a smaller batch of its
        # own. Batches are made when they can be sent, not when their tasks were leased: with
        # polls falling due faster than the provider's rate, each request carries as many
        # tasks as it can, instead of the few that fell due since the previous pass.
        self.waiting = 0
        self.filling: dict[Hashable, list[Task]] = {}

    @property
    def configured(self) -> bool:
        """Whether there is anyone to ask (a base URL, and credentials where needed)."""
        return self.provider.settings.configured

    def room(self) -> int:
        """How many more leased tasks this lane can put to use now: batches enough for its
        connections and as many again waiting (or as many as its rate starts within the
        horizon, if fewer), less the batches it holds, in flight or waiting for a turn. At 0
        its backlog is best left in the database, due, until an exchange ends: leased, it
        would only wait here past the horizon and be handed back (a write, and a lease
        again later, for each task)."""
        limits = self.limits
        rate_batches = math.ceil(limits.bucket.rate * WAIT_HORIZON_SECONDS)
        batches = max(1, min(2 * limits.concurrency, rate_batches))
        free = batches - limits.in_flight - self.waiting
        return max(0, free) * max(1, self.provider.batch_size)

    # --- the connection pool -----------------------------------------------------------

    def open(self) -> None:
        """Connections of the provider's own, as many as its concurrency limit: a provider
        whose connections hang cannot take the sockets another one needs. Each is a client
        with one keep-alive connection rather than one client with a pool of them: before
        each request a pool asks every idle connection of its own whether the server closed
        it (a system call each), which was a tenth of an exchange's CPU at eight. They
        share one TLS context: each client would otherwise load the CA bundle into one of its
        own (about 0.9 MB each)."""
        settings = self.provider.settings
        self.auth = self.provider.auth()
        tls = httpx.create_ssl_context()
        self._clients = [
            httpx.AsyncClient(
                verify=tls,
                timeout=httpx.Timeout(settings.request_timeout),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            for _ in range(max(1, settings.concurrency))
        ]

    async def close(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request, within the concurrency limit; the one used last, whose
        connection is the likeliest to be still open."""
        async with self.limits.semaphore:
            if not self._clients:
                raise RuntimeError("the lane is not open")
            client = self._clients.pop()
            try:
                yield client
            finally:
                self._clients.append(client)

    # --- waiting for a turn --------------------------------------------------------------

    async def wait_turn(self, slot: datetime) -> Turn:
        """Wait until a batch due at `slot` may start (or as soon after as the provider
        allows, within the horizon); hand it back if the provider is held meanwhile."""
        limits = self.limits
        give_up = after(self.clock.now(), WAIT_HORIZON_SECONDS)
        wake = asyncio.Event()
        self._waiters.add(wake)
        when: datetime | None = slot
        try:
            while True:
                await self.clock.sleep_until(when, wake)
                if self._stopping:
                    return Turn()
                wake.clear()
                now = self.clock.now()
                permit = limits.start(now)
                if permit is not None:
                    return Turn(permit)
                if limits.held_until(now) is not None:
                    return Turn(until=limits.slot_at(now, 0), held=True)
                ready = limits.ready_at(now)
                if ready is None and (now < give_up or limits.probing):
                    # Only the concurrency limit or a probe in flight is in the way: wait for
                    # an exchange to end rather than asking again on a timer (thousands of
                    # batches asking every 1/rate seconds took a sixth of the loop's CPU).
                    # A probe's verdict is waited for past the horizon: these batches are
                    # the ones it held, and they go as soon as it says the provider is back.
                    self._room_waiters.append(wake)
                    when = None if limits.probing else give_up
                    continue
                retry = ready or after(now, 1 / limits.bucket.rate)
                if retry > give_up:
                    return Turn(until=retry)
                when = retry
        finally:
            self._waiters.discard(wake)

    def ended(self, permit: Permit) -> None:
        """An exchange ended: the first batch still waiting for room may try to start, or
        after a probe's verdict every waiting batch (those it held go at once, at the rate;
        if it failed they find the provider held and are handed back)."""
        while self._room_waiters:
            wake = self._room_waiters.popleft()
            if wake in self._waiters and not wake.is_set():
                wake.set()
                if not permit.probe:
                    return

    def fill(self, tasks: list[Task]) -> list[Task]:
        """Add what fits of `tasks` to the batches waiting here; returns the rest."""
        if not self.filling:
            return tasks
        size = max(1, self.provider.batch_size)
        rest = []
        for task in tasks:
            batch = self.filling.get(self.provider.batch_key(task))
            if batch is not None and len(batch) < size:
                batch.append(task)
            else:
                rest.append(task)
        return rest

    def queued(self, batch: list[Task]) -> None:
        """`batch` waits here for its turn (and may be filled up meanwhile)."""
        self.waiting += 1
        if batch and len(batch) < max(1, self.provider.batch_size):
            self.filling[self.provider.batch_key(batch[0])] = batch

    def dequeued(self, batch: list[Task]) -> None:
        """`batch` got its turn, or went back to the database: no more tasks join it."""
        self.waiting -= 1
        if batch:
            key = self.provider.batch_key(batch[0])
            if self.filling.get(key) is batch:
                del self.filling[key]

    def stop_waiting(self) -> None:
        """Release every batch waiting here: the loop is stopping."""
        self._stopping = True
        for wake in self._waiters:
            wake.set()

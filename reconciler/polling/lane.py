"""One provider's lane: its adapter, its limits (`limits.ProviderLimits`), its HTTP
connections (`send`), and the batches waiting in memory for their turn.

A batch whose slot is near (within `WAIT_HORIZON_SECONDS`) waits here rather than being
handed back to the database, which would cost a write and a pass per batch, and later passes
fill it up while it waits (`fill`). It waits on the
clock for its slot, and for an exchange to end when only the concurrency limit or a probe
in flight is in the way: an ending exchange wakes the first batch waiting for room, and a
probe's verdict wakes them all. Nothing here decides what happens to tasks.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime

import aiohttp
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
        self._session: aiohttp.ClientSession | None = None  # see `open`
        self._proxy: str | None = None
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

    # --- the connections ----------------------------------------------------------------

    def open(self) -> None:
        """Connections of the provider's own, as many as its concurrency limit: a provider
        whose connections hang cannot take the sockets another one needs.

        The adapters speak `httpx` (they yield `httpx.Request`s and read `httpx.Response`s);
        the requests go out through aiohttp, whose HTTP parser is C: an httpx client (its
        pool, httpcore, h11 and anyio, all Python) took twice the CPU of this per 50-task
        AceData request, the request's building included (bench/http_client.py).
        Like an httpx client by default, it follows no redirect and keeps no cookie, takes
        its proxy from the environment (`HTTPS_PROXY`, `NO_PROXY`, ...; read here once, not
        on every request as aiohttp's `trust_env` would, with `~/.netrc` on a thread), and
        the TLS context is httpx's (`SSL_CERT_FILE`, certifi's bundle)."""
        self.auth = self.provider.auth()
        connector = aiohttp.TCPConnector(
            limit=max(1, self.provider.settings.concurrency), ssl=httpx.create_ssl_context()
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # httpx.Response decodes the body, by its headers
            timeout=aiohttp.ClientTimeout(total=None),  # the exchange times each request
        )
        base = httpx.URL(self.provider.settings.base_url or "")
        bypass = not base.host or urllib.request.proxy_bypass(base.host)
        self._proxy = None if bypass else urllib.request.getproxies().get(base.scheme)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, request: httpx.Request) -> httpx.Response:
        """`request`, with the provider's auth (a flow that may send it again, as Kling's
        after a 401), within the concurrency limit; each answer read whole. Raises
        `aiohttp.ClientError` or `OSError` when no answer comes."""
        async with self.limits.semaphore:
            if self._session is None:
                raise RuntimeError("the lane is not open")
            flow = (self.auth or httpx.Auth()).async_auth_flow(request)  # the base: as is
            try:
                request = await anext(flow)
                while True:
                    response = await _send(self._session, request, self._proxy)
                    try:
                        request = await flow.asend(response)
                    except StopAsyncIteration:
                        return response
            finally:
                await flow.aclose()

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


async def _send(
    session: aiohttp.ClientSession, request: httpx.Request, proxy: str | None
) -> httpx.Response:
    async with session.request(
        request.method,
        str(request.url),
        headers=request.headers,
        data=request.content or None,
        allow_redirects=False,
        proxy=proxy,
    ) as answer:
        body = await answer.read()
    return httpx.Response(answer.status, headers=answer.raw_headers, content=body, request=request)

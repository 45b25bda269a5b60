"""`Simulator`: the simulated providers served on loopback, and the callbacks they send.

It owns the lifetime (uvicorn on a pre-bound `127.0.0.1:0` socket, an httpx client for
callbacks, the optional background delivery task) and the sending of callbacks. What the
providers know is `World`'s; what they answer is `app.py`'s and `shapes.py`'s.

Callbacks go out in two ways: `deliver_due()` sends what is due at `clock.now()` (tests with
a `FakeClock` call it after advancing), and `start_background_delivery()` runs a task that
sleeps until the next due callback or a wake-up (new task, shutdown), never on a tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import httpx
import uvicorn

from reconciler.clock import Clock, SystemClock
from reconciler.simulator import shapes
from reconciler.simulator.app import build_app
from reconciler.simulator.auth import BEARER_KEYS, KLING_ACCESS_KEY, KLING_SECRET_KEY
from reconciler.simulator.faults import Faults
from reconciler.simulator.world import (
    CallbackRecord,
    PendingCallback,
    RecordedRequest,
    SimTask,
    Status,
    World,
)


class _Server(uvicorn.Server):
    # The simulator runs inside someone else's process (tests, `serve --demo`): the signals
    # belong to that process, so uvicorn must not install or re-raise its own handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Simulator:
    def __init__(
        self,
        clock: Clock | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        *,
        processing_after: float = 5.0,
        finish_after: float = 60.0,
        fail_rate: float = 0.0,
        callback_timeout_seconds: float = 10.0,
        delivery_concurrency: int = 16,
        record_callback_bodies: bool = True,
    ) -> None:
        """`processing_after`/`finish_after`/`fail_rate` are the lifecycle defaults, also for
        tasks created through the providers' own creation endpoints.
        `delivery_concurrency` bounds the background delivery (one task's callbacks always
        go out in order); `record_callback_bodies=False` saves memory in benchmarks."""
        self.clock: Clock = clock or SystemClock()
        self.world = World(
            self.clock,
            seed,
            faults,
            processing_after=processing_after,
            finish_after=finish_after,
            fail_rate=fail_rate,
        )
        self.callback_timeout_seconds = callback_timeout_seconds
        self.delivery_concurrency = delivery_concurrency
        self.record_callback_bodies = record_callback_bodies
        self._url: str | None = None
        # One client per concurrent delivery, each keeping a single connection: httpx checks
        # every pooled connection on every request, so one shared pool of 16 spent about
        # 40% of the simulator's CPU on those checks (py-spy, bench/reconcile.py).
        self._clients: asyncio.Queue[httpx.AsyncClient] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._delivery: asyncio.Task[None] | None = None
        # However a task is created (here, or through a provider's or the control endpoint),
        # new callbacks wake the background delivery, which may be sleeping until later.
        self.world.on_planned = lambda: self._wake.set()

    # -- lifetime -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, port: int = 0) -> AsyncIterator[Simulator]:
        """Serve on 127.0.0.1:`port` (0: any free port) until the block ends."""
        if self._url is not None:
            raise RuntimeError("this Simulator is already serving")
        release = asyncio.Event()
        config = uvicorn.Config(
            build_app(self.world, release), log_level="warning", lifespan="off", access_log=False
        )
        server = _Server(config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and this one's
        # is 0: without it, every answer written in two parts (uvicorn writes headers, then
        # body) waits ~40 ms for the client's delayed ACK. Accepted sockets inherit the flag.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        port = sock.getsockname()[1]
        # A pre-bound, listening socket needs no readiness wait: connections queue in its
        # backlog until uvicorn has started.
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        clients = [
            httpx.AsyncClient(
                timeout=self.callback_timeout_seconds,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            for _ in range(self.delivery_concurrency)
        ]
        self._clients = asyncio.Queue()
        for client in clients:
            self._clients.put_nowait(client)
        self._url = f"http://127.0.0.1:{port}"
        self._stopping = False
        self._wake = asyncio.Event()  # one per serve(): an Event belongs to one event loop
        try:
            yield self
        finally:
            try:
                await self._stop_delivery()
            finally:
                release.set()  # hung requests answer now, or uvicorn would wait for them
                server.should_exit = True
                await serving
                sock.close()
                self._clients = None
                for client in clients:
                    await client.aclose()
                self._url = None

    async def _stop_delivery(self) -> None:
        self._stopping = True
        self._wake.set()
        delivery, self._delivery = self._delivery, None
        if delivery is not None:
            await delivery

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the Simulator is not serving: use `async with sim.serve()`")
        return self._url

    def base_url(self, provider: str) -> str:
        return f"{self.url}/{provider}"

    def environ(self) -> dict[str, str]:
        """Environment for Reconciler's Settings: base URLs and the credentials checked here."""
        return {
            "KLING_BASE_URL": self.base_url("kling"),
            "KLING_ACCESS_KEY": KLING_ACCESS_KEY,
            "KLING_SECRET_KEY": KLING_SECRET_KEY,
            "COMETAPI_BASE_URL": self.base_url("cometapi"),
            "COMETAPI_KEY": BEARER_KEYS["cometapi"],
            "GATEWAY_BASE_URL": self.base_url("gateway"),
            "GATEWAY_API_KEY": BEARER_KEYS["gateway"],
            "ACEDATA_BASE_URL": self.base_url("acedata"),
            "ACEDATA_API_TOKEN": BEARER_KEYS["acedata"],
            "KIE_BASE_URL": self.base_url("kie"),
            "KIE_API_KEY": BEARER_KEYS["kie"],
        }

    # -- the world, re-exported ---------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self.world.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self.world.faults = faults

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.world.requests

    @property
    def callbacks_sent(self) -> list[CallbackRecord]:
        return self.world.callbacks

    def create_task(
        self,
        provider: str,
        action: str | None = None,
        callback_url: str | None = None,
        outcome: Status | None = None,
        processing_after: float | None = None,
        finish_after: float | None = None,
        external_task_id: str | None = None,
        rendering: str | None = None,
        error_message: str | None = None,
    ) -> SimTask:
        return self.world.create_task(
            provider,
            action,
            callback_url,
            outcome,
            processing_after,
            finish_after,
            external_task_id,
            rendering,
            error_message,
        )

    def truth(self, provider: str, task_id: str) -> Status:
        return self.world.truth(provider, task_id)

    # -- callbacks ----------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Send every callback due at `clock.now()`, in due order; return how many POSTs
        were made (a duplicated callback counts twice, a dropped one not at all)."""
        sent = 0
        for callback in self.world.pop_due(self.clock.now()):
            sent += await self._deliver(callback)
        return sent

    def start_background_delivery(self) -> None:
        if self._url is None:
            raise RuntimeError("start_background_delivery() needs a serving Simulator")
        if self._delivery is None:
            self._delivery = asyncio.create_task(self._deliver_forever())

    async def _deliver_forever(self) -> None:
        while not self._stopping:
            self._wake.clear()
            # A bounded round: a backlog drains in order, a round at a time, instead of one
            # huge round holding back every callback that falls due meanwhile.
            due = self.world.pop_due(self.clock.now(), limit=4 * self.delivery_concurrency)
            if due:
                await self._deliver_concurrently(due)
                continue  # sending took time: more may be due already
            await self.clock.sleep_until(self.world.next_due_at(), self._wake)

    async def _deliver_concurrently(self, due: list[PendingCallback]) -> None:
        """Different tasks' callbacks in parallel (bounded); one task's strictly in order."""
        by_task: dict[int, list[PendingCallback]] = {}
        for callback in due:
            by_task.setdefault(id(callback.task), []).append(callback)

        async def deliver_in_order(callbacks: list[PendingCallback]) -> None:
            for callback in callbacks:
                await self._deliver(callback)

        async with asyncio.TaskGroup() as group:
            for callbacks in by_task.values():
                group.create_task(deliver_in_order(callbacks))

    async def _deliver(self, callback: PendingCallback) -> int:
        task = callback.task
        assert task.callback_url is not None
        now = self.clock.now()
        if callback.dropped:
            self.world.record_callback(
                self._record(callback, None, now, dropped=True, body=None, error=None)
            )
            return 0
        body = json.dumps(shapes.callback_body(task, callback.status)).encode()
        copies = 2 if callback.duplicated else 1
        for copy in range(copies):
            status, error = await self._post(task.callback_url, body)
            self.world.record_callback(
                self._record(
                    callback, status, self.clock.now(), duplicated=copy > 0, body=body, error=error
                )
            )
        return copies

    async def _post(self, url: str, body: bytes) -> tuple[int | None, str | None]:
        """POST on a free client; at most `delivery_concurrency` are in flight."""
        clients = self._clients
        if clients is None:
            raise RuntimeError("callbacks are sent only while the Simulator is serving")
        client = await clients.get()
        try:
            response = await client.post(
                url, content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:  # a receiver that is down is recorded, not raised
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            clients.put_nowait(client)
        return response.status_code, None

    def _record(
        self,
        callback: PendingCallback,
        status: int | None,
        at: datetime,
        *,
        body: bytes | None,
        error: str | None,
        dropped: bool = False,
        duplicated: bool = False,
    ) -> CallbackRecord:
        task = callback.task
        return CallbackRecord(
            provider=task.provider,
            task_id=task.task_id,
            status=callback.status,
            url=task.callback_url or "",
            response_status=status,
            due_at=callback.due_at,
            at=at,
            dropped=dropped,
            duplicated=duplicated,
            reordered=callback.reordered,
            error=error,
            body=body if self.record_callback_bodies else None,
        )

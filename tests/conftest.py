"""What the suite shares: the clock (`JumpingClock`), the provider simulator on it, a migrated
SQLite store, and the one way to run the whole service on 127.0.0.1 (`serve`, and the
`start_service` fixture built on it)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import settings

from reconciler.clock import Clock, FakeClock
from reconciler.config import Settings
from reconciler.simulator import Simulator
from reconciler.store.sqlite import SQLiteStore
from tests import postgres

if TYPE_CHECKING:  # the runtime imports everything; fixtures import it only when used
    from starlette.applications import Starlette

    from reconciler.api.stream import Streams
    from reconciler.reconciler import Health, Reconciler
    from reconciler.runtime import Runtime
    from reconciler.service import Service

# Deterministic property tests (the same examples every run) with no per-example deadline:
# these machines are noisy, and a slow example is not a failure.
settings.register_profile("reconciler", derandomize=True, deadline=None)
settings.load_profile("reconciler")


class JumpingClock(FakeClock):
    """A FakeClock whose `sleep_until(when)` moves time to `when` instead of waiting.

    Under `run_once()` the only sleepers are the loop's own waits for a provider's token
    within an exchange (e.g. Kling's query, then its list): jumping to the promised time is
    what a discrete-event simulation does, and keeps the pass from waiting for a test that
    is itself waiting for the pass. (Tests of `run()` use a plain `FakeClock`.)
    """

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        if when is None or wake.is_set():
            await super().sleep_until(when, wake)
        elif when > self.now():
            self.set(when)


@pytest.fixture
def clock() -> JumpingClock:
    return JumpingClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    """The provider simulator on the test's clock, no faults (set `sim.faults` to add some)."""
    async with Simulator(clock=clock, seed=3).serve() as served:
        yield served


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    """PostgreSQL for the tests that need it (see tests/postgres.py: skipped with one reason
    where no server answers)."""
    server = postgres.start_server()
    yield server
    postgres.stop_server(server)


@pytest.fixture
async def postgres_url(postgres_server: postgres.Server) -> AsyncIterator[str]:
    """A fresh, migrated PostgreSQL database for this test."""
    url = await postgres_server.create()
    yield url
    await postgres_server.drop(url)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "test.db") as opened:
        yield opened


@dataclass
class Served:
    """A running service: its runtime (store, feed, service, loop, app), its URL and a
    client for it."""

    runtime: Runtime
    url: str
    client: httpx.AsyncClient
    sock: socket.socket

    @property
    def service(self) -> Service:
        return self.runtime.service

    @property
    def loop(self) -> Reconciler:
        return self.runtime.reconciler

    @property
    def health(self) -> Health:
        """The loop's own health, for tests that stand in for a loop that is not running."""
        return self.runtime.reconciler.health

    @property
    def app(self) -> Starlette:
        return self.runtime.app

    @property
    def streams(self) -> Streams:
        streams: Streams = self.runtime.app.state.streams
        return streams


@contextlib.asynccontextmanager
async def serve(
    database: Path,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    *,
    rng: random.Random | None = None,
    streams: Streams | None = None,
    send_buffer: int | None = None,
    client_timeout: float = 30,
) -> AsyncIterator[Served]:
    """The service as `reconciler serve` assembles it (`runtime.open_runtime`, `bind`,
    `server_for`), on a pre-bound 127.0.0.1 port, without its reconciler loop running: tests
    of the loop drive it (`run_once()`, or `run()` as a task of their own).

    `send_buffer` sets SO_SNDBUF on the listening socket (accepted ones inherit it), so a
    client that stops reading fills the server's buffers with little data."""
    from reconciler.api.stream import Streams, close_streams
    from reconciler.runtime import bind, open_runtime, server_for

    environ = {"RECONCILER_DATABASE_URL": f"sqlite:///{database}", **(env or {})}
    async with open_runtime(Settings.from_environ(environ), clock, rng) as runtime:
        app = runtime.app
        app.state.streams = streams or Streams()
        sock = bind("127.0.0.1", 0)
        if send_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        server = server_for(app)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=client_timeout) as client:
                yield Served(runtime, url, client, sock)
        finally:
            # uvicorn waits for open responses on shutdown: end the streams first.
            close_streams(app)
            server.should_exit = True
            await serving


StartService = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """`await start_service(env={...}, clock=None, rng=None)`: `serve` for the length of the
    test, each on a database of its own."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(
            env: Mapping[str, str] | None = None,
            clock: Clock | None = None,
            rng: random.Random | None = None,
        ) -> Served:
            nonlocal count
            count += 1
            database = tmp_path / f"service{count}.db"
            return await stack.enter_async_context(serve(database, env, clock, rng=rng))

        yield start

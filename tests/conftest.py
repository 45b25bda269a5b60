"""Fixtures shared by the whole suite: a fake clock, a migrated SQLite store, and a whole
service served by uvicorn on a pre-bound loopback socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import settings

from reconciler.clock import Clock, FakeClock
from reconciler.config import Settings
from reconciler.store.sqlite import SQLiteStore

if TYPE_CHECKING:  # the runtime imports everything; fixtures import it only when used
    from reconciler.runtime import Runtime

# Deterministic property tests (the same examples every run) with no per-example deadline:
# these machines are noisy, and a slow example is not a failure.
settings.register_profile("reconciler", derandomize=True, deadline=None)
settings.load_profile("reconciler")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "test.db") as opened:
        yield opened


@dataclass
class Served:
    runtime: Runtime
    url: str
    client: httpx.AsyncClient


StartService = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """`await start_service(env={...}, clock=None)`: the real app on 127.0.0.1, without the
    reconciler loop running (tests of the loop drive it themselves)."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(env: Mapping[str, str] | None = None, clock: Clock | None = None) -> Served:
            from reconciler.runtime import bind, open_runtime, server_for

            nonlocal count
            count += 1
            environ = {"RECONCILER_DATABASE_URL": f"sqlite:///{tmp_path}/service{count}.db"}
            environ.update(env or {})
            runtime = await stack.enter_async_context(
                open_runtime(Settings.from_environ(environ), clock)
            )
            sock = bind("127.0.0.1", 0)
            server = server_for(runtime.app)
            task = asyncio.create_task(server.serve(sockets=[sock]))

            async def stop() -> None:
                server.should_exit = True
                await task

            stack.push_async_callback(stop)
            host, port = sock.getsockname()[:2]
            url = f"http://{host}:{port}"
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
            return Served(runtime, url, client)

        yield start

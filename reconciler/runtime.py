"""Assembling and running the service: `open_runtime(settings)` builds everything,
`run_service(runtime)` supervises the root tasks (HTTP server, reconciler loop, and the
pruner of `retention.py`).

When any root task ends, the others are stopped gracefully and the first error is
re-raised: a deaf server and a dead loop both end the process (STYLE "Async structure").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

from reconciler.api import create_app
from reconciler.api.stream import close_streams
from reconciler.clock import Clock, SystemClock
from reconciler.config import Settings
from reconciler.feed import Feed
from reconciler.metrics import Metrics
from reconciler.model import Commit
from reconciler.providers import PROVIDERS, Provider
from reconciler.reconciler import Health, Reconciler
from reconciler.retention import Retention
from reconciler.service import Service
from reconciler.store import Store, open_store

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    feed: Feed
    service: Service
    reconciler: Reconciler
    app: Starlette


def build_providers(settings: Settings, clock: Clock) -> dict[str, Provider]:
    return {name: cls(settings.providers[name], clock) for name, cls in PROVIDERS.items()}


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, clock: Clock | None = None, rng: random.Random | None = None
) -> AsyncIterator[Runtime]:
    clock = clock or SystemClock()
    feed = Feed()
    metrics = Metrics()

    def on_commit(commit: Commit) -> None:
        metrics.events.inc(commit.events)
        feed.publish(commit)

    async with open_store(settings.database_url, on_commit=on_commit) as store:
        feed.publish(Commit(await store.last_seq()))
        providers = build_providers(settings, clock)
        # The loop's account of itself: it writes it, the service only reads it.
        health = Health()
        service = Service(settings, store, providers, clock, feed, metrics, rng, health)
        async with Reconciler(
            service,
            providers,
            clock,
            alarm=feed.alarm,
            metrics=metrics,
            health=health,
            leadership=store.leadership,
        ) as reconciler:
            yield Runtime(settings, store, feed, service, reconciler, create_app(service))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket: the port is known (and connectable) before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A socket made by socket.socket() has protocol 0, so asyncio never sets TCP_NODELAY on
    # the connections it accepts; accepted sockets inherit it from here. Without it a small
    # answer waits ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server_for(app: Starlette, access_log: bool = False) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # logging is set up by logs.setup(); uvicorn adds no handlers
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


async def run_service(
    runtime: Runtime, sock: socket.socket, access_log: bool = False
) -> uvicorn.Server:
    """Serve HTTP on `sock` and run the reconciler loop until one of them ends, or until
    SIGTERM/SIGINT.

    Our handlers are installed before uvicorn starts: uvicorn swaps in its own while it
    serves, then restores ours and re-raises the signal into them after its graceful
    shutdown, so the loop stops too and the process exits 0 instead of dying mid-stop."""
    server = server_for(runtime.app, access_log)

    def on_signal(signum: int, frame: object) -> None:
        close_streams(runtime.app)
        server.should_exit = True
        runtime.reconciler.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The webhook path allocates many short-lived objects; a higher threshold for the
    # youngest generation and a frozen start-up heap halve the collector's share of it.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    loop = asyncio.create_task(runtime.reconciler.run(), name="reconciler")
    retention = Retention(runtime.service)
    pruning = asyncio.create_task(retention.run(), name="retention")
    try:
        done, _ = await asyncio.wait({http, loop, pruning}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        close_streams(runtime.app)  # uvicorn's shutdown waits for open SSE responses
        server.should_exit = True
        runtime.reconciler.stop()
        retention.stop()
        results = await asyncio.gather(http, loop, pruning, return_exceptions=True)
    if loop in done and http not in done:
        logger.error("the reconciler loop stopped; shutting the server down")
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    return server

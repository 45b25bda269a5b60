"""`reconciler serve --demo`: the whole service against the built-in simulated providers.

One command, no credentials. The simulator runs on another loopback port with callback
faults switched on (dropped, duplicated, delayed, reordered callbacks, the odd 429), a
driver keeps creating tasks across all five providers with callbacks pointing at the
service (registering some before and some after their first callback, as real applications
do), and the dashboard shows webhooks arriving and missed callbacks recovered by polling.

The database is a fresh file in a temporary directory unless RECONCILER_DATABASE_URL is
set, and poll timing is shortened so that recoveries happen within a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import tempfile
from dataclasses import replace

import click

from reconciler import logs
from reconciler.config import Settings
from reconciler.errors import ReconcilerError
from reconciler.runtime import Runtime, bind, open_runtime, run_service
from reconciler.service import Service
from reconciler.simulator import Faults, Simulator

logger = logging.getLogger(__name__)

PROVIDERS = ("kling", "cometapi", "gateway", "acedata", "kie")
ACTIONS = {
    "kling": ("text2video", "image2video"),
    "cometapi": ("text2video", "image2video"),
    "gateway": ("text2video",),
    "acedata": ("text2video",),
    "kie": ("jobs", "veo"),
}
DEMO_FAULTS = Faults(
    drop=0.3,
    duplicate=0.1,
    reorder=0.1,
    delay=4.0,
    delay_rate=0.2,
    rate_limit=0.02,
    retry_after=2.0,
)
DEMO_TIMING = {
    "RECONCILER_FIRST_POLL_AFTER": "40",
    "RECONCILER_POLL_INTERVAL_MAX": "15",
    "RECONCILER_NOT_FOUND_GRACE": "60",
    "RECONCILER_DEADLINE": "300",
}
NEW_TASK_EVERY_SECONDS = 1.5


def demo_settings(settings: Settings, simulator: Simulator, token: str) -> Settings:
    environ = {**DEMO_TIMING, **simulator.environ(), "RECONCILER_CALLBACK_TOKEN": token}
    if "RECONCILER_DATABASE_URL" not in os.environ:
        directory = tempfile.mkdtemp(prefix="reconciler-demo-")
        environ["RECONCILER_DATABASE_URL"] = f"sqlite:///{directory}/demo.db"
    else:
        environ["RECONCILER_DATABASE_URL"] = settings.database_url
    demo = Settings.from_environ(environ)
    return replace(demo, host=settings.host, port=settings.port, api_token=settings.api_token)


async def drive(simulator: Simulator, service: Service, callback_base: str, token: str) -> None:
    """Create tasks forever, like an application would."""
    rng = random.Random()
    while True:
        provider = rng.choice(PROVIDERS)
        action = rng.choice(ACTIONS[provider])
        task = simulator.create_task(
            provider,
            action,
            callback_url=f"{callback_base}/callbacks/{provider}?token={token}",
            outcome="failed" if rng.random() < 0.15 else "completed",
            processing_after=rng.uniform(2, 8),
            finish_after=rng.uniform(15, 75),
        )
        metadata = {"prompt": rng.choice(["a kitten on a beach", "city at night", "waves"])}
        if rng.random() < 0.8:
            await service.register(provider, task.task_id, action, metadata)
        else:  # registered late: its first callback creates the task
            asyncio.get_running_loop().call_later(
                20, _register_later, service, provider, task.task_id, action, metadata
            )
        await asyncio.sleep(rng.uniform(0.5, 2 * NEW_TASK_EVERY_SECONDS))


_late: set[asyncio.Task[object]] = set()


def _register_later(
    service: Service, provider: str, task_id: str, action: str, metadata: dict[str, str]
) -> None:
    task = asyncio.ensure_future(service.register(provider, task_id, action, metadata))
    _late.add(task)  # keep a reference until it is done
    task.add_done_callback(_late.discard)


async def run_demo(settings: Settings, access_log: bool = False) -> None:
    simulator = Simulator(seed=random.randrange(2**32), faults=DEMO_FAULTS)
    token = secrets.token_urlsafe(16)
    logs.protect([token])
    try:
        sock = bind(settings.host, settings.port)
    except OSError as error:
        raise click.ClickException(
            f"cannot listen on {settings.host}:{settings.port} ({error.strerror}); "
            "choose another port with --port"
        ) from None
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    async with simulator.serve():
        simulator.start_background_delivery()
        settings = demo_settings(settings, simulator, token)
        async with open_runtime(settings) as runtime:
            _announce(url, runtime, simulator)
            driver = asyncio.create_task(drive(simulator, runtime.service, url, token))
            try:
                await run_service(runtime, sock, access_log)
            except ReconcilerError as error:
                raise click.ClickException(str(error)) from None
            finally:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver


def _announce(url: str, runtime: Runtime, simulator: Simulator) -> None:
    click.echo(
        f"Reconciler demo\n"
        f"  dashboard:  {url}/\n"
        f"  events:     {url}/events/stream\n"
        f"  simulator:  {simulator.url} (30% of callbacks dropped, some duplicated or late)\n"
        f"  database:   {runtime.settings.database_url}\n"
        f"Press Ctrl-C to stop."
    )

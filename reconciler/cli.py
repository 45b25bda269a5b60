"""The `reconciler` command (SPEC §5): parse arguments, build Settings, call the runtime.

`serve` runs `runtime.run_service` on uvloop; that installs the SIGTERM/SIGINT handlers
before uvicorn starts, so the reconciler loop stops gracefully and the exit code is 0.
`track` and `tail` talk to a running server over HTTP: one process owns the database.
`migrate`, `replay` and `prune` open the database themselves (replay and prune beside a
running server too: ids are read inside each write transaction, and a prune is a series of
small ones); so does `copy`, which reads one snapshot of it.

Bad configuration prints one line and exits 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import click
import httpx

from reconciler import __version__, logs
from reconciler.config import PROVIDER_NAMES, Settings, read_env_file, redact_url
from reconciler.errors import ConfigError, ReconcilerError

if TYPE_CHECKING:
    from reconciler.store.rows import Copied


def load_settings(env_file: str | None, overrides: Mapping[str, str] | None = None) -> Settings:
    environ: dict[str, str] = {}
    if env_file:
        environ.update(read_env_file(env_file))
    environ.update(os.environ)  # the real environment wins over the file
    environ.update(overrides or {})
    return Settings.from_environ(environ)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (`uvicorn[standard]`), as `uvicorn.run` would:
    `Server.serve()` runs on whatever loop is running, and the standard library's selector
    loop costs the webhook path a large share of its throughput."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"reconciler: {message}", err=True)
    sys.exit(code)


def secrets_of(settings: Settings) -> list[str]:
    found = [s.reveal() for s in (settings.api_token, settings.callback_token) if s]
    for provider in settings.providers.values():
        for secret in (provider.api_key, provider.secret_key, provider.webhook_secret):
            if secret is not None:
                found.append(secret.reveal())
    return found


env_file_option = click.option(
    "--env-file", type=click.Path(dir_okay=False), help="Read NAME=value lines from this file."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """Reconciler: webhooks + polling into one exact event log of provider tasks."""


@main.command()
@env_file_option
@click.option("--host", help="Listen address (default RECONCILER_HOST or 127.0.0.1).")
@click.option("--port", type=int, help="Listen port (default PORT / RECONCILER_PORT or 8080).")
@click.option("--demo", is_flag=True, help="Run against the built-in simulated providers.")
@click.option("--access-log", is_flag=True, help="Log every request (query strings redacted).")
@click.option("--log-level", default="INFO", show_default=True)
def serve(
    env_file: str | None,
    host: str | None,
    port: int | None,
    demo: bool,
    access_log: bool,
    log_level: str,
) -> None:
    """Serve the API and webhooks, and run the reconciler loop."""
    overrides = {}
    if host:
        overrides["RECONCILER_HOST"] = host
    if port is not None:
        overrides["RECONCILER_PORT"] = str(port)
    try:
        settings = load_settings(env_file, overrides)
    except ConfigError as error:
        fail(str(error))
    if demo:
        from reconciler.demo import run_demo

        logs.setup(log_level.upper(), secrets_of(settings))
        run_loop(run_demo(settings, access_log))
        return
    logs.setup(log_level.upper(), secrets_of(settings))
    try:
        run_loop(_serve(settings, access_log))
    except ReconcilerError as error:
        fail(str(error), 1)


async def _serve(settings: Settings, access_log: bool) -> None:
    from reconciler.runtime import bind, open_runtime, run_service

    try:
        sock = bind(settings.host, settings.port)
    except OSError as error:
        raise ReconcilerError(
            f"cannot listen on {settings.host}:{settings.port}: {error.strerror}"
        ) from None
    async with open_runtime(settings) as runtime:
        address = sock.getsockname()
        click.echo(f"reconciler {__version__} listening on http://{address[0]}:{address[1]}")
        sys.stdout.flush()  # a supervisor (or test) reading our stdout learns the port now
        await run_service(runtime, sock, access_log)


@main.command()
@env_file_option
def migrate(env_file: str | None) -> None:
    """Apply database migrations and exit."""
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))

    async def run() -> None:
        from reconciler.store import open_store

        async with open_store(settings.database_url):
            pass

    try:
        asyncio.run(run())
    except ReconcilerError as error:
        fail(str(error), 1)
    click.echo(f"database {redact_url(settings.database_url)} is up to date")


def _api(settings: Settings, url: str | None) -> httpx.Client:
    base = url or f"http://{settings.host}:{settings.port}"
    headers = {}
    if settings.api_token is not None:
        headers["Authorization"] = f"Bearer {settings.api_token.reveal()}"
    return httpx.Client(base_url=base, headers=headers, timeout=70.0)


def _check(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_error:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        fail(f"HTTP {response.status_code}: {error.get('message', response.text[:200])}", 1)
    return body


url_option = click.option("--url", help="The running server (default http://HOST:PORT).")


@main.command()
@env_file_option
@url_option
@click.argument("provider", type=click.Choice(PROVIDER_NAMES))
@click.argument("task_id")
@click.option("--action", help="The provider's task family, e.g. text2video, veo, jobs.")
@click.option("--deadline", type=float, help="Seconds before the task expires.")
def track(
    env_file: str | None,
    url: str | None,
    provider: str,
    task_id: str,
    action: str | None,
    deadline: float | None,
) -> None:
    """Register a task with the running server."""
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))
    body: dict[str, Any] = {"provider": provider, "task_id": task_id}
    if action:
        body["action"] = action
    if deadline:
        body["deadline_seconds"] = deadline
    try:
        with _api(settings, url) as client:
            task = _check(client.post("/tasks", json=body))
    except httpx.HTTPError as error:
        fail(f"cannot reach the server: {error}", 1)
    click.echo(json.dumps(task, indent=2))


@main.command()
@env_file_option
@url_option
@click.option("--after", type=int, default=0, show_default=True, help="Start after this seq.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come.")
def tail(env_file: str | None, url: str | None, after: int, follow: bool) -> None:
    """Print the event log, one JSON event per line."""
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))
    try:
        with _api(settings, url) as client:
            events = _follow(client, after) if follow else _page_all(client, after)
            for event in events:
                click.echo(event)
    except httpx.HTTPError as error:
        fail(f"cannot reach the server: {error}", 1)
    except KeyboardInterrupt:
        pass


def _check_cursor(response: httpx.Response, after: int) -> None:
    """A cursor that fell off the log (410): say so in one line, with where to start again."""
    if response.status_code != 410:
        return
    try:
        oldest = int(response.json()["error"]["oldest_seq"])
    except (ValueError, KeyError, TypeError):
        return  # not our answer: `_check` reports it as it is
    fail(
        f"events after seq {after} were pruned (the oldest kept is seq {oldest}); "
        f"start again with --after {oldest - 1} or --after 0",
        1,
    )


def _page_all(client: httpx.Client, after: int) -> Iterator[str]:
    while True:
        response = client.get("/events", params={"after": after, "limit": 1000})
        _check_cursor(response, after)
        page = _check(response)
        for event in page["events"]:
            yield json.dumps(event, separators=(",", ":"))
        if not page["events"]:
            return
        after = page["last_seq"]


def _follow(client: httpx.Client, after: int) -> Iterator[str]:
    """Read the SSE stream, resuming from the last id seen if the connection drops."""
    while True:
        headers = {"Last-Event-ID": str(after)} if after else {}
        with client.stream(
            "GET",
            "/events/stream",
            params={"after": after},
            headers=headers,
            timeout=httpx.Timeout(10.0, read=None),
        ) as response:
            if response.is_error:
                response.read()
                _check_cursor(response, after)
                _check(response)
            for line in response.iter_lines():
                if line.startswith("id:"):
                    after = int(line[3:].strip())
                elif line.startswith("data:"):
                    yield line[5:].strip()


@main.command()
@env_file_option
@click.option("--delivery", "delivery_ids", type=int, multiple=True, help="A delivery id.")
@click.option("--failed", is_flag=True, help="Every delivery that could not be applied.")
def replay(env_file: str | None, delivery_ids: tuple[int, ...], failed: bool) -> None:
    """Re-apply stored deliveries (after a fix that can now read them)."""
    if not delivery_ids and not failed:
        fail("say which deliveries: --delivery ID (repeatable) or --failed")
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))

    async def run() -> list[Any]:
        from reconciler.runtime import open_runtime

        async with open_runtime(settings) as runtime:
            return await runtime.service.replay(list(delivery_ids) or None, failed=failed)

    try:
        results = asyncio.run(run())
    except ReconcilerError as error:
        fail(str(error), 1)
    for result in results:
        line = f"delivery {result.delivery_id}: {result.outcome.value}"
        if result.error is not None:
            line += f" ({result.error.code}: {result.error.message})"
        click.echo(line)


@main.command()
@env_file_option
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
def prune(env_file: str | None, dry_run: bool) -> None:
    """Apply retention once now (RECONCILER_RETAIN_*) and print what was removed."""
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))

    async def run() -> list[tuple[str, int, bool]]:
        """Per kind: its name, the rows removed (or removable), and whether it is kept forever."""
        from reconciler.retention import Retention
        from reconciler.runtime import open_runtime

        async with open_runtime(settings) as runtime:
            service = runtime.service
            retention = Retention(service)
            counts = await (retention.prunable() if dry_run else retention.prune_once())
            return [
                (kind.value, count, service.retention_cutoff(kind) is None)
                for kind, count in counts.items()
            ]

    try:
        counts = asyncio.run(run())
    except ReconcilerError as error:
        fail(str(error), 1)
    verb = "would remove" if dry_run else "removed"
    for kind, count, forever in counts:
        note = " (kept forever)" if forever else ""
        click.echo(f"{kind}: {verb} {count}{note}")


@main.command("callback-url")
@env_file_option
@click.argument("provider", type=click.Choice(PROVIDER_NAMES))
def callback_url(env_file: str | None, provider: str) -> None:
    """Print the callback URL (with its token) to hand to PROVIDER."""
    try:
        settings = load_settings(env_file)
    except ConfigError as error:
        fail(str(error))
    if settings.public_url is None:
        fail("RECONCILER_PUBLIC_URL is not set: it is the base URL providers can reach.")
    url = f"{settings.public_url}/callbacks/{provider}"
    if settings.callback_token is not None:
        url += f"?token={quote(settings.callback_token.reveal(), safe='')}"
    click.echo(url)


@main.command("copy")
@env_file_option
@click.option(
    "--to",
    "target",
    required=True,
    metavar="postgresql://…",
    help="An empty PostgreSQL database to copy into.",
)
def copy_database(env_file: str | None, target: str) -> None:
    """Copy this (SQLite) database into an empty PostgreSQL one, seqs and ids kept."""
    from reconciler.store.transfer import copy, source_path

    try:
        settings = load_settings(env_file)
        source = source_path(settings.database_url, target)
    except ConfigError as error:
        fail(str(error))

    async def run() -> Copied:
        return await copy(source, target)

    try:
        copied = asyncio.run(run())
    except ConfigError as error:
        fail(str(error))
    except ReconcilerError as error:
        fail(str(error), 1)
    click.echo(
        f"copied {copied.tasks} tasks, {copied.deliveries} deliveries and {copied.events} "
        f"events (last seq {copied.last_seq}) into {redact_url(target)}"
    )

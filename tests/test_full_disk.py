"""SPEC §4: a full disk loses nothing. The database lives on a small tmpfs; a real
`reconciler serve` takes webhooks until the disk is full (filled up with a ballast file),
answers 503 and turns /readyz 503 with the reason, then recovers by itself once the ballast
is deleted, before any new webhook arrives. Every webhook it acknowledged is stored; none it
refused is.

SQLite keeps its file on the tmpfs; PostgreSQL gets a database in a tablespace on it (the
server must run on this machine, as the `postgres` user). Mounting needs root: where it is
not permitted, the test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import pwd
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests import postgres
from tests.serve import serve

TOKEN = "full-disk-token"
TIMEOUT = 60
MAX_WEBHOOKS = 5000  # far more than an 8-32 MiB disk holds at 4 KiB each

Stored = dict[int, str]  # delivery id -> sha256 of its body


@contextlib.contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on a fresh directory other users can reach (PostgreSQL's
    server runs as its own user); skips when mounting is not permitted."""
    with tempfile.TemporaryDirectory(prefix="reconciler-full-disk-") as parent:
        os.chmod(parent, 0o755)
        mount = Path(parent) / "disk"
        mount.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
        except FileNotFoundError:
            pytest.skip("full-disk test skipped: no `mount` command here")
        if done.returncode != 0:
            why = done.stderr.strip() or f"exit code {done.returncode}"
            pytest.skip(f"full-disk test skipped: cannot mount a small tmpfs here ({why})")
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True, timeout=TIMEOUT)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem has no byte left."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65536
    with ballast.open("wb", buffering=0) as file:
        while True:
            try:
                file.write(chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return ballast


def webhook(number: int) -> bytes:
    """A terminal Kling callback (nothing for the loop to poll), padded to about 4 KiB."""
    return json.dumps(
        {
            "task_id": f"full-{number}",
            "task_status": "succeed",
            "task_result": {"videos": [{"url": f"https://cdn.example/{number}.mp4"}]},
            "padding": "x" * 4000,
        }
    ).encode()


@dataclass
class Backend:
    url: str
    disk: Path  # where the ballast goes
    stored: Callable[[], Awaitable[Stored]]


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest) -> postgres.Server | None:
    """The PostgreSQL server for the `postgresql` run (None for `sqlite`)."""
    if request.param == "sqlite":
        return None
    found: postgres.Server = request.getfixturevalue("postgres_server")
    return found


@pytest.fixture
async def backend(server: postgres.Server | None) -> AsyncIterator[Backend]:
    if server is None:
        with small_disk("8m") as disk:
            path = disk / "reconciler.db"

            async def stored_sqlite() -> Stored:
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    return dict(db.execute("SELECT id, sha256 FROM deliveries").fetchall())

            yield Backend(f"sqlite:///{path}", disk, stored_sqlite)
        return
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("full-disk test on PostgreSQL skipped: no local `postgres` user")
    with small_disk("32m") as disk:
        location = disk / "tablespace"
        location.mkdir()
        os.chown(location, owner.pw_uid, owner.pw_gid)
        name = f"retention_full_disk_{os.getpid()}"
        admin = await asyncpg.connect(server.url)
        try:
            try:
                await admin.execute(f"CREATE TABLESPACE \"{name}\" LOCATION '{location}'")
            except asyncpg.PostgresError as error:
                pytest.skip(f"full-disk test on PostgreSQL skipped: no tablespace here ({error})")
            await admin.execute(f'CREATE DATABASE "{name}" TABLESPACE "{name}"')
            url = postgres.database_url(server.url, name)

            async def stored_postgres() -> Stored:
                conn = await asyncpg.connect(url)
                try:
                    rows = await conn.fetch("SELECT id, sha256 FROM deliveries")
                finally:
                    await conn.close()
                return {row[0]: row[1] for row in rows}

            yield Backend(url, disk, stored_postgres)
        finally:
            with contextlib.suppress(FileNotFoundError):
                (disk / "ballast").unlink()  # never leave the server a full tablespace
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'DROP TABLESPACE IF EXISTS "{name}"')
            await admin.close()


def serving(
    database_url: str,
) -> contextlib.AbstractAsyncContextManager[tuple[asyncio.subprocess.Process, str]]:
    settings = {"RECONCILER_DATABASE_URL": database_url, "RECONCILER_CALLBACK_TOKEN": TOKEN}
    return serve(settings, stderr=asyncio.subprocess.DEVNULL)  # a full disk is logged at length


async def test_a_full_disk_loses_nothing_and_the_service_recovers(backend: Backend) -> None:
    acknowledged: Stored = {}
    refused: list[int] = []

    async def send(client: httpx.AsyncClient, number: int) -> int:
        body = webhook(number)
        response = await client.post(f"/callbacks/kling?token={TOKEN}", content=body)
        if response.status_code == 200:
            acknowledged[response.json()["delivery_id"]] = hashlib.sha256(body).hexdigest()
        else:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert response.headers["retry-after"] == "5"
            refused.append(number)
        return response.status_code

    async with serving(backend.url) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            for number in range(20):
                assert await send(client, number) == 200
            assert (await client.get("/readyz")).status_code == 200

            ballast = fill(backend.disk)
            numbers = iter(range(20, MAX_WEBHOOKS))
            for number in numbers:
                if await send(client, number) != 200:
                    break
            else:
                pytest.fail("the full disk never refused a webhook")
            for _ in range(4):  # and it goes on refusing
                assert await send(client, next(numbers)) == 503
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            reasons = ready.json()["reasons"]
            assert any(
                reason.startswith("database cannot commit writes: ")
                and ("disk is full" in reason or "out of disk space" in reason)
                for reason in reasons
            ), reasons

            ballast.unlink()  # space comes back; no webhook arrives to show it
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            for _ in range(20):
                assert await send(client, next(numbers)) == 200
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            assert await process.wait() == 0

    assert refused
    assert await backend.stored() == acknowledged  # every 200 stored, no 503 stored

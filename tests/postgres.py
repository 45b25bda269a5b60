"""A PostgreSQL server for the tests: a database per test, made from a migrated template.

`RECONCILER_TEST_POSTGRES_URL` names the server's maintenance database (it must allow
CREATE DATABASE). Unset, the tests try PostgreSQL's default address on loopback, and when
nothing answers there they are skipped with one reason. When the variable *is* set, a
server that does not answer fails them instead: CI sets it, so PostgreSQL tests can never
pass there by being skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from reconciler.store.postgres import PostgresStore

VARIABLE = "RECONCILER_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class Server:
    """The maintenance URL and this session's migrated template database."""

    url: str
    template: str
    _names: itertools.count[int] = field(default_factory=itertools.count)

    async def create(self) -> str:
        """A new database, migrated (a copy of the template); returns its URL."""
        name = f"{self.template}_{next(self._names)}"
        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        finally:
            await admin.close()
        return database_url(self.url, name)

    async def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _reachable(url: str) -> str | None:
    """None when a server answers at `url`, else why not."""
    try:
        async with asyncio.timeout(3):
            conn = await asyncpg.connect(url)
        await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return type(error).__name__
    return None


async def _make_template(url: str, template: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{template}"')
    finally:
        await admin.close()
    async with PostgresStore(database_url(url, template)):
        pass  # migrated once; every test's database is a copy


async def _drop_template(url: str, template: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    finally:
        await admin.close()


def start_server() -> Server:
    """The server, with this session's template made; skips (or fails, see above)."""
    url = os.environ.get(VARIABLE) or DEFAULT_URL
    why = asyncio.run(_reachable(url))
    if why is not None:
        if os.environ.get(VARIABLE):
            pytest.fail(f"{VARIABLE} is set but PostgreSQL does not answer there ({why})")
        pytest.skip(
            f"PostgreSQL tests skipped: {VARIABLE} is unset and nothing answers at "
            f"{DEFAULT_URL} ({why})"
        )
    template = f"reconciler_test_{os.getpid()}"
    asyncio.run(_make_template(url, template))
    return Server(url, template)


def stop_server(server: Server) -> None:
    asyncio.run(_drop_template(server.url, server.template))

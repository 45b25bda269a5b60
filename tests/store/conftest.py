"""The store contract suite runs on every backend: `backend` is parametrized over SQLite
(a file in `tmp_path`) and PostgreSQL (a fresh database per test, see tests/postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from reconciler.model import Commit
from reconciler.store import Store

OpenStore = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """`backend(on_commit=None)`: an unopened store on this test's database. Called twice,
    it gives two stores on the same database (PostgreSQL only: one process owns SQLite)."""
    if request.param == "sqlite":
        from reconciler.store.sqlite import SQLiteStore

        def open_sqlite(on_commit: Callable[[Commit], None] | None = None) -> Store:
            return SQLiteStore(tmp_path / "db.sqlite", on_commit=on_commit)

        return open_sqlite
    url: str = request.getfixturevalue("postgres_url")
    from reconciler.store.postgres import PostgresStore

    def open_postgres(on_commit: Callable[[Commit], None] | None = None) -> Store:
        return PostgresStore(url, on_commit=on_commit)

    return open_postgres


@pytest.fixture
async def any_store(backend: OpenStore) -> AsyncIterator[Store]:
    async with backend() as store:
        yield store

"""Storage: `open_store(url)` picks the backend by URL scheme and imports it lazily."""

from __future__ import annotations

from collections.abc import Callable

from reconciler.errors import ConfigError
from reconciler.model import Commit
from reconciler.store.base import Store


def open_store(url: str, on_commit: Callable[[Commit], None] | None = None) -> Store:
    """An unopened store for `url`; use it as `async with open_store(url) as store:`."""
    if url.startswith("sqlite:///"):
        from reconciler.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :], on_commit=on_commit)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from reconciler.store.postgres import PostgresStore
        except ImportError:
            raise ConfigError(
                "RECONCILER_DATABASE_URL is a PostgreSQL URL, but asyncpg is not installed: "
                "pip install 'reconciler[postgres]'."
            ) from None
        return PostgresStore(url, on_commit=on_commit)
    raise ConfigError(f"RECONCILER_DATABASE_URL: unsupported scheme in {url.split(':', 1)[0]!r}.")


__all__ = ["Store", "open_store"]

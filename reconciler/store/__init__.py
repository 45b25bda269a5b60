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
        raise ConfigError(
            "RECONCILER_DATABASE_URL: the PostgreSQL backend is not available in this version."
        )
    raise ConfigError(f"RECONCILER_DATABASE_URL: unsupported scheme in {url.split(':', 1)[0]!r}.")


__all__ = ["Store", "open_store"]

"""Moving up (SPEC §4): `reconciler copy` copies a SQLite database into an empty
PostgreSQL one, every task, delivery and event as stored, seqs and ids kept, so that
readers' cursors stay valid and a service started on the copy goes on from where the
SQLite one stopped.

This module owns the order of the steps and what is refused; the SQL is the backends':
`SQLiteStore.export` reads one snapshot in chunks, `PostgresStore.import_rows` writes them
in one transaction (a failure leaves the target empty) and moves its counters past them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from reconciler.config import redact_url
from reconciler.errors import ConfigError, StoreError
from reconciler.store.rows import Copied
from reconciler.store.sqlite import SQLiteStore

SQLITE = "sqlite:///"
POSTGRES = ("postgresql://", "postgres://")
CHUNK_ROWS = 5000  # rows per COPY statement
CHUNK_BYTES = 16 * 1024 * 1024  # and about this much JSON or body text at most


def source_path(source_url: str, target_url: str) -> Path:
    """The SQLite file to copy from, once both URLs are ones `copy` can copy between;
    else a ConfigError (a password in a URL is never repeated)."""
    if not source_url.startswith(SQLITE):
        raise ConfigError(
            f"copy reads a SQLite database, but RECONCILER_DATABASE_URL is "
            f"{redact_url(source_url)!r}: set it to the sqlite:/// database to copy."
        )
    if not target_url.startswith(POSTGRES):
        raise ConfigError(
            f"--to has value {redact_url(target_url)!r}: expected postgresql://… or postgres://…"
        )
    path = Path(source_url[len(SQLITE) :])
    if not path.is_file():
        # Opening it would create an empty database, and copy nothing without a word.
        raise ConfigError(
            f"RECONCILER_DATABASE_URL is {source_url!r}, and no database file is there: "
            "nothing to copy."
        )
    return path


async def copy(
    source: Path,
    target_url: str,
    *,
    chunk_rows: int = CHUNK_ROWS,
    chunk_bytes: int = CHUNK_BYTES,
) -> Copied:
    """Copy the SQLite database `source` into the empty PostgreSQL database at `target_url`
    (migrated first). Raises StoreError when the target is not empty or the copy fails;
    then nothing was copied."""
    try:
        from reconciler.store.postgres import PostgresStore
    except ImportError:
        raise ConfigError(
            "--to is a PostgreSQL URL, but asyncpg is not installed: "
            "pip install 'reconciler[postgres]'."
        ) from None
    # The target first: a refusal leaves the source untouched (opening it may migrate it).
    async with PostgresStore(target_url) as target:
        if not await target.is_empty():
            raise StoreError(
                f"the target database {redact_url(target_url)} is not empty: copy writes only "
                "into a database that has never held tasks, deliveries or events; "
                "nothing was copied."
            )
        async with SQLiteStore(source) as opened:
            async with contextlib.aclosing(opened.export(chunk_rows, chunk_bytes)) as chunks:
                return await target.import_rows(chunks)

"""The SQLite backend: one writer with group commit, readers on their own connections.

Writes are operations queued to one `batch.Writer`. Each batch runs as one
`BEGIN IMMEDIATE` transaction through `batch.write_batch` (the decisions every backend
shares), whose statements this module runs; then COMMIT with `synchronous=FULL`, and only
then is every caller resolved.

The statements run on the event loop's thread (they touch only SQLite's page cache); the
COMMIT, which waits on fsync, runs on a dedicated writer thread while the loop reads the next
batch's requests. So a webhook costs a handful of statements per *batch*, not per request.
Sequence numbers and delivery ids are read from the database inside each write transaction,
so `reconciler replay` can write beside a running server. Readers use aiosqlite connections
of their own.

The WAL is checkpointed by the writer itself every few dozen commits, between two batches,
instead of by SQLite inside a COMMIT (SPEC §7: commit p99 5.5 ms with, 0.6 ms without).
With no write in flight the checkpoint copies every frame, so the next write starts the WAL
over: it stays a few MiB, and no reset of a grown WAL ever stalls the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from reconciler.codec import dumps, loads
from reconciler.errors import MigrationError, StoreError
from reconciler.model import (
    TERMINAL,
    Commit,
    Delivery,
    EventRow,
    Outcome,
    Pruned,
    RowKind,
    Task,
    TaskRef,
    iso,
    parse_iso,
)
from reconciler.store import migrations
from reconciler.store.base import (
    ListPosition,
    NewDelivery,
    Settled,
)
from reconciler.store.batch import (
    Batched,
    EventRecord,
    Op,
    Probe,
    Prune,
    Writer,
    Writes,
    count_prunable_deliveries,
    deliveries_to_prune,
    events_to_prune,
    fail,
    settle,
    write_batch,
)
from reconciler.store.rows import (
    Chunk,
    Leased,
    StoredDelivery,
    StoredEvent,
    StoredTask,
    served,
    task_from_json,
)

logger = logging.getLogger(__name__)

KEYS_PER_QUERY = 400  # (provider, task_id) pairs per IN (...) lookup
CHECKPOINT_EVERY = 64  # commits; see `_checkpoint`
WAL_RESET_PAGES = 16_384  # 64 MiB of 4 KiB pages
BUSY_TIMEOUT_MS = 5000

_UPSERT_TASK = """
INSERT INTO tasks (provider, task_id, status, source, external_task_id, created_at,
                   updated_at, next_poll_at, version, data)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (provider, task_id) DO UPDATE SET
    status = excluded.status, source = excluded.source,
    external_task_id = excluded.external_task_id, updated_at = excluded.updated_at,
    next_poll_at = excluded.next_poll_at, version = excluded.version, data = excluded.data
"""
_UPDATE_TASK_IN_PLACE = """
UPDATE tasks SET updated_at = ?, next_poll_at = ?, version = ?, data = ?
WHERE provider = ? AND task_id = ?
"""
# Only the counters moved (batch.TaskRow): SQLite changes them in the stored JSON itself.
_UPDATE_COUNTERS = """
UPDATE tasks SET next_poll_at = ?, version = ?,
    data = json_set(data, '$.polls', ?, '$.version', ?, '$.internal.poll_failures', ?)
WHERE provider = ? AND task_id = ?
"""
_INSERT_EVENT = (
    "INSERT INTO events (seq, provider, task_id, type, at, body) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY = """
INSERT INTO deliveries (id, provider, received_at, headers, body, sha256, outcome, error, task_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_UPDATE_DELIVERY = "UPDATE deliveries SET outcome = ?, error = ?, task_id = ? WHERE id = ?"
# Numbering continues after the largest stored seq and id, or after the largest pruning
# removed (migrations/sqlite/0005), whichever is larger: no number is ever given twice.
_NEXT_IDS = """
SELECT MAX((SELECT COALESCE(MAX(seq), 0) FROM events), (SELECT pruned_seq FROM store_state)),
       MAX((SELECT COALESCE(MAX(id), 0) FROM deliveries),
           (SELECT pruned_delivery FROM store_state))
"""
_LEASE = "UPDATE tasks SET next_poll_at = ? WHERE provider = ? AND task_id = ?"
# `tasks_due` is by provider (migrations/sqlite/0006): each provider that has a poll planned,
# with its earliest, found by skipping from one provider to the next in the index.
_DUE_HEADS = """
WITH RECURSIVE head(provider) AS (
    SELECT MIN(provider) FROM tasks INDEXED BY tasks_due WHERE next_poll_at IS NOT NULL
    UNION ALL
    SELECT (SELECT MIN(provider) FROM tasks INDEXED BY tasks_due
            WHERE next_poll_at IS NOT NULL AND provider > head.provider)
    FROM head WHERE head.provider IS NOT NULL
)
SELECT provider, (SELECT MIN(next_poll_at) FROM tasks INDEXED BY tasks_due
                  WHERE provider = head.provider AND next_poll_at IS NOT NULL)
FROM head WHERE provider IS NOT NULL
"""
_SELECT_DUE_OF = """
SELECT next_poll_at, data FROM tasks INDEXED BY tasks_due
WHERE provider = ? AND next_poll_at IS NOT NULL AND next_poll_at <= ?
ORDER BY next_poll_at LIMIT ?
"""

# --- retention (see `batch.events_to_prune`, `batch.deliveries_to_prune`) ------------------
_TERMINAL = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL))
_OLDEST_EVENTS = "SELECT seq, at FROM events ORDER BY seq LIMIT ?"
_PRUNE_EVENTS = "DELETE FROM events WHERE seq <= ?"
# A delivery is settled when it never named a task, its task is gone, or its task is terminal.
_SCAN_DELIVERIES = f"""
SELECT d.id, d.received_at, d.task_id IS NULL OR t.status IS NULL OR t.status IN ({_TERMINAL})
FROM deliveries AS d LEFT JOIN tasks AS t ON t.provider = d.provider AND t.task_id = d.task_id
WHERE d.id > ? ORDER BY d.id LIMIT ?
"""
_PRUNE_DELIVERY = "DELETE FROM deliveries WHERE id = ?"
# Through `tasks_status_created`: a task's last change is not before its creation, so every
# task last changed before the cutoff was also created before it.
_OLD_TASKS = f"""
FROM tasks WHERE status IN ({_TERMINAL}) AND created_at < ? AND updated_at < ?
"""
_PRUNE_TASK = "DELETE FROM tasks WHERE rowid = ?"
_PRUNED_UP_TO = """
UPDATE store_state SET pruned_seq = MAX(pruned_seq, ?), pruned_delivery = MAX(pruned_delivery, ?)
WHERE id = 1
"""
_FIRST_YOUNG_EVENT = "SELECT seq FROM events WHERE at >= ? ORDER BY seq LIMIT 1"
_OLDEST_SEQ = """
SELECT COALESCE((SELECT MIN(seq) FROM events), (SELECT pruned_seq FROM store_state) + 1)
"""
_PROBE = "UPDATE store_state SET probed_at = ? WHERE id = 1"


def epoch(moment: datetime) -> float:
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass
class WriterStats:
    commits: int = 0
    operations: int = 0
    largest_batch: int = 0
    # WAL frames (one page each) found at checkpoints: since each checkpoint starts the WAL
    # over, their sum is what the commits wrote up to the last checkpoint (a failed one's
    # frames are not counted; it is logged).
    wal_frames: int = 0
    checkpointed_commits: int = 0  # commits when the last checkpoint ran


class _Transaction:
    """`batch.Transaction` on the writer's connection, inside `BEGIN IMMEDIATE`: one writer
    owns the file, so `lock` has nothing to do, and ids continue from the database's own.
    `alone`: no other connection has committed since this store's last transaction."""

    def __init__(self, db: sqlite3.Connection, leased: Leased, alone: bool = False) -> None:
        self.db = db
        self.leased = leased
        self.alone = alone
        # fetchall(): an unexhausted cursor keeps its statement open, and COMMIT refuses to
        # run while one is.
        [(last_seq, last_delivery)] = db.execute(_NEXT_IDS).fetchall()
        self.last_seq: int = last_seq
        self.last_delivery: int = last_delivery

    async def lock(self, keys: Collection[str]) -> None:
        pass

    async def duplicates(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str | None]:
        seen: dict[tuple[str, str], str | None] = {}
        for provider, chunk in _key_chunks(keys):
            sql = (
                "SELECT sha256, task_id FROM deliveries WHERE provider = ? "
                f"AND sha256 IN ({','.join('?' * len(chunk))}) AND outcome != 'rejected'"
            )
            for sha, task_id in self.db.execute(sql, [provider, *chunk]):
                seen[(provider, sha)] = task_id
        return seen

    async def stored_deliveries(self, ids: Collection[int]) -> dict[int, NewDelivery]:
        found: dict[int, NewDelivery] = {}
        for chunk in _chunks(sorted(ids), KEYS_PER_QUERY):
            sql = (
                "SELECT id, provider, received_at, headers, body, sha256 FROM deliveries "
                f"WHERE id IN ({','.join('?' * len(chunk))})"
            )
            for did, provider, received_at, headers, body, sha in self.db.execute(sql, chunk):
                found[did] = NewDelivery(
                    provider, from_epoch(received_at), loads(headers), bytes(body), sha
                )
        return found

    async def tasks(self, refs: Collection[TaskRef]) -> list[Task]:
        """The stored tasks among `refs`. One leased for a poll and unchanged since is the
        task the lease read (`rows.Leased`): its row's columns say so, and its JSON is not
        read again (fifty JSON texts a poll exchange, for nothing). When nothing but this
        store has written since the lease (`alone`), the row is not read at all."""
        found: list[Task] = []
        leased = {ref for ref in refs if ref in self.leased}
        unread = [ref for ref in refs if ref not in leased]
        if self.alone:
            found.extend(task for ref in leased if (task := self.leased.held(ref)) is not None)
            leased = set()
        for provider, chunk in _key_chunks(leased):
            sql = (
                "SELECT task_id, version, updated_at, next_poll_at FROM tasks "
                f"WHERE provider = ? AND task_id IN ({','.join('?' * len(chunk))})"
            )
            for task_id, version, updated_at, due in self.db.execute(sql, [provider, *chunk]):
                ref = TaskRef(provider, task_id)
                task = self.leased.take(
                    ref, version, from_epoch(updated_at), None if due is None else from_epoch(due)
                )
                if task is None:
                    unread.append(ref)
                else:
                    found.append(task)
        for provider, chunk in _key_chunks(unread):
            sql = (
                "SELECT data, next_poll_at FROM tasks "
                f"WHERE provider = ? AND task_id IN ({','.join('?' * len(chunk))})"
            )
            found.extend(_task(data, due) for data, due in self.db.execute(sql, [provider, *chunk]))
        return found

    async def delivery_ids(self, count: int) -> list[int]:
        first = self.last_delivery + 1
        self.last_delivery += count
        return list(range(first, first + count))

    async def write(self, writes: Writes) -> None:
        db = self.db
        if writes.deliveries:
            db.executemany(
                _INSERT_DELIVERY,
                [
                    (
                        row.id,
                        row.delivery.provider,
                        epoch(row.delivery.received_at),
                        dumps(dict(row.delivery.headers)),
                        row.delivery.body,
                        row.delivery.sha256,
                        row.outcome.value,
                        row.error,
                        row.task_id,
                    )
                    for row in writes.deliveries
                ],
            )
        if writes.tasks:
            rows = writes.tasks.values()
            db.executemany(
                _UPSERT_TASK, [_task_row(row.task, row.json()) for row in rows if not row.in_place]
            )
            db.executemany(
                _UPDATE_TASK_IN_PLACE,
                [
                    (
                        epoch(task.updated_at),
                        epoch(task.next_poll_at) if task.next_poll_at else None,
                        task.version,
                        row.data,
                        task.provider,
                        task.task_id,
                    )
                    for row in rows
                    if row.in_place and row.data is not None
                    for task in (row.task,)
                ],
            )
            db.executemany(
                _UPDATE_COUNTERS,
                [
                    (
                        epoch(task.next_poll_at) if task.next_poll_at else None,
                        task.version,
                        task.polls,
                        task.version,
                        task.poll_failures,
                        task.provider,
                        task.task_id,
                    )
                    for row in rows
                    if row.data is None
                    for task in (row.task,)
                ],
            )
        if writes.delivery_updates:
            db.executemany(
                _UPDATE_DELIVERY,
                [(u.outcome.value, u.error, u.task_id, u.id) for u in writes.delivery_updates],
            )

    async def append(self, events: Sequence[EventRecord], earliest_due: datetime | None) -> int:
        first_seq = self.last_seq + 1
        if events:
            self.db.executemany(
                _INSERT_EVENT,
                [
                    (seq, event.provider, event.task_id, event.type, epoch(event.at), event.body)
                    for seq, event in enumerate(events, start=first_seq)
                ],
            )
            self.last_seq += len(events)
        return first_seq

    async def lease(
        self, now: datetime, limit: int, until: datetime, provider: str | None
    ) -> list[Task]:
        due_by = epoch(now)
        if provider is None:  # the earliest `limit` of every provider's earliest
            heads = self.db.execute(_DUE_HEADS).fetchall()
            due = [name for name, earliest in heads if earliest <= due_by]
        else:
            due = [provider]
        rows = [
            row
            for name in due
            for row in self.db.execute(_SELECT_DUE_OF, (name, due_by, limit)).fetchall()
        ]
        if len(due) > 1:
            rows = heapq.nsmallest(limit, rows, key=lambda row: row[0])
        tasks = self.leased.keep([_task(data, at) for at, data in rows], until)
        if tasks:
            # Only the poll time changes: the column alone (see `rows.task_from_json`).
            moved = epoch(until)
            self.db.executemany(_LEASE, [(moved, task.provider, task.task_id) for task in tasks])
        return tasks

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int) -> Pruned:
        db, cutoff = self.db, epoch(before)
        if kind is RowKind.EVENTS:
            pruned = events_to_prune(db.execute(_OLDEST_EVENTS, (limit,)).fetchall(), cutoff, limit)
            if pruned.removed:
                db.execute(_PRUNE_EVENTS, (pruned.after,))
                db.execute(_PRUNED_UP_TO, (pruned.after, 0))
            return pruned
        if kind is RowKind.DELIVERIES:
            scanned = db.execute(_SCAN_DELIVERIES, (after, limit)).fetchall()
            doomed, pruned = deliveries_to_prune(scanned, cutoff, limit, after)
            if doomed:
                db.executemany(_PRUNE_DELIVERY, [(did,) for did in doomed])
                db.execute(_PRUNED_UP_TO, (0, max(doomed)))
            return pruned
        rows = db.execute(f"SELECT rowid {_OLD_TASKS} LIMIT ?", (cutoff, cutoff, limit)).fetchall()
        db.executemany(_PRUNE_TASK, rows)
        return Pruned(len(rows), len(rows) >= limit)

    async def probe(self, at: datetime) -> None:
        self.db.execute(_PROBE, (epoch(at),))


class SQLiteStore(Batched):
    def __init__(
        self,
        path: str | Path,
        *,
        readers: int = 2,
        on_commit: Callable[[Commit], None] | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        wal_reset_pages: int = WAL_RESET_PAGES,
    ) -> None:
        self.path = Path(path)
        self.checkpoint_every = checkpoint_every
        self.wal_reset_pages = wal_reset_pages
        self._reader_count = readers
        self._on_commit = on_commit
        self._db: sqlite3.Connection | None = None  # the writer's, on its own thread
        self._executor: ThreadPoolExecutor | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []
        self._writer = Writer(self._run)
        self._leased = Leased()
        # The writer connection's `PRAGMA data_version` at its last transaction: it moves
        # when another connection (`reconciler replay`) commits.
        self._data_version = -1
        self._closing = False
        self._opened = False
        self._last_seq = 0
        self._write_failure: str | None = None
        self.stats = WriterStats()

    # --- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> SQLiteStore:
        if self._opened:
            raise StoreError("this store was already opened")
        self._opened = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            setup = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await setup.executescript("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;")
                await migrate(setup)
                rows = await setup.execute_fetchall(_NEXT_IDS)
                self._last_seq = next(iter(rows))[0]
            finally:
                await setup.close()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            loop = asyncio.get_running_loop()
            self._db = await loop.run_in_executor(self._executor, self._connect_writer)
            for _ in range(self._reader_count):
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                await reader.executescript("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")
                self._all_readers.append(reader)
                self._readers.put_nowait(reader)
        except BaseException:
            await self._close_connections()
            raise
        self._writer.start("sqlite-writer")
        return self

    def _connect_writer(self) -> sqlite3.Connection:
        # Used by the event loop's thread (a batch's statements) and the writer thread
        # (COMMIT, checkpoints), never by both at once: the write loop awaits each step.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # busy_timeout=0: statements run on the event loop's thread and must never wait
        # there; a busy database is waited for on this thread (`_begin_waiting`).
        db.executescript(
            "PRAGMA synchronous=FULL; PRAGMA busy_timeout=0; PRAGMA wal_autocheckpoint=0;"
            f"PRAGMA journal_size_limit={self.wal_reset_pages * 4096}; PRAGMA cache_size=-65536;"
        )
        return db

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self._writer.close()  # drains what is queued
        await self._close_connections()

    async def _close_connections(self) -> None:
        for connection in self._all_readers:
            with contextlib.suppress(Exception):
                await connection.close()
        self._all_readers.clear()
        if self._executor is not None:
            if self._db is not None:
                db, self._db = self._db, None

                def close_writer() -> None:
                    with contextlib.suppress(Exception):
                        _checkpoint_truncate(db)
                    db.close()

                await asyncio.get_running_loop().run_in_executor(self._executor, close_writer)
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- writes ----------------------------------------------------------------------

    # --- retention and the full-disk check --------------------------------------------

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int = 0) -> Pruned:
        """Through the writer, like any write: one SQLite file has one writer, and a small
        batch queued between webhook batches never holds one up for long."""
        result: Pruned = await self._writer.submit(Prune(kind, before, limit, after))
        return result

    async def prunable(self, kind: RowKind, before: datetime) -> int:
        cutoff = epoch(before)
        if kind is RowKind.EVENTS:
            young = await self._fetch(_FIRST_YOUNG_EVENT, (cutoff,))
            end = young[0][0] if young else 2**63 - 1
            rows = await self._fetch("SELECT COUNT(*) FROM events WHERE seq < ?", (end,))
            return int(rows[0][0])
        if kind is RowKind.DELIVERIES:

            async def scan(after: int, limit: int) -> list[tuple[int, float, bool]]:
                return await self._fetch(_SCAN_DELIVERIES, (after, limit))

            return await count_prunable_deliveries(scan, cutoff)
        rows = await self._fetch(f"SELECT COUNT(*) {_OLD_TASKS}", (cutoff, cutoff))
        return int(rows[0][0])

    async def oldest_seq(self) -> int:
        rows = await self._fetch(_OLDEST_SEQ)
        return int(rows[0][0])

    async def size_bytes(self) -> int:
        """The database file and its WAL (which a checkpoint starts over, so it stays a
        few MiB, up to `wal_reset_pages`)."""
        size = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(path).st_size
        return size

    def write_failure(self) -> str | None:
        return self._write_failure

    async def probe(self) -> None:
        """A one-row update through the writer: its COMMIT appends to the WAL, which is what
        fails while the disk is full (the WAL cannot grow, or its checkpoint into the
        database file cannot, so the WAL cannot start over)."""
        await self._writer.submit(Probe(datetime.now(UTC)))

    async def _run(self, ops: list[Op], lane: int = 0) -> None:
        """One batch: commit it, resolve its callers, and checkpoint every few commits."""
        db = self._db
        assert db is not None
        changes = db.total_changes
        try:
            results, commit = await self._transaction(ops)
        except Exception as error:
            logger.exception("write transaction of %d operations failed", len(ops))
            self._write_failure = _failure(error)
            fail(ops, error)
            return
        if db.total_changes != changes:  # a commit that wrote: the store can commit again
            self._write_failure = None
        self.stats.commits += 1
        self.stats.operations += len(ops)
        self.stats.largest_batch = max(self.stats.largest_batch, len(ops))
        if commit is not None:
            self._last_seq = max(self._last_seq, commit.last_seq)
            if self._on_commit is not None:
                self._on_commit(commit)
        settle(ops, results)
        if self.stats.commits - self.stats.checkpointed_commits >= self.checkpoint_every:
            self.stats.checkpointed_commits = self.stats.commits
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file, on the writer thread, between two batches.

        A checkpoint beside a stream of commits (as SQLite's own, or one on another
        connection) never catches up with the end of the WAL, so the WAL is never started
        over; it grows until something resets it, and that reset stalls every write behind
        it. Here nothing writes meanwhile, so a passive checkpoint copies every frame and the
        next write starts the WAL over. Webhook p99 at 1,200/s (bench/ingest.py
        --half-load-rate 1200, 8 s a run): 13.9-30.2 ms in 8 runs with this every 64 commits,
        11.6-74.8 ms in 5 runs every 32, 27.4-32.5 ms in 3 runs every 128; 52-64 ms (at
        1,100/s) with a checkpoint every 256 commits on another connection, as before.
        Only a reader holding an old snapshot can keep frames back; past `wal_reset_pages`
        the WAL is then truncated, waiting for that reader.
        """
        db = self._db
        assert db is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            wal_pages = await loop.run_in_executor(self._executor, _checkpoint_passive, db)
            self.stats.wal_frames += wal_pages
            if wal_pages >= self.wal_reset_pages:
                await loop.run_in_executor(self._executor, _checkpoint_truncate, db)
        except Exception:
            logger.exception("WAL checkpoint failed")
        logger.debug("checkpoint took %.1f ms", (time.perf_counter() - started) * 1000)

    async def _transaction(self, ops: list[Op]) -> tuple[list[object], Commit | None]:
        """One batch: statements on the event loop's thread, COMMIT on the writer thread.

        Everything before COMMIT touches only SQLite's page cache (microseconds a row), so
        it runs here, with the rules it calls, in one stretch (none of `_Transaction`'s
        awaits suspends). Only COMMIT waits on fsync; it goes to the writer thread, which
        holds the GIL for nothing but its return, while this loop reads the next batch's
        requests. (The whole batch on the thread made the two threads trade the GIL at every
        statement, each trade up to a switch interval.)
        """
        db = self._db
        assert db is not None
        loop = asyncio.get_running_loop()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            # Another process (`reconciler replay`) holds the write lock: wait for it on the
            # writer thread, under the busy timeout, instead of blocking the loop.
            await loop.run_in_executor(self._executor, _begin_waiting, db)
        try:
            [(version,)] = db.execute("PRAGMA data_version").fetchall()
            alone, self._data_version = version == self._data_version, version
            if not alone:
                self._leased.clear()  # another process wrote: its rows may be any
            results, commit = await write_batch(_Transaction(db, self._leased, alone), ops)
            await loop.run_in_executor(self._executor, _commit, db)
        except BaseException:
            # What this transaction leased or read of `_leased` is not what the rows hold.
            self._leased.clear()
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise
        return results, commit

    # --- reads -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._closing or not self._all_readers:
            raise StoreError("the store is closed")
        connection = await self._readers.get()
        try:
            yield connection
        finally:
            self._readers.put_nowait(connection)

    async def _fetch(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        async with self._reader() as db:
            return list(await db.execute_fetchall(sql, params))

    async def next_due_at(self) -> datetime | None:
        heads = await self._fetch(_DUE_HEADS)
        return min((from_epoch(earliest) for _, earliest in heads), default=None)

    async def get_task(self, ref: TaskRef) -> Task | None:
        rows = await self._fetch(
            "SELECT data, next_poll_at FROM tasks WHERE provider = ? AND task_id = ?",
            (ref.provider, ref.task_id),
        )
        return _task(*rows[0]) if rows else None

    async def list_tasks(
        self,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        before: ListPosition | None = None,
    ) -> list[Task]:
        where: list[str] = []
        params: list[object] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if before is not None:
            created_at, provider_key, task_key = before
            where.append("(created_at, provider, task_id) < (?, ?, ?)")
            params.extend((epoch(created_at), provider_key, task_key))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT data, next_poll_at FROM tasks {clause} "
            "ORDER BY created_at DESC, provider DESC, task_id DESC LIMIT ?"
        )
        rows = await self._fetch(sql, [*params, limit])
        return [_task(data, due) for data, due in rows]

    async def events_after(
        self, after: int, limit: int, provider: str | None = None, task_id: str | None = None
    ) -> list[EventRow]:
        where: list[str] = ["seq > ?"]
        params: list[object] = [after]
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if task_id is not None:
            where.append("task_id = ?")
            params.append(task_id)
        sql = (
            f"SELECT seq, provider, task_id, type, body FROM events WHERE {' AND '.join(where)} "
            "ORDER BY seq LIMIT ?"
        )
        rows = await self._fetch(sql, [*params, limit])
        return [
            EventRow(seq, provider, task_id, type_, served(seq, body))
            for seq, provider, task_id, type_, body in rows
        ]

    async def last_seq(self) -> int:
        return self._last_seq

    async def deliveries(
        self, ids: Sequence[int] | None = None, rejected_only: bool = False, limit: int = 1000
    ) -> list[Delivery]:
        where: list[str] = []
        params: list[object] = []
        if ids is not None:
            if not ids:
                return []
            where.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if rejected_only:
            where.append("outcome = 'rejected'")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(
            "SELECT id, provider, received_at, headers, body, sha256, outcome, error, task_id "
            f"FROM deliveries {clause} ORDER BY id LIMIT ?",
            [*params, limit],
        )
        return [
            Delivery(
                did,
                provider,
                from_epoch(at),
                loads(headers),
                bytes(body),
                sha,
                Outcome(outcome),
                error,
                task_id,
            )
            for did, provider, at, headers, body, sha, outcome, error, task_id in rows
        ]

    async def settled_counts(self) -> list[Settled]:
        rows = await self._fetch(
            "SELECT provider, status, source, COUNT(*) FROM tasks GROUP BY provider, status, source"
        )
        return [Settled(*row) for row in rows]

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        """One process owns a SQLite file: its loop leads from the start, for good."""
        yield asyncio.Event()

    # --- export (`reconciler copy`) ----------------------------------------------------------

    async def export(self, chunk_rows: int, chunk_bytes: int) -> AsyncGenerator[Chunk, None]:
        """Every task, delivery and event as stored, in chunks of at most `chunk_rows` rows
        or about `chunk_bytes` of text and bodies, so a large database is never held in
        memory. All of it is read from one snapshot: a write committed meanwhile is in none
        of it. Close the iterator (`contextlib.aclosing`) when not reading it to the end."""
        async with self._reader() as db:
            # One read transaction: every SELECT in it sees the same snapshot of the WAL.
            await db.execute("BEGIN")
            try:
                async for rows in _read_chunks(db, _EXPORT_TASKS, chunk_rows, chunk_bytes, 9):
                    yield Chunk(tasks=[_stored_task(row) for row in rows])
                async for rows in _read_chunks(db, _EXPORT_DELIVERIES, chunk_rows, chunk_bytes, 4):
                    yield Chunk(deliveries=[_stored_delivery(row) for row in rows])
                async for rows in _read_chunks(db, _EXPORT_EVENTS, chunk_rows, chunk_bytes, 5):
                    yield Chunk(events=[_stored_event(row) for row in rows])
                [(last_seq, last_delivery)] = await db.execute_fetchall(_NEXT_IDS)
                yield Chunk(last_seq=last_seq, last_delivery=last_delivery)
            finally:
                with contextlib.suppress(Exception):
                    await db.execute("ROLLBACK")  # it only read


_TIMES = (
    "created_at",
    "updated_at",
    "completed_at",
    "deadline_at",
    "next_poll_at",
    "at",
    "provider_updated_at",
    "result_missing_since",
    "progress_event_at",
)


def sortable_times(text: str) -> str:
    """A stored task or event with its own times rewritten in today's fixed-width form
    (`model.iso`); metadata and everything else are left as they were."""
    data = loads(text)

    def rewrite(part: object) -> None:
        if not isinstance(part, dict):
            return
        for key in _TIMES:
            value = part.get(key)
            if isinstance(value, str):
                part[key] = iso(parse_iso(value))
        rewrite(part.get("task"))
        rewrite(part.get("internal"))

    rewrite(data)
    return dumps(data)


# Functions the migrations may call (0004), registered on the migrating connection.
MIGRATION_FUNCTIONS: dict[str, Callable[[str], str]] = {
    "reconciler_sortable_times": sortable_times,
}


async def migrate(db: aiosqlite.Connection) -> list[str]:
    """Apply pending migrations; return the names applied."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "number INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, "
        "applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')))"
    )
    for name, function in MIGRATION_FUNCTIONS.items():
        await db.create_function(name, 1, function, deterministic=True)
    rows = await db.execute_fetchall("SELECT number, name, sha256 FROM schema_migrations")
    applied = [migrations.Applied(*row) for row in rows]
    todo = migrations.pending(migrations.load("sqlite"), applied)
    for migration in todo:
        try:
            await db.execute("BEGIN IMMEDIATE")
            for statement in _statements(migration.sql):
                await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_migrations (number, name, sha256) VALUES (?, ?, ?)",
                (migration.number, migration.name, migration.sha256),
            )
            await db.execute("COMMIT")
        except Exception as error:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise MigrationError(
                f"migration {migration.number:04d}_{migration.name} failed: {error}"
            ) from error
    return [f"{m.number:04d}_{m.name}" for m in todo]


def _commit(db: sqlite3.Connection) -> None:
    db.execute("COMMIT")


def _failure(error: Exception) -> str:
    """Why a write transaction failed, for /readyz: SQLite's words, which name no secret."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return "the disk is full (SQLITE_FULL)"
        name = getattr(error, "sqlite_errorname", None)
        return f"{error} ({name})" if name else str(error)
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _waiting(db: sqlite3.Connection) -> Iterator[None]:
    """The writer's busy timeout, for statements that may wait (on the writer thread only)."""
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        yield
    finally:
        db.execute("PRAGMA busy_timeout=0")


def _begin_waiting(db: sqlite3.Connection) -> None:
    with _waiting(db):
        db.execute("BEGIN IMMEDIATE")


def _checkpoint_passive(db: sqlite3.Connection) -> int:
    """The frames the WAL held, all of them copied unless a reader kept some back."""
    row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # (busy, in WAL, copied)
    return int(row[1])


def _checkpoint_truncate(db: sqlite3.Connection) -> None:
    with _waiting(db):
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (ours hold no `;` inside literals)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def _task_row(task: Task, data: str) -> tuple[Any, ...]:
    return (
        task.provider,
        task.task_id,
        task.status.value,
        task.source.value,
        task.external_task_id,
        epoch(task.created_at),
        epoch(task.updated_at),
        epoch(task.next_poll_at) if task.next_poll_at else None,
        task.version,
        data,
    )


def _task(data: str, next_poll_at: float | None) -> Task:
    return task_from_json(data, None if next_poll_at is None else from_epoch(next_poll_at))


def _by_provider(keys: Collection[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for provider, key in keys:
        grouped.setdefault(provider, []).append(key)
    return grouped


def _key_chunks(keys: Collection[tuple[str, str]]) -> Iterator[tuple[str, Sequence[str]]]:
    """(provider, key) pairs as (provider, keys) for `IN` lists of at most `KEYS_PER_QUERY`."""
    for provider, names in _by_provider(keys).items():
        for chunk in _chunks(sorted(names), KEYS_PER_QUERY):
            yield provider, chunk


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- export (`SQLiteStore.export`) ---------------------------------------------------------

_EXPORT_TASKS = """
SELECT provider, task_id, status, source, external_task_id, created_at, updated_at,
       next_poll_at, version, data
FROM tasks ORDER BY rowid
"""
_EXPORT_DELIVERIES = """
SELECT id, provider, received_at, headers, body, sha256, outcome, error, task_id
FROM deliveries ORDER BY id
"""
_EXPORT_EVENTS = "SELECT seq, provider, task_id, type, at, body FROM events ORDER BY seq"
FETCH_ROWS = 500  # rows per fetch from the cursor (each one a hop to aiosqlite's thread)


async def _read_chunks(
    db: aiosqlite.Connection, sql: str, chunk_rows: int, chunk_bytes: int, weighed: int
) -> AsyncIterator[list[sqlite3.Row]]:
    """The rows of `sql` in chunks of at most `chunk_rows`, each ending once the lengths of
    its column `weighed` (the JSON or the body) reach `chunk_bytes`."""
    try:
        async with db.execute(sql) as cursor:
            chunk: list[sqlite3.Row] = []
            size = 0
            while rows := await cursor.fetchmany(FETCH_ROWS):
                for row in rows:
                    chunk.append(row)
                    size += len(row[weighed])
                    if len(chunk) >= chunk_rows or size >= chunk_bytes:
                        yield chunk
                        chunk, size = [], 0
            if chunk:
                yield chunk
    except sqlite3.Error as error:
        raise StoreError(f"reading the SQLite database failed: {error}") from error


def _stored_task(row: sqlite3.Row) -> StoredTask:
    provider, task_id, status, source, external, created, updated, due, version, data = row
    return StoredTask(
        provider,
        task_id,
        status,
        source,
        external,
        from_epoch(created),
        from_epoch(updated),
        None if due is None else from_epoch(due),
        version,
        data,
    )


def _stored_delivery(row: sqlite3.Row) -> StoredDelivery:
    did, provider, received_at, headers, body, sha, outcome, error, task_id = row
    return StoredDelivery(
        did, provider, from_epoch(received_at), headers, bytes(body), sha, outcome, error, task_id
    )


def _stored_event(row: sqlite3.Row) -> StoredEvent:
    seq, provider, task_id, type_, at, body = row
    return StoredEvent(seq, provider, task_id, type_, from_epoch(at), body)

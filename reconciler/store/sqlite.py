"""The SQLite backend: one writer with group commit, readers on their own connections.

Writes are operations queued to a single writer task. It drains whatever has queued while
the previous commit ran, and runs the batch as one `BEGIN IMMEDIATE` transaction:

1. look up duplicates of the batch's delivery bodies (one query),
2. interpret the new bodies (pure: JSON, adapter, rules) and load every task the batch
   touches (one query per 400 keys),
3. run each operation's pure `decide` in arrival order against those tasks,
4. write deliveries, tasks and events with `executemany`, then lease due tasks,
5. commit with `synchronous=FULL`, and only then resolve every caller.

Steps 1-4 run on the event loop's thread (they touch only SQLite's page cache); the COMMIT,
which waits on fsync, runs on a dedicated writer thread while the loop reads the next
batch's requests. So a webhook costs a handful of statements per *batch*, not per request,
and no caller resumes before the commit that holds its write. Sequence numbers and delivery
ids are assigned here, read from the database inside each write transaction. Readers use
aiosqlite connections of their own.

The WAL is checkpointed by the writer itself every few dozen commits, between two batches,
instead of by SQLite inside a COMMIT (SPEC §7: commit p99 5.5 ms with, 0.6 ms without).
With no write in flight the checkpoint copies every frame, so the next write starts the WAL
over: it stays a few MiB, and no reset of a grown WAL ever stalls the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from reconciler.codec import dumps, loads
from reconciler.errors import MigrationError, StoreError
from reconciler.feed import Commit
from reconciler.model import Change, Delivery, Outcome, Task, TaskRef, iso
from reconciler.store import migrations
from reconciler.store.base import (
    Accepted,
    ApplyResult,
    Decide,
    EventRow,
    IngestResult,
    Interpret,
    NewDelivery,
    Rejected,
    Settled,
    epoch,
    event_json,
    from_epoch,
    public_json,
    task_from_json,
    task_to_json,
)

logger = logging.getLogger(__name__)

MAX_BATCH = 1024
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
_INSERT_EVENT = (
    "INSERT INTO events (seq, provider, task_id, type, at, body) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY = """
INSERT INTO deliveries (id, provider, received_at, headers, body, sha256, outcome, error, task_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_UPDATE_DELIVERY = "UPDATE deliveries SET outcome = ?, error = ?, task_id = ? WHERE id = ?"
_NEXT_IDS = """
SELECT (SELECT COALESCE(MAX(seq), 0) FROM events), (SELECT COALESCE(MAX(id), 0) FROM deliveries)
"""
_LEASE = """
UPDATE tasks SET next_poll_at = ?, data = json_set(data, '$.next_poll_at', ?)
WHERE provider = ? AND task_id = ?
"""
_SELECT_DUE = """
SELECT data FROM tasks WHERE next_poll_at IS NOT NULL AND next_poll_at <= ?
ORDER BY next_poll_at LIMIT ?
"""


@dataclass(eq=False)
class _Op:
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Ingest(_Op):
    delivery: NewDelivery
    interpret: Interpret


@dataclass(eq=False)
class _Apply(_Op):
    candidates: Sequence[TaskRef]
    decide: Decide
    delivery_id: int | None


@dataclass(eq=False)
class _Replay(_Op):
    delivery_id: int
    interpret: Interpret


@dataclass(eq=False)
class _Lease(_Op):
    now: datetime
    limit: int
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class _Duplicate:
    """A body already stored for this provider; `candidates` name the task it concerned."""

    candidates: Sequence[TaskRef]


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


class _Batch:
    """The state of one write transaction: tasks as the batch has left them, and the rows
    still to write."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.tasks: dict[TaskRef, Task | None] = {}
        self.dirty: dict[TaskRef, Task] = {}
        self.events: list[tuple[Any, ...]] = []
        self.deliveries: list[tuple[Any, ...]] = []
        self.delivery_updates: list[tuple[Any, ...]] = []
        self.public: dict[TaskRef, str] = {}  # each dirty task's JSON, encoded once

    def json_of(self, task: Task | None) -> str | None:
        """`task`'s public JSON: as this batch encoded it when it wrote this version, else
        encoded now (a duplicate's task, unchanged)."""
        if task is None:
            return None
        encoded = self.public.get(task.ref)
        if encoded is not None and self.tasks.get(task.ref) is task:
            return encoded
        return public_json(task)

    def pick(self, candidates: Sequence[TaskRef]) -> tuple[TaskRef, Task | None]:
        for ref in candidates:
            task = self.tasks.get(ref)
            if task is not None:
                return ref, task
        return candidates[0], None

    def decide(
        self, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None
    ) -> tuple[Task | None, Change | None, int | None]:
        task = self.pick(candidates)[1]
        change = decide(task)
        if change is None:
            return task, None, None
        updated = change.task
        self.tasks[updated.ref] = updated
        self.dirty[updated.ref] = updated
        self.public[updated.ref] = public = public_json(updated)
        seq = None
        if change.event is not None:
            seq = self.store._take_seq()
            body = event_json(seq, change, delivery_id, updated.updated_at, public)
            self.events.append(
                (
                    seq,
                    updated.provider,
                    updated.task_id,
                    change.event.value,
                    epoch(updated.updated_at),
                    body,
                )
            )
        return updated, change, seq


class SQLiteStore:
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
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._opened = False
        self._next_seq = 1
        self._next_delivery_id = 1
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
                self._next_seq = next(iter(rows))[0] + 1
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
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
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
        if self._writer_task is not None:
            self._queue.put_nowait(None)  # drain what is queued, then stop
            await self._writer_task
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

    async def _submit(self, op: _Op) -> Any:
        if self._closing or self._writer_task is None:
            raise StoreError("the store is closed")
        self._queue.put_nowait(op)
        return await op.future

    async def ingest(self, delivery: NewDelivery, interpret: Interpret) -> IngestResult:
        result: IngestResult = await self._submit(_Ingest(delivery, interpret))
        return result

    async def apply(
        self, candidates: Sequence[TaskRef], decide: Decide, delivery_id: int | None = None
    ) -> ApplyResult:
        result: ApplyResult = await self._submit(_Apply(candidates, decide, delivery_id))
        return result

    async def replay(self, delivery_id: int, interpret: Interpret) -> IngestResult:
        result: IngestResult = await self._submit(_Replay(delivery_id, interpret))
        return result

    async def lease_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Task]:
        result: list[Task] = await self._submit(_Lease(now, limit, lease_seconds))
        return result

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            ops: list[_Op] = []
            if first is None:
                stopping = True
            else:
                ops.append(first)
            while len(ops) < MAX_BATCH and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:
                    stopping = True
                else:
                    ops.append(op)
            if ops:
                await self._run(ops)
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

    async def _run(self, ops: list[_Op]) -> None:
        try:
            results, commit = await self._transaction(ops)
        except Exception as error:
            logger.exception("write transaction of %d operations failed", len(ops))
            failure = (
                error if isinstance(error, StoreError) else StoreError(f"write failed: {error}")
            )
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(failure)
            return
        self.stats.commits += 1
        self.stats.operations += len(ops)
        self.stats.largest_batch = max(self.stats.largest_batch, len(ops))
        if self._on_commit is not None and commit is not None:
            self._on_commit(commit)
        for op, result in zip(ops, results, strict=True):
            if op.future.done():
                continue
            if isinstance(result, BaseException):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)

    async def _transaction(self, ops: list[_Op]) -> tuple[list[object], Commit | None]:
        """One batch: statements on the event loop's thread, COMMIT on the writer thread.

        Everything before COMMIT touches only SQLite's page cache (microseconds a row), so
        it runs here, with the rules it calls, in one stretch. Only COMMIT waits on fsync;
        it goes to the writer thread, which holds the GIL for nothing but its return, while
        this loop reads the next batch's requests. (The whole batch on the thread made the
        two threads trade the GIL at every statement, each trade up to a switch interval.)
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
            # Ids come from the database inside the write lock, so a second process can
            # write beside the server without colliding. fetchall(): an unexhausted cursor
            # keeps its statement open, and COMMIT refuses to run while one is.
            [(last_seq, last_delivery)] = db.execute(_NEXT_IDS).fetchall()
            self._next_seq, self._next_delivery_id = last_seq + 1, last_delivery + 1
            results, commit = self._batch(db, ops)
            await loop.run_in_executor(self._executor, _commit, db)
        except BaseException:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise
        return results, commit

    def _batch(self, db: sqlite3.Connection, ops: list[_Op]) -> tuple[list[object], Commit | None]:
        batch = _Batch(self)
        ingests = [op for op in ops if isinstance(op, _Ingest)]
        replays = [op for op in ops if isinstance(op, _Replay)]

        # Duplicates: an earlier, readable delivery of the same provider and body.
        seen: dict[tuple[str, str], str | None] = {}
        shas: dict[str, set[str]] = {}
        for ingest in ingests:
            shas.setdefault(ingest.delivery.provider, set()).add(ingest.delivery.sha256)
        for provider, provider_shas in shas.items():
            for chunk in _chunks(sorted(provider_shas), KEYS_PER_QUERY):
                sql = (
                    "SELECT sha256, task_id FROM deliveries WHERE provider = ? "
                    f"AND sha256 IN ({','.join('?' * len(chunk))}) AND outcome != 'rejected'"
                )
                for sha, task_id in db.execute(sql, [provider, *chunk]):
                    seen[(provider, sha)] = task_id

        replayed: dict[int, NewDelivery] = {}
        for chunk in _chunks([replay.delivery_id for replay in replays], KEYS_PER_QUERY):
            sql = (
                "SELECT id, provider, received_at, headers, body, sha256 FROM deliveries "
                f"WHERE id IN ({','.join('?' * len(chunk))})"
            )
            for did, provider, received_at, headers, body, sha in db.execute(sql, chunk):
                replayed[did] = NewDelivery(
                    provider, from_epoch(received_at), loads(headers), bytes(body), sha
                )

        # Interpret what is new (pure), and gather every task key the batch needs.
        plans: dict[int, Accepted | Rejected | _Duplicate | None] = {}
        wanted: set[TaskRef] = set()
        in_batch: dict[tuple[str, str], Sequence[TaskRef]] = {}
        for op in ops:
            if isinstance(op, _Ingest):
                key = (op.delivery.provider, op.delivery.sha256)
                if key in seen or key in in_batch:
                    task_id = seen.get(key)
                    refs = [TaskRef(key[0], task_id)] if task_id else in_batch.get(key, [])
                    plans[id(op)] = _Duplicate(refs)
                    wanted.update(refs)
                    continue
                interpreted = _interpret(op.interpret, op.delivery)
                if isinstance(interpreted, Accepted):
                    in_batch[key] = interpreted.candidates
                plans[id(op)] = interpreted
            elif isinstance(op, _Replay):
                delivery = replayed.get(op.delivery_id)
                plans[id(op)] = None if delivery is None else _interpret(op.interpret, delivery)
            elif isinstance(op, _Apply):
                wanted.update(op.candidates)
            if isinstance(plan := plans.get(id(op)), Accepted):
                wanted.update(plan.candidates)
        self._load(db, batch, wanted)

        results: list[object] = []
        for op in ops:
            try:
                results.append(self._run_op(batch, op, plans.get(id(op))))
            except Exception as error:  # a bug in a rule must not fail the whole batch
                logger.exception("operation failed inside the write batch")
                results.append(error)

        if batch.deliveries:
            db.executemany(_INSERT_DELIVERY, batch.deliveries)
        if batch.dirty:
            db.executemany(
                _UPSERT_TASK,
                [_task_row(task, batch.public.get(ref)) for ref, task in batch.dirty.items()],
            )
        if batch.events:
            db.executemany(_INSERT_EVENT, batch.events)
        if batch.delivery_updates:
            db.executemany(_UPDATE_DELIVERY, batch.delivery_updates)
        due = [task.next_poll_at for task in batch.dirty.values() if task.next_poll_at]
        wrote = bool(batch.deliveries or batch.dirty or batch.delivery_updates)
        for index, op in enumerate(ops):
            if isinstance(op, _Lease):
                leased = self._lease(db, op)
                results[index] = leased
                if leased:
                    wrote = True
                    due.append(op.now + timedelta(seconds=op.lease_seconds))
        if not wrote:
            return results, None
        return results, Commit(self._next_seq - 1, len(batch.events), min(due, default=None))

    def _run_op(self, batch: _Batch, op: _Op, plan: object) -> object:
        if isinstance(op, _Apply):
            existed = batch.pick(op.candidates)[1] is not None
            task, _, seq = batch.decide(op.candidates, op.decide, op.delivery_id)
            return ApplyResult(task, created=not existed and task is not None, event_seq=seq)
        if isinstance(op, _Ingest):
            delivery_id = self._next_delivery_id
            self._next_delivery_id += 1
            outcome, task, error = self._settle(batch, plan, delivery_id)
            d = op.delivery
            batch.deliveries.append(
                (
                    delivery_id,
                    d.provider,
                    epoch(d.received_at),
                    dumps(dict(d.headers)),
                    d.body,
                    d.sha256,
                    outcome.value,
                    error.message if error else None,
                    task.task_id if task else None,
                )
            )
            return IngestResult(delivery_id, outcome, task, error, batch.json_of(task))
        if isinstance(op, _Replay):
            if plan is None:
                return StoreError(f"no delivery {op.delivery_id}")
            outcome, task, error = self._settle(batch, plan, op.delivery_id)
            batch.delivery_updates.append(
                (
                    outcome.value,
                    error.message if error else None,
                    task.task_id if task else None,
                    op.delivery_id,
                )
            )
            return IngestResult(op.delivery_id, outcome, task, error, batch.json_of(task))
        return None  # leases run after the batch's other writes

    def _settle(
        self, batch: _Batch, plan: object, delivery_id: int
    ) -> tuple[Outcome, Task | None, Rejected | None]:
        if isinstance(plan, Rejected):
            return Outcome.REJECTED, None, plan
        if isinstance(plan, _Duplicate):
            task = batch.pick(plan.candidates)[1] if plan.candidates else None
            return Outcome.DUPLICATE, task, None
        assert isinstance(plan, Accepted)
        before = batch.pick(plan.candidates)[1]
        try:
            task, change, seq = batch.decide(plan.candidates, plan.decide, delivery_id)
        except Exception as error:
            logger.exception("rule failed on delivery %d", delivery_id)
            return Outcome.REJECTED, None, Rejected("internal_error", f"could not apply: {error}")
        if change is not None and before is not None and change.task.conflicts > before.conflicts:
            return Outcome.CONFLICT, task, None
        return (Outcome.APPLIED if seq is not None else Outcome.UNCHANGED), task, None

    def _load(self, db: sqlite3.Connection, batch: _Batch, refs: set[TaskRef]) -> None:
        by_provider: dict[str, list[str]] = {}
        for ref in refs:
            batch.tasks[ref] = None
            by_provider.setdefault(ref.provider, []).append(ref.task_id)
        for provider, task_ids in by_provider.items():
            for chunk in _chunks(sorted(task_ids), KEYS_PER_QUERY):
                sql = (
                    "SELECT data FROM tasks WHERE provider = ? "
                    f"AND task_id IN ({','.join('?' * len(chunk))})"
                )
                for (data,) in db.execute(sql, [provider, *chunk]):
                    task = task_from_json(data)
                    batch.tasks[task.ref] = task

    def _lease(self, db: sqlite3.Connection, op: _Lease) -> list[Task]:
        rows = db.execute(_SELECT_DUE, (epoch(op.now), op.limit)).fetchall()
        tasks = [task_from_json(data) for (data,) in rows]
        until = op.now + timedelta(seconds=op.lease_seconds)
        if tasks:
            # Only the poll time changes: patch it in place rather than re-encode each task.
            moved = (epoch(until), iso(until))
            db.executemany(_LEASE, [(*moved, task.provider, task.task_id) for task in tasks])
        return tasks

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
        rows = await self._fetch(
            "SELECT MIN(next_poll_at) FROM tasks WHERE next_poll_at IS NOT NULL"
        )
        return from_epoch(rows[0][0]) if rows and rows[0][0] is not None else None

    async def get_task(self, ref: TaskRef) -> Task | None:
        rows = await self._fetch(
            "SELECT data FROM tasks WHERE provider = ? AND task_id = ?", (ref.provider, ref.task_id)
        )
        return task_from_json(rows[0][0]) if rows else None

    async def list_tasks(
        self,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        before: tuple[float, str, str] | None = None,
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
            where.append("(created_at, provider, task_id) < (?, ?, ?)")
            params.extend(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT data FROM tasks {clause} "
            "ORDER BY created_at DESC, provider DESC, task_id DESC LIMIT ?"
        )
        rows = await self._fetch(sql, [*params, limit])
        return [task_from_json(data) for (data,) in rows]

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
        return [EventRow(*row) for row in rows]

    async def last_seq(self) -> int:
        return self._next_seq - 1

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


async def migrate(db: aiosqlite.Connection) -> list[str]:
    """Apply pending migrations; return the names applied."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "number INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, "
        "applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')))"
    )
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


def _interpret(interpret: Interpret, delivery: NewDelivery) -> Accepted | Rejected:
    try:
        return interpret(delivery)
    except Exception as error:  # a bug must not lose the delivery: keep it, replay later
        logger.exception("interpreting a %s delivery failed", delivery.provider)
        return Rejected("internal_error", f"could not interpret the delivery: {error}")


def _task_row(task: Task, public: str | None = None) -> tuple[Any, ...]:
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
        task_to_json(task, public),
    )


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]

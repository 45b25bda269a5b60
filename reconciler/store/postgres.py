"""The PostgreSQL backend: several replicas on one database behave as one Reconciler
(SPEC §4 "Several replicas on PostgreSQL").

Each replica keeps its own group commit: up to `WRITERS` writer connections (further ones
only for a backlog) each run a batch of queued operations as one transaction through
`batch.write_batch`, whose statements this module runs; the same locks that order several
replicas order them. What makes N replicas agree:

- **Locks, always in one order.** A batch first takes transaction-scoped advisory locks on
  every body it stores and every task it may write (hashed keys, sorted), then loads those
  tasks `FOR UPDATE`, and takes the log's head last. No two writers can wait on each other
  in a cycle, the same body at two replicas is applied once, and a registration racing the
  task's first callback makes one task.
- **A gap-free log.** Event seqs come from the one-row `log_head`
  (`UPDATE … SET last_seq = last_seq + n RETURNING`) as the transaction's last statement.
  Its row lock is held to COMMIT, so event-writing transactions commit in seq order, seqs
  stay contiguous, and a rollback gives its numbers back: a reader at `after=S` can never
  later find an event with a seq <= S that it did not see.
- **Leases.** Due tasks are taken `FOR UPDATE SKIP LOCKED` and pushed forward by the lease in
  the same statement, a transaction of its own on a connection of its own: never queued
  behind the writers' batches, whose rows it skips. A replica killed holding leases only
  delays those tasks.
- **Live everywhere.** Each write transaction sends `NOTIFY` (delivered at COMMIT) with the
  log's head and its earliest poll time. Every replica LISTENs on a connection of its own
  (not the pool), publishes what it hears to its feed, reconnects when that connection
  drops, and reads the head every few seconds anyway (a lost notification delays a reader,
  never loses an event).
- **One loop.** `leadership()` waits for a session advisory lock on a dedicated connection:
  the replica holding it runs the reconciler loop, so provider limits hold for all.
- **Pruning anywhere.** Every replica may prune (plain DELETEs in small batches, each its
  own transaction on a pooled connection, never on the writer's): a batch first tries a
  transaction-scoped advisory lock, and when another replica holds it, it removes nothing
  and says "more", so replicas take turns instead of deleting the same rows at once.

JSON is stored as text, never jsonb (see migrations/postgresql/0001). PostgreSQL text cannot
hold a NUL character, so the few plain-text columns that may carry provider words get them
replaced; JSON text escapes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

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
    Copied,
    Leased,
    StoredDelivery,
    StoredEvent,
    StoredTask,
    served,
    task_from_json,
)

logger = logging.getLogger(__name__)

CHANNEL = "reconciler_commits"
# Session advisory locks (a single 64-bit key each): one for migrations, one for the loop.
MIGRATION_LOCK = 0x5245_434F_4E00_0001
LEADER_LOCK = 0x5245_434F_4E00_0002
PRUNE_LOCK = 0x5245_434F_4E00_0003  # transaction-scoped: one prune batch at a time
READERS = 8  # pooled connections for reads, per replica
# Write transactions a replica runs at once, each on a connection of its own. A batch spends
# most of its time waiting on round trips and the commit's flush, not on this process's
# CPU: with one, a replica took 1,346 webhooks/s using 0.40 of a core (bench/replicas.py).
# A further one starts only when a backlog waits (`batch.Writer`'s spill): four that each
# took whatever arrived made transactions of one operation under a paced load, and the
# 2-replica reconcile run used twice the CPU (bench/reconcile.py; docs/benchmarks.md).
WRITERS = 4
LEASES = -1  # the key of the loop's lease connection among the writers' (`lease_due`)
WATCHDOG_SECONDS = 5.0  # the listener reads the head this often, whatever it heard
RETRIES = 3  # a batch that hit a deadlock or a lock timeout runs again from the start
LOCK_TIMEOUT_SECONDS = 10.0  # a writer never waits longer for a row or advisory lock
# ...and never sits in an open transaction.
IDLE_IN_TRANSACTION = "60s"
# Every statement planned for its own parameters and the tables as they are now. asyncpg
# prepares each statement once per connection, and after five runs PostgreSQL may keep one
# generic plan for it, chosen from the statistics of that moment: a writer that first read
# tasks while the table was nearly empty kept a sequential scan for the keys of every poll
# exchange (41 ms for 50 tasks among 100,000 instead of 0.5 ms) until an ANALYZE, which
# nothing promises. Planning each run costs a fraction of a millisecond.
PLANS = {"plan_cache_mode": "force_custom_plan"}

_LOCK = "SELECT count(pg_advisory_xact_lock(key)) FROM unnest($1::bigint[]) AS key"
_DUPLICATES = """
SELECT provider, sha256, task_id FROM deliveries
WHERE (provider, sha256) IN (SELECT * FROM unnest($1::text[], $2::text[]))
  AND outcome <> 'rejected'
"""
_STORED_DELIVERIES = """
SELECT id, provider, received_at, headers, body, sha256 FROM deliveries WHERE id = ANY($1::bigint[])
"""
_TASKS_FOR_UPDATE = """
SELECT provider, task_id, version, updated_at, data, next_poll_at FROM tasks
WHERE (provider, task_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
FOR UPDATE
"""
_DELIVERY_IDS = "SELECT nextval('deliveries_id_seq') FROM generate_series(1, $1)"
_INSERT_DELIVERIES = """
INSERT INTO deliveries (id, provider, received_at, headers, body, sha256, outcome, error, task_id)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::bytea[],
                     $6::text[], $7::text[], $8::text[], $9::text[])
"""
_UPSERT_TASKS = """
INSERT INTO tasks (provider, task_id, status, source, external_task_id, created_at,
                   updated_at, next_poll_at, version, data)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::int[],
                     $10::text[])
ON CONFLICT (provider, task_id) DO UPDATE SET
    status = excluded.status, source = excluded.source,
    external_task_id = excluded.external_task_id, updated_at = excluded.updated_at,
    next_poll_at = excluded.next_poll_at, version = excluded.version, data = excluded.data
"""
# Tasks whose indexed columns did not move (see batch.TaskRow.in_place).
_UPDATE_TASKS_IN_PLACE = """
UPDATE tasks AS t SET updated_at = u.updated_at, next_poll_at = u.next_poll_at,
    version = u.version, data = u.data
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[],
            $6::text[]) AS u(provider, task_id, updated_at, next_poll_at, version, data)
WHERE t.provider = u.provider AND t.task_id = u.task_id
"""
_UPDATE_DELIVERIES = """
UPDATE deliveries AS d SET outcome = u.outcome, error = u.error, task_id = u.task_id
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS u(id, outcome, error, task_id)
WHERE d.id = u.id
"""
# MATERIALIZED: the planner must not fold the CTE into the UPDATE and lock (or update) more
# rows than the limit. Two statements rather than an optional filter, so that each keeps a
# plan on its own index (`tasks_due`, `tasks_due_by_provider`).
_LEASE_FROM = """
WITH due AS MATERIALIZED (
    SELECT provider, task_id, next_poll_at FROM tasks
    WHERE {where}
    ORDER BY next_poll_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks SET next_poll_at = $3 FROM due
WHERE tasks.provider = due.provider AND tasks.task_id = due.task_id
RETURNING tasks.data, due.next_poll_at
"""
_LEASE = _LEASE_FROM.format(where="next_poll_at <= $1")
_LEASE_OF = _LEASE_FROM.format(where="provider = $4 AND next_poll_at <= $1")
# The last statement before COMMIT: number the events, write them, and notify.
_APPEND = """
WITH head AS (UPDATE log_head SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq),
written AS (
    INSERT INTO events (seq, provider, task_id, type, at, body)
    SELECT head.last_seq - $1 + e.n, e.provider, e.task_id, e.type, e.at, e.body
    FROM head, unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS e(provider, task_id, type, at, body, n)
)
SELECT last_seq, pg_notify($7, last_seq::text || ' ' || $8) FROM head
"""
_NOTIFY = "SELECT pg_notify($1, '0 ' || $2)"
_HEAD = "SELECT last_seq FROM log_head WHERE id = 1"

# --- retention (see `batch.events_to_prune`, `batch.deliveries_to_prune`) ------------------
_TERMINAL = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL))
_PRUNE_TURN = "SELECT pg_try_advisory_xact_lock($1)"
_OLDEST_EVENTS = "SELECT seq, at FROM events ORDER BY seq LIMIT $1"
_PRUNE_EVENTS = "DELETE FROM events WHERE seq <= $1"
# A delivery is settled when it never named a task, its task is gone, or its task is terminal.
_SCAN_DELIVERIES = f"""
SELECT d.id, d.received_at, d.task_id IS NULL OR t.status IS NULL OR t.status IN ({_TERMINAL})
FROM deliveries AS d LEFT JOIN tasks AS t ON t.provider = d.provider AND t.task_id = d.task_id
WHERE d.id > $1 ORDER BY d.id LIMIT $2
"""
_PRUNE_DELIVERIES = "DELETE FROM deliveries WHERE id = ANY($1::bigint[])"
# Through `tasks_status_created`: a task's last change is not before its creation. Rows a
# writer holds are skipped, and the outer condition is checked again on the row as it is
# when the DELETE reaches it (a webhook may just have changed it).
_PRUNE_TASKS = f"""
DELETE FROM tasks WHERE (provider, task_id) IN (
    SELECT provider, task_id FROM tasks
    WHERE status IN ({_TERMINAL}) AND created_at < $1 AND updated_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED
) AND status IN ({_TERMINAL}) AND updated_at < $1
"""
_COUNT_OLD_TASKS = f"""
SELECT count(*) FROM tasks WHERE status IN ({_TERMINAL}) AND created_at < $1 AND updated_at < $1
"""
_COUNT_OLD_EVENTS = """
SELECT count(*) FROM events
WHERE seq < coalesce((SELECT seq FROM events WHERE at >= $1 ORDER BY seq LIMIT 1), $2)
"""
_OLDEST_SEQ = """
SELECT coalesce((SELECT min(seq) FROM events), (SELECT last_seq FROM log_head WHERE id = 1) + 1)
"""
# The probe needs a new page, as the writes that failed did: a TRUNCATE gives the table a new,
# empty file, so the INSERT after it has to extend that file.
_PROBE = ("TRUNCATE store_probe", "INSERT INTO store_probe (probed_at) VALUES ($1)")


def lock_key(key: str) -> int:
    """A signed 64-bit advisory-lock key for `key` (a collision only serializes two
    unrelated writes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _text(value: str | None) -> str | None:
    """A provider's word for a plain text column: PostgreSQL text holds no NUL."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _notice(commit_due: datetime | None) -> str:
    return "-" if commit_due is None else repr(commit_due.timestamp())


def parse_notice(payload: str) -> Commit | None:
    """A notification's `last_seq earliest_due` as a Commit (its events are not counted
    here: another replica wrote them)."""
    try:
        head, _, due = payload.partition(" ")
        earliest = None if due in ("", "-") else datetime.fromtimestamp(float(due), UTC)
        return Commit(int(head), 0, earliest)
    except (ValueError, OverflowError, OSError):
        logger.warning("ignoring a malformed notification on %s", CHANNEL)
        return None


class _Transaction:
    """`batch.Transaction` on the writer connection, inside one transaction."""

    def __init__(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        leased: Leased | None = None,
    ) -> None:
        self.conn = conn
        self.leased = leased or Leased()

    async def lock(self, keys: Collection[str]) -> None:
        if keys:
            await self.conn.execute(_LOCK, sorted({lock_key(key) for key in keys}))

    async def duplicates(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str | None]:
        providers, shas = _columns(keys, 2)
        rows = await self.conn.fetch(_DUPLICATES, providers, shas)
        return {(row[0], row[1]): row[2] for row in rows}

    async def stored_deliveries(self, ids: Collection[int]) -> dict[int, NewDelivery]:
        rows = await self.conn.fetch(_STORED_DELIVERIES, list(ids))
        return {
            did: NewDelivery(provider, received_at, loads(headers), bytes(body), sha)
            for did, provider, received_at, headers, body, sha in rows
        }

    async def tasks(self, refs: Collection[TaskRef]) -> list[Task]:
        providers, task_ids = _columns(sorted(refs), 2)
        rows = await self.conn.fetch(_TASKS_FOR_UPDATE, providers, task_ids)
        read = self.leased.read
        return [
            read(TaskRef(provider, task_id), version, updated_at, data, due)
            for provider, task_id, version, updated_at, data, due in rows
        ]

    async def delivery_ids(self, count: int) -> list[int]:
        return [row[0] for row in await self.conn.fetch(_DELIVERY_IDS, count)]

    async def write(self, writes: Writes) -> None:
        conn = self.conn
        if writes.deliveries:
            await conn.execute(
                _INSERT_DELIVERIES,
                *_columns(
                    [
                        (
                            row.id,
                            row.delivery.provider,
                            row.delivery.received_at,
                            dumps(dict(row.delivery.headers)),
                            row.delivery.body,
                            row.delivery.sha256,
                            row.outcome.value,
                            _text(row.error),
                            _text(row.task_id),
                        )
                        for row in writes.deliveries
                    ],
                    9,
                ),
            )
        upserts = [row for row in writes.tasks.values() if not row.in_place]
        in_place = [row for row in writes.tasks.values() if row.in_place]
        if upserts:
            await conn.execute(
                _UPSERT_TASKS,
                *_columns(
                    [
                        (
                            task.provider,
                            task.task_id,
                            task.status.value,
                            task.source.value,
                            _text(task.external_task_id),
                            task.created_at,
                            task.updated_at,
                            task.next_poll_at,
                            task.version,
                            row.json(),
                        )
                        for row in upserts
                        for task in (row.task,)
                    ],
                    10,
                ),
            )
        if in_place:
            await conn.execute(
                _UPDATE_TASKS_IN_PLACE,
                *_columns(
                    [
                        (
                            task.provider,
                            task.task_id,
                            task.updated_at,
                            task.next_poll_at,
                            task.version,
                            row.json(),
                        )
                        for row in in_place
                        for task in (row.task,)
                    ],
                    6,
                ),
            )
        if writes.delivery_updates:
            await conn.execute(
                _UPDATE_DELIVERIES,
                *_columns(
                    [
                        (u.id, u.outcome.value, _text(u.error), _text(u.task_id))
                        for u in writes.delivery_updates
                    ],
                    4,
                ),
            )

    async def lease(
        self, now: datetime, limit: int, until: datetime, provider: str | None
    ) -> list[Task]:
        if provider is None:
            rows = await self.conn.fetch(_LEASE, now, limit, until)
        else:
            rows = await self.conn.fetch(_LEASE_OF, now, limit, until, provider)
        tasks = [task_from_json(data, due) for data, due in rows]
        tasks.sort(key=lambda task: task.next_poll_at or now)
        return self.leased.keep(tasks)

    async def append(self, events: Sequence[EventRecord], earliest_due: datetime | None) -> int:
        if not events:
            await self.conn.execute(_NOTIFY, CHANNEL, _notice(earliest_due))
            return 0
        columns = _columns([(e.provider, e.task_id, e.type, e.at, e.body) for e in events], 5)
        row = await self.conn.fetchrow(
            _APPEND, len(events), *columns, CHANNEL, _notice(earliest_due)
        )
        assert row is not None
        last_seq: int = row[0]
        return last_seq - len(events) + 1

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int) -> Pruned:
        conn = self.conn
        if not await conn.fetchval(_PRUNE_TURN, PRUNE_LOCK):
            return Pruned(0, True, after)  # another replica's turn: try again later
        if kind is RowKind.EVENTS:
            head = [(row[0], row[1]) for row in await conn.fetch(_OLDEST_EVENTS, limit)]
            pruned = events_to_prune(head, before, limit)
            if pruned.removed:
                await conn.execute(_PRUNE_EVENTS, pruned.after)
            return pruned
        if kind is RowKind.DELIVERIES:
            scanned = [(r[0], r[1], r[2]) for r in await conn.fetch(_SCAN_DELIVERIES, after, limit)]
            doomed, pruned = deliveries_to_prune(scanned, before, limit, after)
            if doomed:
                await conn.execute(_PRUNE_DELIVERIES, doomed)
            return pruned
        removed = _count(await conn.execute(_PRUNE_TASKS, before, limit))
        return Pruned(removed, removed >= limit)

    async def probe(self, at: datetime) -> None:
        truncate, insert = _PROBE
        await self.conn.execute(truncate)
        await self.conn.execute(insert, at)


class PostgresStore(Batched):
    def __init__(
        self,
        url: str,
        *,
        on_commit: Callable[[Commit], None] | None = None,
        readers: int = READERS,
        watchdog_seconds: float = WATCHDOG_SECONDS,
        lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
        writers: int = WRITERS,
    ) -> None:
        self.url = url
        self._on_commit = on_commit
        self._readers = readers
        self.watchdog_seconds = watchdog_seconds
        self.lock_timeout_seconds = lock_timeout_seconds
        self._pool: asyncpg.Pool | None = None
        # Per writer lane, and the loop's leases' own (`LEASES`, see `lease_due`).
        self._writer_conns: dict[int, asyncpg.Connection] = {}
        self._leasing = asyncio.Lock()
        self._writer = Writer(self._run, lanes=writers)
        self._leased = Leased()
        self._listening: asyncio.Task[None] | None = None
        self._opened = False
        self._closing = False
        self.commits = 0
        self.retried = 0  # batches run again after a deadlock or lock timeout
        self._write_failure: str | None = None

    # --- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStore:
        if self._opened:
            raise StoreError("this store was already opened")
        self._opened = True
        try:
            setup = await self._connect("migrate", waits=True)
            try:
                await migrate(setup)
            finally:
                await setup.close()
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self._readers,
                server_settings=self._session("reader"),
            )
        except BaseException:
            await self._close_connections()
            raise
        self._writer.start("postgres-writer")
        self._listening = asyncio.create_task(self._listen(), name="postgres-listener")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self._writer.close()  # drains what is queued
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        await self._close_connections()

    async def _close_connections(self) -> None:
        conns, self._writer_conns = self._writer_conns, {}
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await conn.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.close()

    def _session(self, role: str, *, waits: bool = False) -> dict[str, str]:
        """Session settings for a connection named for `role` in pg_stat_activity. One that
        `waits` is there to wait for a session lock (the loop's, migrations'): for as long
        as another replica holds it, not `lock_timeout`."""
        timeout = 0 if waits else round(self.lock_timeout_seconds * 1000)
        return {
            "application_name": f"reconciler-{role}",
            "lock_timeout": f"{timeout}ms",
            "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION,
            **PLANS,
        }

    async def _connect(self, role: str, *, waits: bool = False) -> asyncpg.Connection:
        """A connection of its own (see `_session`)."""
        settings = self._session(role, waits=waits)
        try:
            conn: asyncpg.Connection = await asyncpg.connect(self.url, server_settings=settings)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            # The class only: a driver's message may quote the connection string.
            raise StoreError(f"cannot connect to PostgreSQL ({type(error).__name__})") from None
        return conn

    # --- writes ----------------------------------------------------------------------------

    # --- retention and the full-disk check --------------------------------------------------

    async def prune(self, kind: RowKind, before: datetime, limit: int, after: int = 0) -> Pruned:
        """One batch in a transaction of its own on a pooled connection: PostgreSQL deletes
        beside the writer, so webhooks never wait behind a prune."""
        if self._pool is None or self._closing:
            raise StoreError("the store is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                pruned: Pruned = await _Transaction(conn).prune(kind, before, limit, after)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StoreError(f"prune failed ({type(error).__name__})") from None
        return pruned

    async def prunable(self, kind: RowKind, before: datetime) -> int:
        if kind is RowKind.EVENTS:
            rows = await self._fetch(_COUNT_OLD_EVENTS, before, 2**63 - 1)
            return int(rows[0][0])
        if kind is RowKind.DELIVERIES:

            async def scan(after: int, limit: int) -> list[tuple[int, datetime, bool]]:
                rows = await self._fetch(_SCAN_DELIVERIES, after, limit)
                return [(row[0], row[1], row[2]) for row in rows]

            return await count_prunable_deliveries(scan, before)
        rows = await self._fetch(_COUNT_OLD_TASKS, before)
        return int(rows[0][0])

    async def oldest_seq(self) -> int:
        rows = await self._fetch(_OLDEST_SEQ)
        return int(rows[0][0])

    async def size_bytes(self) -> int:
        rows = await self._fetch("SELECT pg_database_size(current_database())")
        return int(rows[0][0])

    def write_failure(self) -> str | None:
        return self._write_failure

    async def probe(self) -> None:
        await self._writer.submit(Probe(datetime.now(UTC)))
        self._write_failure = None

    async def _run(self, ops: list[Op], lane: int = 0) -> None:
        """One batch as one transaction on the lane's connection; run again from the start
        (the decisions are pure) when PostgreSQL broke a deadlock or a lock wait timed out."""
        for attempt in range(1, RETRIES + 1):
            try:
                conn = await self._writer_connection(lane)
                async with conn.transaction():
                    results, commit = await write_batch(_Transaction(conn, self._leased), ops)
                break
            except (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError) as error:
                if attempt == RETRIES:
                    self._write_failure = _failure(error)
                    fail(ops, StoreError(f"write failed: {type(error).__name__}"))
                    return
                self.retried += 1
                logger.warning("write batch hit %s; running it again", type(error).__name__)
            except Exception as error:
                # Whatever broke (the database, the connection, a bug), no caller may think
                # its write was committed; the next batch starts on a new connection.
                logger.error("write transaction of %d operations failed: %r", len(ops), error)
                self._write_failure = _failure(error)
                await self._drop_writer(lane)
                fail(ops, StoreError(f"write failed ({type(error).__name__})"))
                return
        if commit is not None:  # it wrote rows: the store can commit again
            self._write_failure = None
        self.commits += 1
        if commit is not None and self._on_commit is not None:
            self._on_commit(commit)
        settle(ops, results)

    async def lease_due(
        self, now: datetime, limit: int, lease_seconds: float, provider: str | None = None
    ) -> list[Task]:
        """One statement, committed on its own, on the lease's own connection: not an
        operation queued to the writers. A lease batched with poll results waited for their
        transaction (and for a free lane behind them): in a burst's busiest seconds 33-44 ms
        a lease, which held the loop's passes to about 15 a second. The rows the writers
        hold are skipped (`FOR UPDATE SKIP LOCKED`); those are not due anyway."""
        until = now + timedelta(seconds=lease_seconds)
        async with self._leasing:  # the loop leases a pass at a time; this keeps it so
            if self._closing:
                raise StoreError("the store is closed")
            try:
                conn = await self._writer_connection(LEASES)
                leased = await _Transaction(conn, self._leased).lease(now, limit, until, provider)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.error("lease failed: %r", error)
                self._write_failure = _failure(error)
                await self._drop_writer(LEASES)
                raise StoreError(f"lease failed ({type(error).__name__})") from None
        if leased:
            self._write_failure = None
            self._publish(Commit(0, 0, until))  # a leased task falls due again then
        return leased

    async def _writer_connection(self, lane: int) -> asyncpg.Connection:
        conn = self._writer_conns.get(lane)
        if conn is None or conn.is_closed():
            role = "lease" if lane == LEASES else "writer"
            conn = self._writer_conns[lane] = await self._connect(role)
        return conn

    async def _drop_writer(self, lane: int) -> None:
        """After an error that may have broken the connection: the next use reconnects."""
        conn = self._writer_conns.pop(lane, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    # --- other replicas' commits --------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; on every notification, and every
        `watchdog_seconds` whatever was heard, publish the log's head. A connection that
        drops, or that does not answer the watchdog's read, is replaced."""
        while True:
            try:
                conn = await self._connect("listener")
            except StoreError as error:
                logger.warning("listener: %s; trying again", error)
                await asyncio.sleep(1.0)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _, lost=lost: lost.set())

            def heard(_conn: object, _pid: int, _channel: str, payload: object) -> None:
                commit = parse_notice(str(payload))
                if commit is not None:
                    self._publish(commit)

            try:
                await conn.add_listener(CHANNEL, heard)
                while not lost.is_set():
                    # Read after LISTEN: a commit made before it was not notified to us.
                    async with asyncio.timeout(self.watchdog_seconds):
                        self._publish(Commit(await conn.fetchval(_HEAD)))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.watchdog_seconds):
                            await lost.wait()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("listener connection lost (%s); reconnecting", type(error).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    def _publish(self, commit: Commit) -> None:
        if self._on_commit is not None:
            self._on_commit(commit)

    # --- the loop's lock ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        """Wait until this replica holds the loop's lock; yield an Event that is set if the
        lock may have been lost (its connection dropped or stopped answering). Leaving
        releases it, so another replica takes over at once."""
        conn = await self._connect("leader", waits=True)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        watching: asyncio.Task[None] | None = None
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LEADER_LOCK)
            watching = asyncio.create_task(self._watch(conn, lost), name="postgres-leader")
            yield lost
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)  # ends the session: the lock goes with it

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        while not lost.is_set():
            try:
                async with asyncio.timeout(self.watchdog_seconds):
                    await conn.fetchval("SELECT 1")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                lost.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.watchdog_seconds):
                    await lost.wait()

    # --- reads ---------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *params: object) -> list[Any]:
        if self._pool is None or self._closing:
            raise StoreError("the store is closed")
        try:
            return list(await self._pool.fetch(sql, *params))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StoreError(f"read failed ({type(error).__name__})") from None

    async def next_due_at(self) -> datetime | None:
        rows = await self._fetch(
            "SELECT min(next_poll_at) FROM tasks WHERE next_poll_at IS NOT NULL"
        )
        due: datetime | None = rows[0][0]
        return due

    async def get_task(self, ref: TaskRef) -> Task | None:
        rows = await self._fetch(
            "SELECT data, next_poll_at FROM tasks WHERE provider = $1 AND task_id = $2",
            ref.provider,
            ref.task_id,
        )
        return task_from_json(*rows[0]) if rows else None

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
            params.append(status)
            where.append(f"status = ${len(params)}")
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        if before is not None:
            params.extend(before)
            n = len(params)
            where.append(f"(created_at, provider, task_id) < (${n - 2}, ${n - 1}, ${n})")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        sql = (
            f"SELECT data, next_poll_at FROM tasks {clause} "
            f"ORDER BY created_at DESC, provider DESC, task_id DESC LIMIT ${len(params)}"
        )
        return [task_from_json(data, due) for data, due in await self._fetch(sql, *params)]

    async def events_after(
        self, after: int, limit: int, provider: str | None = None, task_id: str | None = None
    ) -> list[EventRow]:
        params: list[object] = [after]
        where = ["seq > $1"]
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        if task_id is not None:
            params.append(task_id)
            where.append(f"task_id = ${len(params)}")
        params.append(limit)
        sql = (
            f"SELECT seq, provider, task_id, type, body FROM events WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT ${len(params)}"
        )
        return [
            EventRow(seq, provider_, task, type_, served(seq, body))
            for seq, provider_, task, type_, body in await self._fetch(sql, *params)
        ]

    async def last_seq(self) -> int:
        rows = await self._fetch(_HEAD)
        head: int = rows[0][0]
        return head

    async def deliveries(
        self, ids: Sequence[int] | None = None, rejected_only: bool = False, limit: int = 1000
    ) -> list[Delivery]:
        where: list[str] = []
        params: list[object] = []
        if ids is not None:
            if not ids:
                return []
            params.append(list(ids))
            where.append(f"id = ANY(${len(params)}::bigint[])")
        if rejected_only:
            where.append("outcome = 'rejected'")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        rows = await self._fetch(
            "SELECT id, provider, received_at, headers, body, sha256, outcome, error, task_id "
            f"FROM deliveries {clause} ORDER BY id LIMIT ${len(params)}",
            *params,
        )
        return [
            Delivery(
                did,
                provider,
                at,
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
            "SELECT provider, status, source, count(*) FROM tasks GROUP BY provider, status, source"
        )
        return [Settled(*row) for row in rows]

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    # --- import (`reconciler copy`) ------------------------------------------------------------

    async def is_empty(self) -> bool:
        """True while the database has never held a task, delivery or event."""
        rows = await self._fetch(_IS_EMPTY)
        empty: bool = rows[0][0]
        return empty

    async def import_rows(self, chunks: AsyncIterable[Chunk]) -> Copied:
        """Write exported rows into this empty database as they are (seqs, ids and stored
        text kept), one COPY per chunk, all in one transaction; then move the log's head
        and the delivery ids past what was copied, so writes continue after it. Whatever
        fails, the database is left as it was: a refusal or an error is a StoreError."""
        conn = await self._connect("copy")
        try:
            async with conn.transaction():
                # Writers wait until the copy commits (readers still read, and see nothing
                # of it before): no write can take a seq or an id the copy brings.
                await conn.execute(_LOCK_FOR_IMPORT)
                if not await conn.fetchval(_IS_EMPTY):
                    raise StoreError("the target database is not empty: nothing was copied.")
                tasks = deliveries = events = source_seq = source_delivery = 0
                async for chunk in chunks:
                    source_seq = max(source_seq, chunk.last_seq)
                    source_delivery = max(source_delivery, chunk.last_delivery)
                    if chunk.tasks:
                        await conn.copy_records_to_table(
                            "tasks", records=_task_records(chunk.tasks), columns=_TASK_COLUMNS
                        )
                        tasks += len(chunk.tasks)
                    if chunk.deliveries:
                        await conn.copy_records_to_table(
                            "deliveries",
                            records=_delivery_records(chunk.deliveries),
                            columns=_DELIVERY_COLUMNS,
                        )
                        deliveries += len(chunk.deliveries)
                    if chunk.events:
                        await conn.copy_records_to_table(
                            "events", records=_event_records(chunk.events), columns=_EVENT_COLUMNS
                        )
                        events += len(chunk.events)
                last_seq: int = await conn.fetchval(_HEAD_AFTER_IMPORT, source_seq)
                await conn.execute(_DELIVERY_IDS_AFTER_IMPORT, source_delivery)
                # A replica already running on this database hears of the copy at COMMIT.
                earliest: datetime | None = await conn.fetchval(_EARLIEST_DUE)
                await conn.execute(_NOTIFY_HEAD, CHANNEL, f"{last_seq} {_notice(earliest)}")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StoreError(f"copy failed ({type(error).__name__}: {error})") from error
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        return Copied(tasks, deliveries, events, last_seq)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations under a session lock, so that replicas starting together on
    an empty database migrate once (the others wait, then find nothing to do)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "number INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch("SELECT number, name, sha256 FROM schema_migrations")
        applied = [migrations.Applied(*row) for row in rows]
        todo = migrations.pending(migrations.load("postgresql"), applied)
        for migration in todo:
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (number, name, sha256) VALUES ($1, $2, $3)",
                        migration.number,
                        migration.name,
                        migration.sha256,
                    )
            except asyncpg.PostgresError as error:
                raise MigrationError(
                    f"migration {migration.number:04d}_{migration.name} failed: {error}"
                ) from error
        return [f"{m.number:04d}_{m.name}" for m in todo]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _failure(error: Exception) -> str:
    """Why a write transaction failed, for /readyz: the class and SQLSTATE only (a driver's
    message may quote the connection string)."""
    if isinstance(error, asyncpg.DiskFullError):
        return f"PostgreSQL is out of disk space ({error.sqlstate})"
    if isinstance(error, asyncpg.PostgresError):
        return f"{type(error).__name__} ({error.sqlstate})"
    return type(error).__name__


def _count(status: str) -> int:
    """The row count of a command status such as `DELETE 42`."""
    return int(status.rsplit(" ", 1)[-1])


def _columns(rows: Collection[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as columns, for one `unnest(...)` statement instead of one per row."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


# --- import (`PostgresStore.import_rows`) ----------------------------------------------------

_IS_EMPTY = """
SELECT NOT EXISTS (SELECT FROM tasks) AND NOT EXISTS (SELECT FROM deliveries)
   AND NOT EXISTS (SELECT FROM events) AND (SELECT last_seq FROM log_head WHERE id = 1) = 0
"""
_LOCK_FOR_IMPORT = "LOCK TABLE tasks, deliveries, events, log_head IN EXCLUSIVE MODE"
_TASK_COLUMNS = (
    "provider",
    "task_id",
    "status",
    "source",
    "external_task_id",
    "created_at",
    "updated_at",
    "next_poll_at",
    "version",
    "data",
)
_DELIVERY_COLUMNS = (
    "id",
    "provider",
    "received_at",
    "headers",
    "body",
    "sha256",
    "outcome",
    "error",
    "task_id",
)
_EVENT_COLUMNS = ("seq", "provider", "task_id", "type", "at", "body")
# After the largest seq and id copied, or the source's own counters where retention pruned
# its newest rows ($1: `Chunk.last_seq`, `Chunk.last_delivery`), whichever is larger.
_HEAD_AFTER_IMPORT = """
UPDATE log_head SET last_seq = greatest((SELECT coalesce(max(seq), 0) FROM events), $1)
WHERE id = 1
RETURNING last_seq
"""
# is_called = false: the next nextval() returns exactly the largest id + 1 (1 when none).
_DELIVERY_IDS_AFTER_IMPORT = """
SELECT setval(pg_get_serial_sequence('deliveries', 'id'),
              greatest((SELECT coalesce(max(id), 0) FROM deliveries), $1::bigint) + 1, false)
"""
_EARLIEST_DUE = "SELECT min(next_poll_at) FROM tasks"
_NOTIFY_HEAD = "SELECT pg_notify($1, $2)"


# The plain text columns get what the writer gives them (`_text`); the JSON and the bodies
# go in exactly as stored.
def _task_records(rows: Sequence[StoredTask]) -> list[tuple[Any, ...]]:
    return [
        (
            t.provider,
            t.task_id,
            t.status,
            t.source,
            _text(t.external_task_id),
            t.created_at,
            t.updated_at,
            t.next_poll_at,
            t.version,
            t.data,
        )
        for t in rows
    ]


def _delivery_records(rows: Sequence[StoredDelivery]) -> list[tuple[Any, ...]]:
    return [
        (
            d.id,
            d.provider,
            d.received_at,
            d.headers,
            d.body,
            d.sha256,
            d.outcome,
            _text(d.error),
            _text(d.task_id),
        )
        for d in rows
    ]


def _event_records(rows: Sequence[StoredEvent]) -> list[tuple[Any, ...]]:
    return [(e.seq, e.provider, e.task_id, e.type, e.at, e.body) for e in rows]

"""PostgreSQL with several writers on one database: what SPEC §4 "Several replicas"
promises, shown with two store instances (two replicas' stores) and raw connections."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from reconciler.errors import MigrationError
from reconciler.model import Change, Commit, EventType, Outcome, Source, Task, TaskRef
from reconciler.state import new_task
from reconciler.store.base import Accepted, NewDelivery
from reconciler.store.batch import task_key
from reconciler.store.postgres import _TASKS_FOR_UPDATE, PLANS, PostgresStore, lock_key

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def url(postgres_url: str) -> str:
    return postgres_url


def creating(ref: TaskRef, source: Source = Source.REGISTER) -> Callable[[Task | None], Change]:
    def decide(task: Task | None) -> Change:
        if task is not None:  # exists already: count the second writer's attempt
            return Change(task.replace(polls=task.polls + 1, version=task.version + 1), None)
        made = new_task(ref, "text2video", NOW, 3600, source).replace(
            version=1, next_poll_at=NOW + timedelta(seconds=60)
        )
        return Change(made, EventType.REGISTERED, None)

    return decide


async def test_a_reader_never_sees_a_later_seq_before_an_earlier_one(url: str) -> None:
    """A writer holds the log's head (seq 1 taken, not committed) while a second one writes:
    the second waits for the head, and no reader ever sees seq 2 without seq 1."""
    slow = await asyncpg.connect(url)
    seen: list[list[int]] = []
    async with PostgresStore(url) as store:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute("UPDATE log_head SET last_seq = last_seq + 1")
        await slow.execute(
            "INSERT INTO events (seq, provider, task_id, type, at, body) "
            "VALUES (1, 'kling', 'slow', 'task.registered', now(), '{}')"
        )
        ref = TaskRef("kling", "fast")
        fast = asyncio.create_task(store.apply([ref], creating(ref)))

        async def read() -> list[int]:
            return [row.seq for row in await store.events_after(0, 10)]

        # The fast writer got as far as the head, and waits there.
        async with asyncio.timeout(10):
            while not await _waiting_on_a_lock(url):
                seen.append(await read())
        for _ in range(20):
            seen.append(await read())
        assert not fast.done()
        await transaction.commit()
        result = await fast
        seen.append(await read())
    await slow.close()
    assert result.event_seq == 2
    assert all(seqs in ([], [1, 2]) for seqs in seen), seen
    assert seen[-1] == [1, 2]


async def test_a_lease_is_not_queued_behind_a_write_batch(url: str) -> None:
    """A writer's batch waits on a task's lock; the loop's lease of another task, due, is
    answered meanwhile: leases are not operations queued to the writers."""
    due, held = TaskRef("acedata", "due"), TaskRef("acedata", "held")
    blocker = await asyncpg.connect(url)
    async with PostgresStore(url) as store:
        await store.apply([due], creating(due))  # its first poll due 60 s after NOW
        async with blocker.transaction():
            await blocker.execute("SELECT pg_advisory_xact_lock($1)", lock_key(task_key(held)))
            applying = asyncio.create_task(store.apply([held], creating(held)))
            async with asyncio.timeout(10):
                while not await _waiting_on_a_lock(url):
                    pass
                leased = await store.lease_due(NOW + timedelta(seconds=61), 10, 30)
            assert [task.ref for task in leased] == [due]
            assert not applying.done()
        async with asyncio.timeout(10):
            await applying  # the lock released, the batch goes on
    await blocker.close()


async def _waiting_on_a_lock(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    finally:
        await conn.close()
    return bool(waiting)


@pytest.fixture
async def two(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with PostgresStore(url) as a, PostgresStore(url) as b:
        yield a, b


async def test_the_same_body_at_two_replicas_is_applied_once(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    for n in range(20):
        body = f'{{"task_id": "t{n}", "status": "done"}}'.encode()
        ref = TaskRef("kling", f"t{n}")
        delivery = NewDelivery("kling", NOW, {}, body, hashlib.sha256(body).hexdigest())
        results = await asyncio.gather(
            a.ingest(delivery, lambda d, ref=ref: Accepted([ref], creating(ref, Source.WEBHOOK))),
            b.ingest(delivery, lambda d, ref=ref: Accepted([ref], creating(ref, Source.WEBHOOK))),
        )
        assert sorted(r.outcome for r in results) == [Outcome.APPLIED, Outcome.DUPLICATE]
    events = await a.events_after(0, 100)
    assert [e.seq for e in events] == list(range(1, 21))


async def test_a_registration_racing_a_callback_makes_one_task(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    refs = [TaskRef("acedata", f"r{n}") for n in range(30)]
    results = await asyncio.gather(
        *(a.apply([ref], creating(ref)) for ref in refs),
        *(b.apply([ref], creating(ref, Source.WEBHOOK)) for ref in refs),
    )
    assert sum(result.created for result in results) == len(refs)
    for ref in refs:
        task = await a.get_task(ref)
        assert task is not None and task.version == 2 and task.polls == 1  # the loser's write
    events = await b.events_after(0, 100)
    assert sorted(e.task_id for e in events) == sorted(ref.task_id for ref in refs)


async def test_concurrent_leases_are_disjoint(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    refs = [TaskRef("kie", f"l{n}") for n in range(200)]
    await asyncio.gather(*(a.apply([ref], creating(ref)) for ref in refs))
    due = NOW + timedelta(seconds=60)
    leases = await asyncio.gather(
        *(store.lease_due(due, 25, 30) for store in (a, b) for _ in range(6))
    )
    taken = [task.ref for lease in leases for task in lease]
    assert len(taken) == len(set(taken)) == 200
    assert await a.lease_due(due, 25, 30) == []


async def test_commits_on_one_replica_wake_the_other_also_after_its_listener_dies(
    url: str,
) -> None:
    heard: list[Commit] = []
    changed = asyncio.Event()

    def on_commit(commit: Commit) -> None:
        heard.append(commit)
        changed.set()

    async def until_heard(seq: int) -> None:
        async with asyncio.timeout(10):
            while True:
                changed.clear()
                if any(commit.last_seq >= seq for commit in heard):
                    return
                await changed.wait()

    listening = PostgresStore(url, on_commit=on_commit, watchdog_seconds=0.5)
    async with listening, PostgresStore(url) as other:
        first = TaskRef("kling", "one")
        await other.apply([first], creating(first))
        await until_heard(1)

        admin = await asyncpg.connect(url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = $1 "
                "AND pid <> pg_backend_pid()",
                "reconciler-listener",
            )
        finally:
            await admin.close()
        assert killed == 2  # each store listens on a connection of its own
        second = TaskRef("kling", "two")
        await other.apply([second], creating(second))
        await until_heard(2)


async def test_replicas_starting_together_migrate_once(url: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(
            "DROP TABLE schema_migrations, tasks, events, deliveries, log_head, store_probe CASCADE"
        )
    finally:
        await admin.close()
    stores = [PostgresStore(url) for _ in range(3)]
    await asyncio.gather(*(store.__aenter__() for store in stores))
    for store in stores:
        await store.close()
    admin = await asyncpg.connect(url)
    try:
        rows = await admin.fetch("SELECT number FROM schema_migrations ORDER BY number")
        await admin.execute(
            "INSERT INTO schema_migrations (number, name, sha256) VALUES (999, 'later', 'x')"
        )
    finally:
        await admin.close()
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1))
    with pytest.raises(MigrationError, match="does not know"):
        async with PostgresStore(url):
            pass


async def test_one_replica_leads_and_another_takes_over(url: str) -> None:
    async with PostgresStore(url) as a, PostgresStore(url) as b:
        async with a.leadership() as lost:
            waiting = asyncio.create_task(_lead(b))
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done and not lost.is_set()
        # a let go: b leads now.
        async with asyncio.timeout(10):
            await waiting


async def test_a_standby_waits_for_the_loop_longer_than_a_lock_timeout(url: str) -> None:
    """Writers give up on a lock after `lock_timeout`; a replica waiting to lead the loop
    must not: it waits as long as the leader lives (here 5 lock timeouts)."""
    async with (
        PostgresStore(url, lock_timeout_seconds=0.1) as a,
        PostgresStore(url, lock_timeout_seconds=0.1) as b,
    ):
        async with a.leadership():
            waiting = asyncio.create_task(_lead(b))
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done, waiting.exception() if done else None
        async with asyncio.timeout(10):
            await waiting


async def _lead(store: PostgresStore) -> None:
    async with store.leadership():
        pass


def test_migrate_prints_the_database_without_its_password(url: str) -> None:
    secret_url = url.replace("postgres@", "postgres:pw-s3cret@", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "RECONCILER_DATABASE_URL": secret_url},
    )
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stdout
    assert "pw-s3cret" not in done.stdout + done.stderr


async def _plan_after_growth(url: str, settings: dict[str, str]) -> str:
    """The plan a connection with `settings` uses for a poll exchange's task read once the
    tasks table has grown from ten rows to 20,000, having run the same prepared statement
    six times while it was small (asyncpg prepares each statement once per connection).
    No ANALYZE runs in between: the test's table has autovacuum off."""
    insert = """
        INSERT INTO tasks (provider, task_id, status, source, created_at, updated_at,
                           next_poll_at, version, data)
        SELECT 'acedata', 't' || n, 'processing', 'register', now(), now(), now(), 1,
               repeat('x', 500)
        FROM generate_series($1::int, $2::int) AS n
    """

    def run(first: int) -> str:
        keys = ",".join(f"t{n}" for n in range(first, first + 50))
        return f"EXECUTE exchange_read('{{{','.join(['acedata'] * 50)}}}', '{{{keys}}}')"

    conn = await asyncpg.connect(url, server_settings=settings)
    try:
        await conn.execute("TRUNCATE tasks")
        await conn.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        await conn.execute(insert, 1, 10)
        await conn.execute(f"PREPARE exchange_read(text[], text[]) AS {_TASKS_FOR_UPDATE}")
        for _ in range(6):
            async with conn.transaction():
                await conn.execute(run(1))
        await conn.execute(insert, 11, 20_000)
        plan = await conn.fetch(f"EXPLAIN {run(1000)}")
        return "\n".join(row[0] for row in plan)
    finally:
        await conn.close()


async def test_a_statement_first_run_on_a_small_table_reads_a_large_one_by_its_index(
    url: str,
) -> None:
    """The store's sessions plan every run afresh (`PLANS`): a poll exchange's 50 tasks are
    read through the primary key however small the table was when the writer first read
    them. PostgreSQL's default keeps the generic plan of that moment: a scan of the whole
    table for every exchange."""
    assert "Seq Scan on tasks" in await _plan_after_growth(url, {})
    assert "Seq Scan on tasks" not in await _plan_after_growth(url, PLANS)

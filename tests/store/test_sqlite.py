"""The SQLite backend: migrations, group commit, durability before resume, reads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.errors import MigrationError
from reconciler.model import Change, EventType, Source, Status, Task, TaskRef
from reconciler.state import new_task
from reconciler.store import migrations
from reconciler.store.base import NewDelivery
from reconciler.store.sqlite import SQLiteStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def creating(ref: TaskRef, status: Status = Status.SUBMITTED):
    def decide(task: Task | None) -> Change | None:
        if task is not None:
            return None
        created = new_task(ref, "text2video", NOW, 3600, Source.REGISTER).replace(
            status=status, version=1, next_poll_at=NOW + timedelta(seconds=60)
        )
        return Change(created, EventType.REGISTERED, None)

    return decide


def delivery(body: bytes, provider: str = "kling") -> NewDelivery:
    return NewDelivery(
        provider, NOW, {"content-type": "application/json"}, body, hashlib.sha256(body).hexdigest()
    )


async def test_migrations_directory_is_found() -> None:
    assert (migrations.migrations_dir("sqlite") / "0001_initial.sql").is_file()


async def test_migrate_creates_then_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new" / "db.sqlite"
    async with SQLiteStore(path):
        pass
    first = sqlite3.connect(path).execute("SELECT number, sha256 FROM schema_migrations").fetchall()
    async with SQLiteStore(path):
        pass
    again = sqlite3.connect(path).execute("SELECT number, sha256 FROM schema_migrations").fetchall()
    assert first == again and len(first) == len(migrations.load("sqlite"))


async def test_database_newer_than_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations (number, name, sha256) VALUES (999, 'x', 'y')")
    with pytest.raises(MigrationError, match="does not know"):
        async with SQLiteStore(path):
            pass


async def test_edited_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_migrations SET sha256 = 'edited' WHERE number = 1")
    with pytest.raises(MigrationError, match="edited"):
        async with SQLiteStore(path):
            pass


async def test_tasks_survive_the_move_to_a_rowid_table(tmp_path: Path) -> None:
    """0003 rebuilds `tasks`: a database written before it keeps every task, its events
    and its poll schedule, and the upsert still finds existing rows by key."""
    path = tmp_path / "db.sqlite"
    before = [m for m in migrations.load("sqlite") if m.number < 3]
    async with SQLiteStore(path) as store:
        refs = [TaskRef("kling", f"t{n}") for n in range(3)]
        for ref in refs:
            await store.apply([ref], creating(ref))
    with sqlite3.connect(path) as db:  # back to the schema of 0002, rows kept
        db.executescript(
            """
            CREATE TABLE old_tasks (
                provider TEXT NOT NULL, task_id TEXT NOT NULL, status TEXT NOT NULL,
                source TEXT NOT NULL, external_task_id TEXT, created_at REAL NOT NULL,
                updated_at REAL NOT NULL, next_poll_at REAL, version INTEGER NOT NULL,
                data TEXT NOT NULL, PRIMARY KEY (provider, task_id)) WITHOUT ROWID;
            INSERT INTO old_tasks SELECT provider, task_id, status, source, external_task_id,
                created_at, updated_at, next_poll_at, version, data FROM tasks;
            DROP TABLE tasks;
            ALTER TABLE old_tasks RENAME TO tasks;
            CREATE INDEX deliveries_task ON deliveries (provider, task_id);
            DROP TABLE store_state;
            DELETE FROM schema_migrations WHERE number >= 3;
            """
        )
        applied = db.execute("SELECT number, sha256 FROM schema_migrations").fetchall()
        assert applied == [(m.number, m.sha256) for m in before]

    async with SQLiteStore(path) as store:
        assert [t.task_id for t in await store.list_tasks(limit=10)] == ["t2", "t1", "t0"]
        assert len(await store.events_after(0, 10)) == 3
        assert await store.next_due_at() == NOW + timedelta(seconds=60)
        result = await store.apply([refs[0]], lambda task: Change(task.replace(version=9), None))
        assert result.task is not None and result.task.version == 9
        assert (await store.get_task(refs[0])).version == 9  # type: ignore[union-attr]
    with sqlite3.connect(path) as db:
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'").fetchone()[0]
        assert "WITHOUT ROWID" not in sql
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone() == (3,)


async def test_group_commit_batches_and_resumes_only_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore(path) as store:
        observer = sqlite3.connect(path)

        async def write(n: int) -> None:
            ref = TaskRef("kling", f"t{n}")
            result = await store.apply([ref], creating(ref))
            assert result.created
            # Resumed: the row must be visible from an independent connection right now.
            row = observer.execute(
                "SELECT status FROM tasks WHERE provider = ? AND task_id = ?", ("kling", f"t{n}")
            ).fetchone()
            assert row == ("submitted",)

        commits_before = store.stats.commits
        await asyncio.gather(*(write(n) for n in range(200)))
        commits = store.stats.commits - commits_before
        assert commits <= 20, commits  # far fewer than 200 transactions
        assert store.stats.largest_batch >= 10
        assert observer.execute("SELECT COUNT(*) FROM events").fetchone() == (200,)
        seqs = [s for (s,) in observer.execute("SELECT seq FROM events ORDER BY seq")]
        assert seqs == list(range(1, 201))


async def test_wal_stays_bounded_under_steady_writes(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore(path, checkpoint_every=8, wal_reset_pages=64) as store:
        for n in range(600):
            ref = TaskRef("kling", f"w{n}")
            await store.apply([ref], creating(ref))
        wal_size = await asyncio.to_thread(os.path.getsize, f"{path}-wal")
        # Unchecked, 600 commits of a task and an event leave well over 1,000 pages.
        assert wal_size < 400 * 4096, wal_size
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM events").fetchone() == (600,)


async def test_times_and_event_bodies_move_to_their_new_form(tmp_path: Path) -> None:
    """0004: stored times get a fixed six-digit fraction (metadata is left alone) and events
    are stored without their seq, which reads put back."""
    path = tmp_path / "db.sqlite"
    ref = TaskRef("kling", "t1")
    user_time = "2026-01-01T00:00:00.000Z"

    def created(task: Task | None) -> Change:
        made = new_task(
            ref, "text2video", NOW + timedelta(microseconds=416_000), 60, Source.REGISTER
        )
        made = made.replace(metadata={"at": user_time}, next_poll_at=NOW + timedelta(seconds=5))
        return Change(made, EventType.REGISTERED, None)

    async with SQLiteStore(path) as store:
        await store.apply([ref], created)
    with sqlite3.connect(path) as db:  # as the code before 0004 wrote them
        for table, column in (("tasks", "data"), ("events", "body")):
            (text,) = db.execute(f"SELECT {column} FROM {table}").fetchone()
            old = text.replace(".416000Z", ".416Z").replace(".000000Z", ".000Z")
            if table == "events":
                old = '{"seq":1,' + old[1:]
            db.execute(f"UPDATE {table} SET {column} = ?", (old,))
        db.execute("DROP TABLE store_state")
        db.execute("DROP INDEX tasks_due")  # as 0001 made it
        db.execute("CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE next_poll_at IS NOT NULL")
        db.execute("DELETE FROM schema_migrations WHERE number >= 4")

    async with SQLiteStore(path) as store:
        task = await store.get_task(ref)
        assert task is not None and task.created_at == NOW + timedelta(microseconds=416_000)
        assert task.metadata == {"at": user_time}
        [event] = await store.events_after(0, 10)
        body = json.loads(event.body)
        assert event.seq == body["seq"] == 1 and event.body.count('"seq"') == 1
        assert body["at"] == body["task"]["created_at"] == "2026-01-01T00:00:00.416000Z"
        assert body["task"]["next_poll_at"] == "2026-01-01T00:00:05.000000Z"
    with sqlite3.connect(path) as db:
        (data,) = db.execute("SELECT data FROM tasks").fetchone()
        assert '"deadline_at":"2026-01-01T00:01:00.416000Z"' in data
        assert f'"metadata":{{"at":"{user_time}"}}' in data


async def test_a_leased_task_written_by_another_process_is_read_again(tmp_path: Path) -> None:
    """The writer knows a leased task without reading its row again only while nothing but
    itself has written: a commit by another connection (`reconciler replay` runs as its own
    process) is what the rule decides on."""
    path = tmp_path / "db.sqlite"
    ref = TaskRef("acedata", "leased")
    seen: list[Task] = []

    def record(task: Task | None) -> Change | None:
        assert task is not None
        seen.append(task)
        return None

    async with SQLiteStore(path) as store:
        await store.apply([ref], creating(ref))
        [leased] = await store.lease_due(NOW + timedelta(seconds=60), 10, 30)
        other = sqlite3.connect(path)
        with other:
            other.execute(
                "UPDATE tasks SET data = json_set(data, '$.progress', 40) WHERE task_id = ?",
                (ref.task_id,),
            )
        other.close()
        await store.apply([ref], record)
        # Left alone, a leased task reads back as leased, with the lease's poll time.
        [again] = await store.lease_due(NOW + timedelta(seconds=90), 10, 30)
        await store.apply([ref], record)
    assert leased.progress is None and seen[0].progress == 40
    assert seen[0].next_poll_at == NOW + timedelta(seconds=90)  # the lease's column
    assert seen[1] == again.replace(next_poll_at=NOW + timedelta(seconds=120))

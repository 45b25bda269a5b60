"""`reconciler copy` (SPEC §4 "Moving up"): a SQLite database written by the real service
is copied into PostgreSQL, and a store on the copy reads and writes as the original would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from reconciler.clock import FakeClock
from reconciler.config import Settings
from reconciler.errors import StoreError
from reconciler.model import Change, EventType, Outcome, Source, Status, Task, TaskRef
from reconciler.runtime import open_runtime
from reconciler.state import new_task
from reconciler.store import Store
from reconciler.store.base import Accepted, NewDelivery
from reconciler.store.postgres import PostgresStore
from reconciler.store.rows import Chunk
from reconciler.store.sqlite import SQLiteStore
from reconciler.store.transfer import copy
from tests import postgres

START = datetime(2026, 3, 1, 9, 30, 0, 123_457, tzinfo=UTC)
CHUNK_ROWS = 16  # small, so that every table spans several chunks
HEADERS = {"content-type": "application/json", "user-agent": "kling-callback/1.0"}
ODD = {"nul": "a\u0000b", "emoji": "\U0001f3ac", "quote": '"}', "accent": "\u00e9t\u00e9"}
TASKS = 40


def kling(task_id: str, status: str, updated_ms: int) -> bytes:
    body: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": "Failure to pass the risk control system" if status == "failed" else "",
        "created_at": 1_772_357_400_000,
        "updated_at": updated_ms,
        "task_info": {},
    }
    if status == "succeed":
        body["task_result"] = {
            "videos": [{"id": f"v-{task_id}", "url": f"https://cdn.example/{task_id}.mp4"}]
        }
    return json.dumps(body).encode()


async def seed(path: Path) -> None:
    """Tasks in every state, by registration and by webhook alone, with duplicate and
    rejected deliveries, leased tasks (their poll time moved in the column only) and more
    events than fit in a chunk; written by the real service."""
    clock = FakeClock(START)
    settings = Settings.from_environ({"RECONCILER_DATABASE_URL": f"sqlite:///{path}"})
    async with open_runtime(settings, clock) as runtime:
        service = runtime.service
        for n in range(TASKS):
            await service.register("kling", f"t{n}", metadata={"n": n, **ODD})
            clock.advance(0.250_001)
        updated = 1_772_357_500_000
        for n in range(TASKS):
            if n % 4 == 3:
                continue  # stays submitted
            updated += 1000
            await service.ingest("kling", HEADERS, kling(f"t{n}", "processing", updated))
            clock.advance(1.000_003)
        for n in range(TASKS):
            if n % 4 in (0, 1):
                updated += 1000
                word = "succeed" if n % 4 == 0 else "failed"
                await service.ingest("kling", HEADERS, kling(f"t{n}", word, updated))
                clock.advance(0.5)
        # t0's first report again (a duplicate body), and stale reports for t1 and t2.
        for n in (0, 1, 2):
            await service.ingest("kling", HEADERS, kling(f"t{n}", "processing", 1_772_357_501_000))
        await service.ingest("kling", HEADERS, kling("w1", "processing", updated + 1))  # unknown
        await service.ingest("kling", HEADERS, b"\x00{not json")
        await service.ingest("kling", HEADERS, json.dumps({"task_status": "succeed"}).encode())
        clock.advance(3600)
        leased = await service.lease_due(5, 120)
        assert len(leased) == 5


def counts(path: Path) -> tuple[int, int, int]:
    db = sqlite3.connect(path)
    try:
        [row] = db.execute(
            "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM deliveries), "
            "(SELECT count(*) FROM events)"
        ).fetchall()
    finally:
        db.close()
    return row[0], row[1], row[2]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seeded database for the module; each test copies the file, never writes it."""
    path = tmp_path_factory.mktemp("source") / "source.db"
    asyncio.run(seed(path))
    return path


@pytest.fixture
def source(seeded: Path, tmp_path: Path) -> Path:
    path = tmp_path / "source.db"
    with sqlite3.connect(seeded) as original, sqlite3.connect(path) as mine:
        original.backup(mine)
    return path


async def pages(store: Store, **where: str) -> list[Any]:
    """The whole log as a reader pages through it."""
    seen, after = [], 0
    while page := await store.events_after(after, 7, **where):
        seen.extend(page)
        after = page[-1].seq
    return seen


async def assert_same(original: Store, copied: Store) -> None:
    listed = await original.list_tasks(limit=1000)
    assert len(listed) == TASKS + 1
    assert await copied.list_tasks(limit=1000) == listed
    for task in listed:
        assert await copied.get_task(TaskRef(task.provider, task.task_id)) == task
    for status in Status:
        by_status = await original.list_tasks(status=status.value, limit=1000)
        assert await copied.list_tasks(status=status.value, limit=1000) == by_status
    middle = listed[TASKS // 2]
    position = (middle.created_at, middle.provider, middle.task_id)
    assert await copied.list_tasks(before=position) == await original.list_tasks(before=position)
    assert await pages(copied) == await pages(original)
    assert await pages(copied, provider="kling", task_id="t4") == await pages(
        original, provider="kling", task_id="t4"
    )
    assert await copied.deliveries() == await original.deliveries()
    rejected = await original.deliveries(rejected_only=True)
    assert len(rejected) == 2 and await copied.deliveries(rejected_only=True) == rejected
    assert set(await copied.settled_counts()) == set(await original.settled_counts())
    assert await copied.next_due_at() == await original.next_due_at()
    assert await copied.last_seq() == await original.last_seq()


async def stored_rows(url: str) -> dict[str, list[Any]]:
    conn = await asyncpg.connect(url)
    try:
        return {
            "tasks": [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT provider, task_id, status, source, external_task_id, created_at, "
                    "updated_at, next_poll_at, version, data FROM tasks ORDER BY provider, task_id"
                )
            ],
            "deliveries": [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT id, provider, received_at, headers, body, sha256, outcome, error, "
                    "task_id FROM deliveries ORDER BY id"
                )
            ],
            "events": [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT seq, provider, task_id, type, at, body FROM events ORDER BY seq"
                )
            ],
            "head": [await conn.fetchval("SELECT last_seq FROM log_head")],
        }
    finally:
        await conn.close()


def sqlite_rows(path: Path) -> dict[str, list[Any]]:
    def at(seconds: float | None) -> datetime | None:
        return None if seconds is None else datetime.fromtimestamp(seconds, UTC)

    db = sqlite3.connect(path)
    try:
        tasks = [
            (*row[:5], at(row[5]), at(row[6]), at(row[7]), *row[8:])
            for row in db.execute(
                "SELECT provider, task_id, status, source, external_task_id, created_at, "
                "updated_at, next_poll_at, version, data FROM tasks ORDER BY provider, task_id"
            )
        ]
        deliveries = [
            (*row[:2], at(row[2]), row[3], bytes(row[4]), *row[5:])
            for row in db.execute(
                "SELECT id, provider, received_at, headers, body, sha256, outcome, error, "
                "task_id FROM deliveries ORDER BY id"
            )
        ]
        events = [
            (*row[:4], at(row[4]), row[5])
            for row in db.execute(
                "SELECT seq, provider, task_id, type, at, body FROM events ORDER BY seq"
            )
        ]
    finally:
        db.close()
    return {"tasks": tasks, "deliveries": deliveries, "events": events}


async def test_a_copy_reads_as_the_original_and_writes_after_it(
    source: Path, postgres_url: str
) -> None:
    tasks, deliveries, events = counts(source)
    assert events > 4 * CHUNK_ROWS and deliveries > 2 * CHUNK_ROWS and tasks > 2 * CHUNK_ROWS
    copied = await copy(source, postgres_url, chunk_rows=CHUNK_ROWS)
    assert (copied.tasks, copied.deliveries, copied.events) == (tasks, deliveries, events)
    assert copied.last_seq == events  # the SQLite log starts at 1 and has no gap

    # Every column as stored: the JSON and the bodies byte for byte, times to the microsecond.
    raw = await stored_rows(postgres_url)
    assert raw.pop("head") == [copied.last_seq]
    assert raw == sqlite_rows(source)

    async with SQLiteStore(source) as original, PostgresStore(postgres_url) as target:
        await assert_same(original, target)
        last_delivery = (await original.deliveries())[-1].id

    # A service on the copy goes on after what was copied: the next seq and delivery id,
    # and a body delivered before the copy is still known as a duplicate.
    clock = FakeClock(START + timedelta(hours=2))
    settings = Settings.from_environ({"RECONCILER_DATABASE_URL": postgres_url})
    async with open_runtime(settings, clock) as runtime:
        service = runtime.service
        fresh = await service.ingest("kling", HEADERS, kling("t3", "processing", 1_772_400_000_000))
        assert fresh.outcome is Outcome.APPLIED and fresh.delivery_id == last_delivery + 1
        [event] = await service.store.events_after(copied.last_seq, 10)
        assert event.seq == copied.last_seq + 1 and event.task_id == "t3"
        assert json.loads(event.body)["seq"] == event.seq
        again = await service.ingest("kling", HEADERS, kling("t0", "processing", 1_772_357_501_000))
        assert again.duplicate and again.delivery_id == last_delivery + 2


async def test_a_target_that_is_not_empty_is_refused_and_left_as_it_was(
    source: Path, postgres_url: str
) -> None:
    first = await copy(source, postgres_url, chunk_rows=CHUNK_ROWS)
    before = await stored_rows(postgres_url)
    with pytest.raises(StoreError, match="is not empty") as refused:
        await copy(source, postgres_url)
    assert "nothing was copied" in str(refused.value)
    assert await stored_rows(postgres_url) == before
    assert before["head"] == [first.last_seq]


@pytest.mark.parametrize(
    "row",
    [
        "INSERT INTO tasks VALUES ('kling', 'x', 'submitted', 'register', NULL, now(), now(), "
        "NULL, 1, '{}')",
        "INSERT INTO deliveries (provider, received_at, headers, body, sha256, outcome) "
        "VALUES ('kling', now(), '{}', '', 'e3b0', 'rejected')",
        "INSERT INTO events VALUES (1, 'kling', 'x', 'task.registered', now(), '{}')",
        # Its events pruned, a log that has begun still counts: the copy would move it back.
        "UPDATE log_head SET last_seq = 7",
    ],
    ids=["task", "delivery", "event", "log"],
)
async def test_any_row_makes_the_target_not_empty(
    source: Path, postgres_url: str, row: str
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(row)
    finally:
        await conn.close()
    before = await stored_rows(postgres_url)
    with pytest.raises(StoreError, match="is not empty"):
        await copy(source, postgres_url)
    assert await stored_rows(postgres_url) == before


async def test_a_row_refused_mid_copy_leaves_the_target_empty(
    source: Path, postgres_url: str
) -> None:
    """Tasks, deliveries and several chunks of events are written before PostgreSQL refuses
    the last event (text cannot hold NUL): all of it is rolled back."""
    db = sqlite3.connect(source)
    with db:
        db.execute(
            "INSERT INTO events (seq, provider, task_id, type, at, body) "
            "SELECT max(seq) + 1, 'kling', 't0', ?, 0, '{}' FROM events",
            ("bad\x00type",),
        )
    db.close()
    with pytest.raises(StoreError, match="copy failed"):
        await copy(source, postgres_url, chunk_rows=CHUNK_ROWS)
    await assert_empty(postgres_url)


async def test_a_source_that_fails_mid_copy_leaves_the_target_empty(
    source: Path, postgres_url: str
) -> None:
    async def failing(exported: AsyncGenerator[Chunk, None]) -> AsyncIterator[Chunk]:
        async with contextlib.aclosing(exported):
            async for chunk in exported:
                yield chunk
                if chunk.events:
                    raise StoreError("reading the SQLite database failed: disk I/O error")

    async with SQLiteStore(source) as original, PostgresStore(postgres_url) as target:
        with pytest.raises(StoreError, match="disk I/O error"):
            await target.import_rows(failing(original.export(CHUNK_ROWS, 1 << 20)))
    await assert_empty(postgres_url)


async def assert_empty(url: str) -> None:
    assert await stored_rows(url) == {"tasks": [], "deliveries": [], "events": [], "head": [0]}
    async with PostgresStore(url) as target:
        assert await target.is_empty()
        # The delivery ids were not moved either: the first write takes id 1.
        ref = TaskRef("kling", "after")
        result = await target.ingest(
            NewDelivery("kling", START, {}, b"{}", "44136fa3"),
            lambda _: Accepted([ref], lambda task: None),
        )
        assert result.delivery_id == 1


async def test_chunks_are_bounded_by_bytes_as_well_as_rows(source: Path) -> None:
    async with SQLiteStore(source) as original:
        chunks = [chunk async for chunk in original.export(1000, 4096)]
    events = [chunk.events for chunk in chunks if chunk.events]
    assert len(events) > 1
    assert all(sum(len(e.body) for e in chunk[:-1]) < 4096 for chunk in events)
    seqs = [e.seq for chunk in events for e in chunk]
    assert seqs == list(range(1, counts(source)[2] + 1))


async def test_an_export_reads_one_snapshot(source: Path) -> None:
    """Writes committed while an export is being read are in none of it, whichever table
    they touch and however far the export has got."""
    tasks, deliveries, events = counts(source)
    ref = TaskRef("kling", "later")

    def create(task: Task | None) -> Change:
        made = new_task(ref, "text2video", START, 3600, Source.REGISTER).replace(version=1)
        return Change(made, EventType.REGISTERED, None)

    async with SQLiteStore(source) as original:
        async with contextlib.aclosing(original.export(CHUNK_ROWS, 1 << 20)) as chunks:
            exported = [await anext(chunks)]
            assert exported[0].tasks
            await original.apply([ref], create)
            await original.ingest(
                NewDelivery("kling", START, {}, b"{}", "later"),
                lambda _: Accepted([TaskRef("kling", "t3")], lambda task: None),
            )
            exported += [chunk async for chunk in chunks]
    assert counts(source) == (tasks + 1, deliveries + 1, events + 1)
    assert sum(len(chunk.tasks) for chunk in exported) == tasks
    assert sum(len(chunk.deliveries) for chunk in exported) == deliveries
    assert [e.seq for chunk in exported for e in chunk.events] == list(range(1, events + 1))


# --- the command, as a user runs it -------------------------------------------------------

TIMEOUT = 60


def run_copy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "PORT"))}
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "copy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**clean, **env},
    )


@pytest.fixture
async def bare_url(postgres_server: postgres.Server) -> AsyncIterator[str]:
    """A database never migrated: the copy migrates it first."""
    name = f"{postgres_server.template}_bare"
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = postgres.database_url(postgres_server.url, name)
    yield url
    await postgres_server.drop(url)


def with_password(url: str, password: str) -> str:
    # The test server trusts loopback: a password in the URL is accepted and never checked.
    return url.replace("://postgres@", f"://postgres:{password}@")


async def test_the_command_copies_once_then_refuses(
    source: Path, bare_url: str, tmp_path: Path
) -> None:
    secret = "s3cret-pw"
    target = with_password(bare_url, secret)
    assert secret in target
    env_file = tmp_path / "conf.env"
    env_file.write_text(f"RECONCILER_DATABASE_URL=sqlite:///{source}\n")
    tasks, deliveries, events = counts(source)
    redacted = target.replace(secret, "***")

    done = await asyncio.to_thread(run_copy, "--to", target, "--env-file", str(env_file), env={})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"copied {tasks} tasks, {deliveries} deliveries and {events} events "
        f"(last seq {events}) into {redacted}"
    ]
    async with PostgresStore(bare_url) as copied:
        assert await copied.last_seq() == events
        assert len(await copied.list_tasks(limit=1000)) == tasks
    before = await stored_rows(bare_url)

    again = await asyncio.to_thread(run_copy, "--to", target, "--env-file", str(env_file), env={})
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.splitlines() == [
        f"reconciler: the target database {redacted} is not empty: copy writes only into a "
        "database that has never held tasks, deliveries or events; nothing was copied."
    ]
    assert await stored_rows(bare_url) == before
    for result in (done, again):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("database_url", "to", "message"),
    [
        (
            "postgresql://app:s3cret-pw@db.example/app",
            "postgresql://postgres@127.0.0.1/copy",
            "reconciler: copy reads a SQLite database, but RECONCILER_DATABASE_URL is "
            "'postgresql://app:***@db.example/app': set it to the sqlite:/// database to copy.",
        ),
        (
            "sqlite:///{source}",
            "mysql://app:s3cret-pw@db.example/app",
            "reconciler: --to has value 'mysql://app:***@db.example/app': "
            "expected postgresql://… or postgres://…",
        ),
        (
            "sqlite:///{missing}",
            "postgresql://postgres@127.0.0.1/copy",
            "reconciler: RECONCILER_DATABASE_URL is 'sqlite:///{missing}', and no database "
            "file is there: nothing to copy.",
        ),
    ],
    ids=["source-not-sqlite", "target-not-postgresql", "no-source-file"],
)
def test_what_cannot_be_copied_is_one_line_and_exit_2(
    tmp_path: Path, database_url: str, to: str, message: str
) -> None:
    existing = tmp_path / "source.db"
    sqlite3.connect(existing).close()
    names = {"source": existing, "missing": tmp_path / "missing.db"}
    result = run_copy("--to", to, env={"RECONCILER_DATABASE_URL": database_url.format_map(names)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message.format_map(names)]
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert not (tmp_path / "missing.db").exists()

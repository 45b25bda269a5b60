"""The `reconciler` command as a user runs it: real subprocesses, real signals."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.serve import TIMEOUT, clean_environ, serve


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**clean_environ(), **(env or {})},
    )


def test_migrate_creates_the_database_then_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.db"
    env = {"RECONCILER_DATABASE_URL": f"sqlite:///{path}"}
    first = run("migrate", env=env)
    assert first.returncode == 0, first.stderr
    schema = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    applied = sqlite3.connect(path).execute("SELECT * FROM schema_migrations").fetchall()
    second = run("migrate", env=env)
    assert second.returncode == 0, second.stderr
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    assert conn.execute("SELECT * FROM schema_migrations").fetchall() == applied


def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run("migrate", env={"RECONCILER_PORT": "eighty"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "reconciler: RECONCILER_PORT has value 'eighty': not an integer."
    ]


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / "conf.env"
    env_file.write_text(
        "# comment\nRECONCILER_PUBLIC_URL=https://r.example.com/\n"
        "RECONCILER_CALLBACK_TOKEN='a b/c'\n"
    )
    result = run("callback-url", "kie", "--env-file", str(env_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "https://r.example.com/callbacks/kie?token=a%20b%2Fc"


def test_callback_url_needs_the_public_url() -> None:
    result = run("callback-url", "kling")
    assert result.returncode == 2
    assert "RECONCILER_PUBLIC_URL" in result.stderr


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    settings = {
        "RECONCILER_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
        "RECONCILER_CALLBACK_TOKEN": "tok-secret-1",
    }
    async with serve(settings) as served:
        yield served


async def test_serve_answers_then_stops_cleanly_on_sigterm(
    server: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, url = server
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
        registered = await client.post("/tasks", json={"provider": "kling", "task_id": "p1"})
        assert registered.status_code == 201
        callback = await client.post(
            "/callbacks/kling?token=tok-secret-1",
            json={"task_id": "p1", "task_status": "processing"},
        )
        assert callback.status_code == 200
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(TIMEOUT):
        code = await process.wait()
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert code == 0, log
    assert "tok-secret-1" not in log
    assert "Traceback" not in log


async def test_track_and_tail_talk_to_the_server(
    server: tuple[asyncio.subprocess.Process, str],
) -> None:
    _, url = server

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", *args, "--url", url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=clean_environ(),
        )

    tracked = await asyncio.to_thread(cli, "track", "acedata", "a-1", "--action", "text2video")
    assert tracked.returncode == 0, tracked.stderr
    assert json.loads(tracked.stdout)["status"] == "submitted"
    tailed = await asyncio.to_thread(cli, "tail")
    assert tailed.returncode == 0, tailed.stderr
    events = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert [(e["type"], e["task_id"]) for e in events] == [("task.registered", "a-1")]


async def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**clean_environ(), "RECONCILER_PORT": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "serve",
        "--demo",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = None
        async with asyncio.timeout(TIMEOUT):
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, "the demo exited before printing its dashboard URL"
                if "dashboard:" in line:
                    url = line.split("dashboard:", 1)[1].strip().rstrip("/")
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/healthz")).status_code == 200
            page = (await client.get("/events", params={"after": 0, "wait": 20})).json()
            assert page["events"], "the demo wrote no event"
            assert (await client.get("/")).status_code == 200
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            code = await process.wait()
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert code == 0, log
        assert "Traceback" not in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tail_follow_reads_the_stream(
    server: tuple[asyncio.subprocess.Process, str],
) -> None:
    _, url = server
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "tail",
        "--follow",
        "--url",
        url,
        env=clean_environ(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            await client.post("/tasks", json={"provider": "kie", "task_id": "f-1"})
            assert tail.stdout is not None
            async with asyncio.timeout(TIMEOUT):
                first = json.loads(await tail.stdout.readline())
            assert (first["seq"], first["task_id"]) == (1, "f-1")
            await client.post(
                "/callbacks/kie?token=tok-secret-1",
                json={"code": 200, "msg": "ok", "data": {"taskId": "f-1", "state": "generating"}},
            )
            async with asyncio.timeout(TIMEOUT):
                second = json.loads(await tail.stdout.readline())
            assert (second["seq"], second["type"]) == (2, "task.processing")
    finally:
        tail.kill()
        await tail.wait()


def test_replay_reports_what_it_re_applied(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "replay.db"
    env = {"RECONCILER_DATABASE_URL": f"sqlite:///{path}"}
    assert run("migrate", env=env).returncode == 0
    bodies = [
        b'{"task_id": "r-1", "task_status": "succeed", "task_result": {"videos": '
        b'[{"url": "https://cdn.example/r.mp4"}]}}',
        b"not json",
    ]
    with sqlite3.connect(path) as db:  # as if an older version had refused both
        for number, body in enumerate(bodies, start=1):
            db.execute(
                "INSERT INTO deliveries (id, provider, received_at, headers, body, sha256, "
                "outcome, error) VALUES (?, 'kling', 0, '{}', ?, ?, 'rejected', 'old bug')",
                (number, body, hashlib.sha256(body).hexdigest()),
            )
    result = run("replay", "--failed", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "delivery 1: applied",
        "delivery 2: rejected (invalid_json: the body is not valid UTF-8 JSON: "
        "Expecting value: line 1 column 1 (char 0))",
    ]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status FROM tasks").fetchall() == [("completed",)]
        assert db.execute("SELECT outcome FROM deliveries ORDER BY id").fetchall() == [
            ("applied",),
            ("rejected",),
        ]


async def test_prune_reports_what_it_would_remove_then_removes_it(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from reconciler.clock import FakeClock
    from reconciler.config import Settings
    from reconciler.runtime import open_runtime

    path = tmp_path / "prune.db"
    env = {"RECONCILER_DATABASE_URL": f"sqlite:///{path}"}
    now = datetime.now(UTC)
    clock = FakeClock(now - timedelta(days=100))
    async with open_runtime(Settings.from_environ(env), clock) as runtime:
        service = runtime.service
        for n in range(3):  # terminal, 100 days old: everything about them goes
            body = {"task_id": f"old-{n}", "task_status": "failed", "task_status_msg": "no"}
            await service.ingest("kling", {}, json.dumps(body).encode())
        await service.register("kling", "open")  # never terminal: the task stays
        clock.set(now - timedelta(hours=1))
        await service.register("kling", "young")

    dry = await asyncio.to_thread(run, "prune", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    expected = ["events: {} 4", "deliveries: {} 3", "tasks: {} 3"]
    assert dry.stdout.splitlines() == [line.format("would remove") for line in expected]
    pruned = await asyncio.to_thread(run, "prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines() == [line.format("removed") for line in expected]
    again = await asyncio.to_thread(run, "prune", env={**env, "RECONCILER_RETAIN_TASKS": "0"})
    assert again.stdout.splitlines() == [
        "events: removed 0",
        "deliveries: removed 0",
        "tasks: removed 0 (kept forever)",
    ]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT seq FROM events").fetchall() == [(5,)]
        assert db.execute("SELECT task_id FROM tasks ORDER BY task_id").fetchall() == [
            ("open",),
            ("young",),
        ]
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)


def test_bad_retention_stops_prune_with_one_line(tmp_path: Path) -> None:
    env = {"RECONCILER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "RECONCILER_RETAIN_TASKS": "9"}
    result = run("prune", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "reconciler: RECONCILER_RETAIN_TASKS has value '9': not a duration (a number and a unit "
        "s, m, h or d, e.g. 30d; 0 keeps forever)."
    ]

"""Crash safety (SPEC §7): `kill -9` of the server under webhook load loses no acknowledged
delivery and duplicates no event after a restart on the same database.

The server is the real process, `python -m reconciler serve --port 0`, on a temporary SQLite
file. 32 concurrent senders post Kling callbacks (the bare task object: `processing`, then
`succeed`, then the same `succeed` body again) and AceData callbacks (the flat body, twice),
one new task id per script. Once 300 deliveries have been answered 200 the server gets
SIGKILL while requests are still in flight. A second server starts on the same file, and the
test checks, through the API and with `sqlite3`:

- every acknowledged delivery id is stored with the exact body that was sent;
- every acknowledged task is there, at least in the state its acknowledgement reported
  (exactly that state when it was terminal);
- event `seq`s are 1..N with no gap, no task has the same event twice, at most one terminal;
- resending every body (acknowledged or not) answers `duplicate: true` for each one that was
  acknowledged, and adds no event to a task whose deliveries were all acknowledged; after it,
  every task is completed with exactly one `task.completed` event.

No sleeps: the test waits on the server's "listening on" line (its socket is bound before
that line is printed) and on its own counters, each under `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "crash-test-callback-token"
SENDERS = 32
TASKS_PER_PROVIDER = 300
KILL_AFTER = 300  # acknowledged deliveries before SIGKILL
LISTENING = re.compile(rb"listening on (http://\S+)")
RANK = {"submitted": 0, "processing": 1, "completed": 2, "failed": 2, "expired": 2}
TERMINAL_EVENTS = {"task.completed", "task.failed", "task.expired"}
VIDEO = "https://cdn.klingai.com/bs2/upload-kling-api/7261/text2video/{}-0_raw_video_1.mp4"


@dataclass(frozen=True)
class Delivery:
    """One body a provider sends; `index` identifies it across the test."""

    index: int
    provider: str
    task_id: str
    body: bytes


@dataclass
class Ack:
    delivery: Delivery
    delivery_id: int
    duplicate: bool
    status: str | None  # the task's status in the answer


@dataclass
class Load:
    """What the senders did before and after the kill."""

    acks: list[Ack] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    cut: int = 0  # senders whose request was in flight, or refused, when the server died
    enough: asyncio.Event = field(default_factory=asyncio.Event)


def kling_body(task_id: str, status: str) -> bytes:
    body: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": "",
        "created_at": 1751048279423,
        "updated_at": 1751048290000 if status == "processing" else 1751048350123,
        "final_unit_deduction": "1",
        "task_info": {"external_task_id": f"order-{task_id}"},
        "task_result": {},
    }
    if status == "succeed":
        body["task_result"] = {
            "videos": [{"id": f"{task_id}01", "url": VIDEO.format(task_id), "duration": "5.1"}]
        }
    return json.dumps(body, separators=(",", ":")).encode()


def acedata_body(task_id: str) -> bytes:
    body = {
        "success": True,
        "video_id": f"v-{task_id}",
        "video_url": VIDEO.format(task_id),
        "duration": "5.1",
        "state": "succeed",
        "task_id": task_id,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def scripts() -> list[list[Delivery]]:
    """Per task, its deliveries in the order the provider sends them (repeats included)."""
    result: list[list[Delivery]] = []
    index = 0

    def make(provider: str, task_id: str, bodies: list[bytes]) -> list[Delivery]:
        nonlocal index
        script = []
        for body in bodies:
            script.append(Delivery(index, provider, task_id, body))
            index += 1
        return script

    for n in range(TASKS_PER_PROVIDER):
        kling_id = f"8422509036{n:08d}"
        done = kling_body(kling_id, "succeed")
        result.append(make("kling", kling_id, [kling_body(kling_id, "processing"), done, done]))
        ace_id = f"20068983-0cc9-4c6a-aeb6-{n:012d}"
        once = acedata_body(ace_id)
        result.append(make("acedata", ace_id, [once, once]))
    return result


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    url: str


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def serve(database: Path, log: Path) -> AsyncIterator[ServerProcess]:
    """`python -m reconciler serve --port 0` on `database`; killed on exit if still alive."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RECONCILER_", "KLING_", "ACEDATA_"))
    }
    env["RECONCILER_DATABASE_URL"] = f"sqlite:///{database}"
    env["RECONCILER_CALLBACK_TOKEN"] = TOKEN
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reconciler",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = await process.stdout.readline()
                if not line:
                    raise AssertionError(f"the server exited early:\n{tail(log)}")
                if match := LISTENING.search(line):
                    break
        yield ServerProcess(process, match.group(1).decode())
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(20):
            await process.wait()
            await process.stdout.read()  # to EOF, so the pipe transport closes


async def send(client: httpx.AsyncClient, delivery: Delivery) -> tuple[int, dict[str, Any]] | None:
    """POST one callback; None when the server is gone (refused, reset, no answer)."""
    try:
        response = await client.post(
            f"/callbacks/{delivery.provider}",
            params={"token": TOKEN},
            content=delivery.body,
            headers={"content-type": "application/json"},
        )
    except httpx.TransportError:
        return None
    return response.status_code, response.json()


async def sender(client: httpx.AsyncClient, work: list[list[Delivery]], load: Load) -> None:
    for script in work:
        for delivery in script:
            answer = await send(client, delivery)
            if answer is None:
                load.cut += 1
                return
            status, body = answer
            if status != 200:
                load.unexpected.append(f"{delivery.provider} {delivery.task_id}: {status} {body}")
                continue
            task = body.get("task") or {}
            load.acks.append(
                Ack(delivery, body["delivery_id"], body["duplicate"], task.get("status"))
            )
            if len(load.acks) >= KILL_AFTER:
                load.enough.set()


async def all_events(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await client.get("/events", params={"after": after, "limit": 1000})
        assert response.status_code == 200, response.text
        page = response.json()
        if not page["events"]:
            return events
        events.extend(page["events"])
        after = page["last_seq"]


def by_task(events: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    types: dict[tuple[str, str], list[str]] = defaultdict(list)
    for event in events:
        types[(event["provider"], event["task_id"])].append(event["type"])
    return types


def check_log(events: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Gapless seqs, no repeated event type within a task, at most one terminal event."""
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(1, len(seqs) + 1)), "event seqs are not 1..N without gaps"
    types = by_task(events)
    for key, kinds in types.items():
        assert len(kinds) == len(set(kinds)), f"{key} has a repeated event: {kinds}"
        assert len(TERMINAL_EVENTS.intersection(kinds)) <= 1, f"{key}: {kinds}"
    return types


def distinct(script: list[Delivery]) -> list[Delivery]:
    """The script without repeated bodies, first occurrences in order."""
    firsts: dict[bytes, Delivery] = {}
    for delivery in script:
        firsts.setdefault(delivery.body, delivery)
    return list(firsts.values())


def stored_deliveries(database: Path) -> dict[int, tuple[str, bytes]]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT id, provider, body FROM deliveries").fetchall()
    return {did: (provider, bytes(body)) for did, provider, body in rows}


def stored_event_counts(database: Path) -> dict[tuple[str, str], int]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT provider, task_id, COUNT(*) FROM events GROUP BY 1, 2")
        return {(provider, task_id): count for provider, task_id, count in rows}


@pytest.mark.timeout(90)
async def test_kill_9_under_load_loses_no_acknowledged_delivery(tmp_path: Path) -> None:
    database = tmp_path / "crash.db"
    log = tmp_path / "server.log"
    work = scripts()
    everything = [delivery for script in work for delivery in script]
    load = Load()
    limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)

    # 1. Load, and SIGKILL once KILL_AFTER deliveries are acknowledged.
    async with serve(database, log) as first:
        async with httpx.AsyncClient(base_url=first.url, timeout=10, limits=limits) as client:
            senders = [
                asyncio.create_task(sender(client, work[i::SENDERS], load)) for i in range(SENDERS)
            ]
            try:
                async with asyncio.timeout(30):
                    await load.enough.wait()
                os.kill(first.process.pid, signal.SIGKILL)
                async with asyncio.timeout(20):
                    await asyncio.gather(*senders)
            finally:
                for task in senders:
                    task.cancel()
                await asyncio.gather(*senders, return_exceptions=True)
        assert await first.process.wait() == -signal.SIGKILL
    assert not load.unexpected, load.unexpected[:5]
    acks = load.acks
    assert len(acks) >= KILL_AFTER
    assert len(acks) < len(everything), "the kill came after the last delivery"
    assert load.cut == SENDERS, "every sender should have lost its request to the kill"
    assert len({ack.delivery_id for ack in acks}) == len(acks), "a delivery id was reused"

    # 2. Restart on the same database.
    async with serve(database, log) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=10, limits=limits) as client:
            # Every acknowledged delivery is stored, byte for byte, under its id.
            stored = stored_deliveries(database)
            for ack in acks:
                assert stored.get(ack.delivery_id) == (ack.delivery.provider, ack.delivery.body), (
                    f"acknowledged delivery {ack.delivery_id} is missing or altered"
                )

            # The log has no gap and no duplicated event.
            events = await all_events(client)
            before = check_log(events)
            assert stored_event_counts(database) == {k: len(v) for k, v in before.items()}

            # Every acknowledged task is in at least its acknowledged state.
            acked_status: dict[tuple[str, str], str] = {}
            for ack in acks:
                key = (ack.delivery.provider, ack.delivery.task_id)
                previous = acked_status.get(key)
                if ack.status and (previous is None or RANK[ack.status] >= RANK[previous]):
                    acked_status[key] = ack.status
            for (provider, task_id), status in acked_status.items():
                response = await client.get(f"/tasks/{provider}/{task_id}")
                assert response.status_code == 200, f"acknowledged task {task_id} is missing"
                task = response.json()
                assert RANK[task["status"]] >= RANK[status], (task_id, task["status"], status)
                if RANK[status] == 2:
                    assert task["status"] == status
                    assert f"task.{status}" in before[(provider, task_id)]

            # 3. Resend every distinct body, each task's in order.
            acked_indices = {ack.delivery.index for ack in acks}
            resend = [distinct(script) for script in work]
            redelivered: dict[int, dict[str, Any]] = {}

            async def resender(part: list[list[Delivery]]) -> None:
                for script in part:
                    for delivery in script:
                        answer = await send(client, delivery)
                        assert answer is not None, "the restarted server stopped answering"
                        status, body = answer
                        assert status == 200, body
                        redelivered[delivery.index] = body

            async with asyncio.timeout(30):
                await asyncio.gather(*(resender(resend[i::SENDERS]) for i in range(SENDERS)))
            by_body = {(d.provider, d.body): d.index for script in resend for d in script}
            for ack in acks:
                index = by_body[(ack.delivery.provider, ack.delivery.body)]
                assert redelivered[index]["duplicate"] is True, f"{ack.delivery} not a duplicate"

            after = check_log(await all_events(client))
            for script in work:
                key = (script[0].provider, script[0].task_id)
                if all(d.index in acked_indices for d in script):
                    assert after[key] == before[key], f"{key} changed on resend"
                assert after[key].count("task.completed") == 1, (key, after[key])
            assert set(after) == {(s[0].provider, s[0].task_id) for s in work}
            assert stored_event_counts(database) == {k: len(v) for k, v in after.items()}

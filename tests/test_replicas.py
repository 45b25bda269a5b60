"""Several replicas on one PostgreSQL database behave as one Reconciler (SPEC §4), as
processes: three `python -m reconciler serve` on one database and the simulator as its own
process (`python -m reconciler.simulator`, real time, a third of its callbacks dropped).

Each task's callbacks go to one replica and its registration to another (round-robin), so
registrations race first callbacks across processes; a standby replica is asked to poll a
task now, which the leader does. Once the tasks are under way, the
replica that runs the reconciler loop is killed with SIGKILL: another takes the loop over,
and the tasks whose callbacks were dropped, or addressed to the dead replica, are settled by
its polls. Then, read through a surviving replica: every task is in its true state, the log
is one log (seqs 1..N without a gap), and each task has one registration and one terminal
event.

No sleeps: the test waits on the processes' own lines (listening, leading) and on the
product's long-polls (`GET /tasks/…?wait=`, `GET /events?wait=`), each under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (http://\S+)")
LEADING = "this process runs the reconciler loop"
PROVIDERS = ("kling", "cometapi", "gateway", "acedata", "kie")
TASKS = 45
TIMEOUT = 60


@dataclass
class Process:
    """A child process whose output lines are read as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None

        async def pump() -> None:
            while line := await stream.readline():
                self.lines.append(line.decode(errors="replace"))
                self.changed.set()

        self.readers.append(asyncio.create_task(pump()))

    async def line(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """The first line (so far or to come) that matches `pattern`."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        async with asyncio.timeout(TIMEOUT):
            while True:
                self.changed.clear()
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                if self.process.returncode is not None:
                    raise AssertionError("exited early:\n" + "".join(self.lines[-40:]))
                await self.changed.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await self.process.wait()
            await asyncio.gather(*self.readers)


@contextlib.asynccontextmanager
async def started(*argv: str, env: dict[str, str]) -> AsyncIterator[Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    child = Process(process)
    child.read(process.stdout)
    child.read(process.stderr)
    try:
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            if process.returncode is None:
                process.kill()
        await child.stop()


def clean_environ() -> dict[str, str]:
    prefixes = ("RECONCILER_", "PORT", *(name.upper() + "_" for name in PROVIDERS))
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}


async def test_three_replicas_one_killed_every_task_right_one_log(postgres_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            started(
                "-m",
                "reconciler.simulator",
                "--seed",
                "11",
                "--processing-after",
                "1",
                "--finish-after",
                "4",
                "--faults",
                '{"drop": 0.33}',
                env=clean_environ(),
            )
        )
        hello = json.loads((await sim.line(r"^\{.*\"url\"")).string)
        env = {
            **clean_environ(),
            **hello["environ"],
            "RECONCILER_DATABASE_URL": postgres_url,
            "RECONCILER_FIRST_POLL_AFTER": "3",
            "RECONCILER_POLL_INTERVAL_MAX": "2",
            "RECONCILER_RATE_LIMIT": "50",
            "RECONCILER_CONCURRENCY": "8",
        }
        replicas = [
            await stack.enter_async_context(
                started("-m", "reconciler", "serve", "--host", "127.0.0.1", "--port", "0", env=env)
            )
            for _ in range(3)
        ]
        urls = [(await replica.line(LISTENING)).group(1) for replica in replicas]
        leader = await _first_to_lead(replicas)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=TIMEOUT + 10))

        states = [(await client.get(f"{url}/readyz")).json()["loop"] for url in urls]
        assert Counter(states) == {"leading": 1, "standby": 2}, states
        assert states[replicas.index(leader)] == "leading"

        # Tasks at the simulator, each with its callbacks to one replica and its registration
        # sent to the next one; all of them at once.
        specs = [
            {
                "provider": PROVIDERS[n % len(PROVIDERS)],
                "callback_url": f"{urls[n % 3]}/callbacks/{PROVIDERS[n % len(PROVIDERS)]}",
                "outcome": "failed" if n % 4 == 3 else "completed",
            }
            for n in range(TASKS)
        ]
        created = (await client.post(f"{hello['url']}/_sim/tasks", json=specs)).json()
        registrations = await asyncio.gather(
            *(
                client.post(
                    f"{urls[(n + 1) % 3]}/tasks",
                    json={
                        "provider": task["provider"],
                        "task_id": task["task_id"],
                        "action": task["action"],
                    },
                )
                for n, task in enumerate(created)
            )
        )
        assert {response.status_code for response in registrations} <= {200, 201}

        # "Poll now" on a replica that does not run the loop: the leader polls it, within
        # the provider's limits, and the answer waits for that poll.
        standby = urls[states.index("standby")]
        first = created[0]
        polled = await client.post(f"{standby}/tasks/{first['provider']}/{first['task_id']}/poll")
        assert polled.status_code == 200 and polled.json()["polls"] >= 1, polled.text

        # Kill the leader while the tasks are under way: some callbacks are in, most not.
        survivor = urls[(replicas.index(leader) + 1) % 3]
        await client.get(f"{survivor}/events", params={"after": TASKS, "wait": 30})
        leader.process.kill()
        await leader.process.wait()
        living = [replica for replica in replicas if replica is not leader]
        await _first_to_lead(living)

        settled = await asyncio.gather(
            *(
                client.get(
                    f"{survivor}/tasks/{task['provider']}/{task['task_id']}",
                    params={"wait": TIMEOUT},
                )
                for task in created
            )
        )
        truths = await asyncio.gather(
            *(
                client.get(f"{hello['url']}/_sim/tasks/{task['provider']}/{task['task_id']}")
                for task in created
            )
        )
        for answer, truth in zip(settled, truths, strict=True):
            task, real = answer.json(), truth.json()
            assert task["status"] == real["status"], (task, real)
            if task["status"] == "completed":
                assert task["videos"] and task["videos"][0]["url"] == real["video_url"]

        events = await _whole_log(client, survivor)
        assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
        by_task: dict[tuple[str, str], list[str]] = {}
        for event in events:
            by_task.setdefault((event["provider"], event["task_id"]), []).append(event["type"])
        assert len(by_task) == TASKS
        for key, types in by_task.items():
            assert types.count("task.registered") == 1, (key, types)
            terminal = [t for t in types if t in ("task.completed", "task.failed")]
            assert len(terminal) == 1 and types[-1] == terminal[0], (key, types)
        polled = [e for e in events if e["source"] == "poll" and e["status"] != "processing"]
        assert polled, "no task was settled by a poll"

        # SIGTERM: each survivor drains its writers, hands its leases back and exits cleanly.
        for replica in living:
            await replica.stop()
            assert replica.process.returncode == 0, "".join(replica.lines[-40:])


async def _first_to_lead(replicas: list[Process]) -> Process:
    waits = {asyncio.create_task(replica.line(LEADING)): replica for replica in replicas}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    first = done.pop()
    first.result()
    return waits[first]


async def _whole_log(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = (await client.get(f"{url}/events", params={"after": after, "limit": 1000})).json()
        if not page["events"]:
            return events
        events.extend(page["events"])
        after = page["last_seq"]

"""Poll capacity: how many polls a second the reconciler loop settles on one core, and the
CPU each one costs, when a backlog of AceData tasks is due at once.

`bench/burst.py` asks whether polls stay on time under one load shape, and takes minutes;
this asks what one poll costs, in about a minute, so that a change to the poll path can be
measured back to back with the code before it (run both, alternate, compare).

How it runs. The simulator (`python -m reconciler.simulator`, every task `processing` for
good, no callbacks) on CPU 1 with this process; the service (`python -m reconciler serve`) on
CPU 0, on a fresh SQLite database, AceData at 200 requests/s, 8 connections, batches of 50.
N tasks are created at the simulator and registered with the service (first poll an hour
away), then the service is stopped, every task is made due at once in the database file,
and the service started again: it polls them all. Twice:

1. first polls: each answer changes the task (`submitted` -> `processing`, an event);
2. polls that change nothing (each task made due again, the same answer).

For each phase it reports, from the simulator's request log, the time from the first
provider request to the one that asked about the last task (polls per second), and the
service's CPU seconds meanwhile (CPU per poll), with its main and writer threads apart.

    python bench/capacity.py                  # 30,000 tasks
    python bench/capacity.py --tasks 10000
    python bench/capacity.py --profile out    # py-spy speedscope files out.first.json, ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import burst
import reconcile

PHASES = ("first polls", "polls that change nothing")
DUE_IN_SECONDS = 2.0  # after the restart: the loop is up before the backlog falls due


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


async def run(tasks: int, profile: str | None, workdir: Path, phase_seconds: float) -> None:
    env = reconcile.clean_environ()
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    sim = await reconcile.start_child(
        "simulator", burst.simulator_argv(pin), env, workdir / "simulator.log"
    )
    hello = json.loads(sim.first_line)
    database = workdir / "reconciler.db"
    service_env = {
        **env,
        **hello["environ"],
        "RECONCILER_DATABASE_URL": f"sqlite:///{database}",
        "ACEDATA_FIRST_POLL_AFTER": "3600",
        "ACEDATA_RATE_LIMIT": "200",
        "ACEDATA_CONCURRENCY": "8",
    }
    argv = burst.pinned(
        burst.SERVICE_CPU,
        [sys.executable, "-m", "reconciler", "serve", "--host", "127.0.0.1", "--port", "0"],
        pin,
    )
    control = reconcile.Pool(hello["url"], 4)
    try:
        service = await reconcile.start_child("service", argv, service_env, workdir / "svc.log")
        api = reconcile.Pool(service.first_line.rsplit(" ", 1)[-1], 32)
        task_ids: list[str] = []
        for start in range(0, tasks, 1000):
            count = min(1000, tasks - start)
            status, made = await control.request(
                "POST", "/_sim/tasks", [{"provider": "acedata"}] * count
            )
            assert status == 201, made
            task_ids.extend(task["task_id"] for task in made)
        queue = list(task_ids)

        async def register() -> None:
            while queue:
                body = {"provider": "acedata", "task_id": queue.pop()}
                status, answer = await api.request("POST", "/tasks", body)
                assert status == 201, answer

        await asyncio.gather(*(register() for _ in range(32)))
        await api.close()
        await service.stop()

        after = 0
        print(f"{tasks} AceData tasks due at once; service on CPU 0, SQLite", flush=True)
        for phase in PHASES:
            with sqlite3.connect(database) as db:
                db.execute(
                    "UPDATE tasks SET next_poll_at = ? WHERE next_poll_at IS NOT NULL",
                    (time.time() + DUE_IN_SECONDS,),
                )
            service = await reconcile.start_child("service", argv, service_env, workdir / "svc.log")
            profiler = None
            if profile:
                profiler = await asyncio.create_subprocess_exec(
                    *("py-spy", "record", "--pid", str(service.pid), "--rate", "100"),
                    *("--nonblocking", "--format", "speedscope"),
                    *("--output", f"{profile}.{phase.split()[0]}.json"),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            asked: set[str] = set()
            first = last = 0.0
            cpu_at_first: dict[str, float] = {}
            deadline = time.monotonic() + phase_seconds
            while len(asked) < tasks and time.monotonic() < deadline:
                status, page = await control.request(
                    "GET", f"/_sim/requests?after={after}&limit=5000"
                )
                assert status == 200, page
                for recorded in page["requests"]:
                    at = datetime.fromisoformat(recorded["at"]).timestamp()
                    for task_id in recorded["task_ids"]:
                        if task_id not in asked:
                            asked.add(task_id)
                            first, last = first or at, at
                after = page["next"]
                if asked and not cpu_at_first:
                    cpu_at_first = thread_seconds(service.pid)
                if len(page["requests"]) < 5000:
                    await asyncio.sleep(0.2)  # the log is read up to its end: look again soon
            cpu_at_end = thread_seconds(service.pid)
            if profiler is not None:
                profiler.send_signal(2)
                await profiler.wait()
            await service.stop()
            spent = sorted(
                (cpu_at_end[tid] - cpu_at_first.get(tid, 0.0) for tid in cpu_at_end), reverse=True
            )
            cpu = sum(spent)
            span = last - first
            print(
                f"{phase}: {len(asked)} tasks in {span:.2f} s = {len(asked) / span:,.0f} polls/s; "
                f"service CPU {cpu:.1f} s ({' + '.join(f'{s:.1f}' for s in spent if s >= 0.05)} "
                f"by thread) = {1e6 * cpu / len(asked):.0f} µs per poll",
                flush=True,
            )
            if len(asked) < tasks:
                print(f"  only {len(asked)} of {tasks} polled within {phase_seconds:g} s")
    finally:
        await control.close()
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--profile", help="py-spy speedscope files PREFIX.first.json, ...")
    ns = parser.parse_args(argv)
    print(reconcile.machine_description(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        asyncio.run(asyncio.wait_for(run(ns.tasks, ns.profile, Path(tmp), ns.timeout), 900))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Burst benchmark: N tasks registered as fast as the API takes them, all due together.

The shape that `bench/reconcile.py`'s paced runs never show (issue: 100,000 AceData tasks
registered at ~6,800/s fall due within ~15 s, so ~6,800 polls are due each second): the
reconciler loop must keep every poll on schedule (SPEC §7: lag under 1 s) while a provider
that allows it takes them in batches.

How it runs. Three processes, each bounded in time:

* the simulator, `python -m reconciler.simulator` with `--finish-after` far beyond the run:
  every task stays `processing` at the provider, and none has a callback URL, so nothing but
  the loop's polls ever touches the tasks after their registration;
* the service, `python -m reconciler serve`, pinned to CPU 0 (`taskset`), on a fresh SQLite
  database (or `--database postgresql` on a fresh PostgreSQL one), with
  `ACEDATA_FIRST_POLL_AFTER` (75 s), `ACEDATA_RATE_LIMIT` (200/s) and
  `ACEDATA_CONCURRENCY` (8); AceData's `retrieve_batch` takes 50 ids a request;
* this process and the simulator on CPU 1: it creates the tasks at the simulator, then
  registers every one with the service (`POST /tasks`) over `--connections` keep-alive
  connections, as fast as the service answers.

What it reports, from the simulator's own request log (`GET /_sim/requests`) and the
service's tasks (`GET /tasks`): for each task, its **poll lag**, the time of the first
provider request that asked about it minus its due time (`created_at` + first-poll delay,
both from the one system clock); p50, p99, max, and the share polled within 1 s and 15 s
of their due time. Also the service's peak memory (`VmHWM`), its CPU seconds, the provider
requests per task in the first wave, and the registration rate.

    python bench/burst.py                      # 100,000 tasks
    python bench/burst.py --tasks 20000        # fewer
    python bench/burst.py --database postgresql

The run ends when every task has had its first poll, or at `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reconcile

SERVICE_CPU = "0"
OTHER_CPU = "1"
POSTGRES_URL = os.environ.get(
    "RECONCILER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@dataclass
class Options:
    tasks: int = 100_000
    first_poll_after: float = 75.0
    rate_limit: float = 200.0
    concurrency: int = 8
    connections: int = 64
    database: str = "sqlite"
    timeout: float = 600.0
    pin: bool = True
    profile: str | None = None  # py-spy's speedscope file of the service over the wave
    json_path: str | None = None  # each task's due and first poll time, each request's size


def pinned(cpu: str, argv: Sequence[str], pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if pin else list(argv)


async def admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def simulator_argv(pin: bool) -> list[str]:
    """The simulator on the other CPU: every task `processing` for good, no callbacks."""
    return pinned(
        OTHER_CPU,
        [
            sys.executable,
            "-m",
            "reconciler.simulator",
            "--no-callback-bodies",
            "--processing-after",
            "0",
            "--finish-after",
            "1000000",
        ],
        pin,
    )


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def run(o: Options, workdir: Path) -> int:
    env = reconcile.clean_environ()
    sim = await reconcile.start_child(
        "simulator", simulator_argv(o.pin), env, workdir / "simulator.log"
    )
    hello = json.loads(sim.first_line)
    database = f"bench_burst_{os.getpid()}"
    if o.database == "postgresql":
        await admin(f'CREATE DATABASE "{database}"')
        url = urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{database}"))
    else:
        url = f"sqlite:///{workdir / 'reconciler.db'}"
    service_env = {
        **env,
        **hello["environ"],
        "RECONCILER_DATABASE_URL": url,
        "ACEDATA_FIRST_POLL_AFTER": str(o.first_poll_after),
        "ACEDATA_RATE_LIMIT": str(o.rate_limit),
        "ACEDATA_CONCURRENCY": str(o.concurrency),
    }
    argv = [sys.executable, "-m", "reconciler", "serve", "--host", "127.0.0.1", "--port", "0"]
    service = await reconcile.start_child(
        "service", pinned(SERVICE_CPU, argv, o.pin), service_env, workdir / "service.log"
    )
    service_url = service.first_line.rsplit(" ", 1)[-1]
    api = reconcile.Pool(service_url, o.connections)
    control = reconcile.Pool(hello["url"], 4)
    try:
        # The tasks at the provider, then their registrations, as fast as each one takes them.
        task_ids: list[str] = []
        for start in range(0, o.tasks, 1000):
            count = min(1000, o.tasks - start)
            status, made = await control.request(
                "POST", "/_sim/tasks", [{"provider": "acedata"}] * count
            )
            assert status == 201, made
            task_ids.extend(task["task_id"] for task in made)
        cpu_before = reconcile.cpu_seconds(service.pid)
        started = time.monotonic()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for task_id in task_ids:
            queue.put_nowait(task_id)

        async def register() -> None:
            while not queue.empty():
                task_id = queue.get_nowait()
                status, body = await api.request(
                    "POST", "/tasks", {"provider": "acedata", "task_id": task_id}
                )
                assert status == 201, body

        await asyncio.gather(*(register() for _ in range(o.connections)))
        registered = time.monotonic() - started
        profiler = None
        if o.profile:
            # The first wave: from the first due poll to the last, plus the slack it takes.
            seconds = o.first_poll_after + 15
            profiler = await asyncio.create_subprocess_exec(
                "py-spy",
                "record",
                "--pid",
                str(service.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "50",
                "--nonblocking",
                "--format",
                "speedscope",
                "--output",
                o.profile,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        print(
            f"registered {o.tasks} tasks in {registered:.1f} s "
            f"({o.tasks / registered:.0f}/s); first polls due {o.first_poll_after:g} s after each",
            flush=True,
        )

        # Wait for every task's first poll, reading the simulator's request log as it grows.
        first_asked: dict[str, datetime] = {}
        timeline: list[tuple[float, int]] = []  # each provider request: when, how many tasks
        requests = 0
        after = 0
        deadline = time.monotonic() + o.timeout
        peak_rss = 0
        while len(first_asked) < o.tasks and time.monotonic() < deadline:
            status, page = await control.request("GET", f"/_sim/requests?after={after}&limit=5000")
            assert status == 200, page
            for recorded in page["requests"]:
                requests += 1
                at = datetime.fromisoformat(recorded["at"])
                timeline.append((at.timestamp(), len(recorded["task_ids"])))
                for task_id in recorded["task_ids"]:
                    first_asked.setdefault(task_id, at)
            after = page["next"]
            peak_rss = max(peak_rss, reconcile.proc_status(service.pid).get("VmRSS", 0))
            if len(page["requests"]) < 5000:
                # Caught up with the log: look again later. Reading it costs the simulator,
                # which shares a core with this process, and its answers' latency is part of
                # what is measured.
                await asyncio.sleep(5.0)
        cpu = reconcile.cpu_seconds(service.pid) - cpu_before
        if profiler is not None:
            async with asyncio.timeout(120):
                await profiler.wait()
            print(f"profile of the service (py-spy, speedscope): {o.profile}")
        hwm = reconcile.proc_status(service.pid).get("VmHWM", 0)

        # Each task's due time, from the service's own record of when it was created.
        due: dict[str, datetime] = {}
        cursor = None
        while True:
            target = "/tasks?provider=acedata&limit=1000" + (f"&cursor={cursor}" if cursor else "")
            status, page = await api.request("GET", target)
            assert status == 200, page
            for task in page["tasks"]:
                created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
                due[task["task_id"]] = created
            cursor = page["next_cursor"]
            if cursor is None:
                break
        lags = [
            (first_asked[task_id] - created).total_seconds() - o.first_poll_after
            for task_id, created in due.items()
            if task_id in first_asked
        ]
    finally:
        await api.close()
        await control.close()
        code = await service.stop()
        await sim.stop()
        if o.database == "postgresql":
            await admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    missing = o.tasks - len(lags)
    if o.json_path:
        await asyncio.to_thread(
            Path(o.json_path).write_text,
            json.dumps(
                {
                    "due": {t: c.timestamp() + o.first_poll_after for t, c in due.items()},
                    "first_asked": {t: a.timestamp() for t, a in first_asked.items()},
                    "requests": timeline,
                }
            ),
        )
    pinning = f"service on CPU {SERVICE_CPU}" if o.pin else "no CPU pinning"
    print(
        f"\n{o.tasks} AceData tasks on {o.database}, rate limit {o.rate_limit:g}/s, "
        f"concurrency {o.concurrency}, batches of 50; {pinning}"
    )
    print(
        f"poll lag (first request about a task minus its due time): "
        f"p50 {statistics.median(lags):.2f} s, p99 {percentile(lags, 99):.2f} s, "
        f"max {max(lags):.2f} s, min {min(lags):.2f} s\n"
        f"polled within 1 s of due: {sum(lag <= 1 for lag in lags) / o.tasks:.1%}; "
        f"within 15 s: {sum(lag <= 15 for lag in lags) / o.tasks:.1%}; never: {missing}\n"
        f"provider requests until the last first poll: {requests} "
        f"({requests / o.tasks:.3f} per task)\n"
        f"service: peak RSS {hwm / 1024:.0f} MB (VmHWM; {peak_rss / 1024:.0f} MB sampled), "
        f"{cpu:.0f} CPU s from the first registration; exit code {code}\n"
        f"SPEC §7: lag p99 < 1 s "
        f"{'met' if lags and percentile(lags, 99) < 1 else 'MISSED'}, "
        f"RSS < 200 MB {'met' if hwm < 200 * 1024 else 'MISSED'}",
        flush=True,
    )
    return 0 if not missing else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=Options.tasks)
    parser.add_argument("--first-poll-after", type=float, default=Options.first_poll_after)
    parser.add_argument("--rate-limit", type=float, default=Options.rate_limit)
    parser.add_argument("--concurrency", type=int, default=Options.concurrency)
    parser.add_argument("--connections", type=int, default=Options.connections)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--timeout", type=float, default=Options.timeout)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--profile", help="write a py-spy profile of the service to this file")
    parser.add_argument("--json", help="write each task's due and first poll time here")
    ns = parser.parse_args(argv)
    options = Options(
        tasks=ns.tasks,
        first_poll_after=ns.first_poll_after,
        rate_limit=ns.rate_limit,
        concurrency=ns.concurrency,
        connections=ns.connections,
        database=ns.database,
        timeout=ns.timeout,
        pin=not ns.no_pin and (os.cpu_count() or 1) >= 2,
        profile=ns.profile,
        json_path=ns.json,
    )
    print(reconcile.machine_description(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        return asyncio.run(asyncio.wait_for(run(options, Path(tmp)), options.timeout + 300))


if __name__ == "__main__":
    sys.exit(main())

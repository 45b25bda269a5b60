"""Reconciler benchmark: many tracked tasks against the simulator, with callbacks lost.

What it measures (SPEC §7, "100,000 tracked non-terminal tasks" and "Provider calls"):

- **Poll lag.** The service's own figure, `reconciler_lag_seconds` from `/metrics` (how far
  behind schedule the oldest due poll is), sampled every 5 s (`/metrics` counts tasks with a
  scan of the task table, so sampling it costs the service): max and
  p99 over the run. Checked independently per task: every task settled by a poll must have
  been settled no later than its poll was due. Its due time is known from its event log: the
  loop plans the first poll `FIRST_POLL_AFTER` seconds after the task's last event (the
  registration, or a callback that moved it), so the *schedule lag* of a task is
  `completed_at - (last non-terminal event + FIRST_POLL_AFTER)`; it includes the provider
  request and the commit. Max and p99 over every poll-settled task.
- **Resident memory** of the service process (of each replica, with `--replicas`): `VmRSS`
  from `/proc/PID/status` sampled over the run, and `VmHWM` (the kernel's own peak) read just
  before it is stopped; the target holds for each process.
- **Provider queries per task**: the simulator's request counts of kind query, list and
  batch (`GET /_sim/stats`; task creation goes through the control endpoint and is not a
  provider request), divided by the number of tasks.
- **Detection of lost callbacks**: for every task settled by a poll (its terminal callback
  was dropped), `completed_at` at the service minus the task's `finished_at` at the
  simulator. Its *poll window* is `FIRST_POLL_AFTER`: the poll is due at most that long after
  the task's last sign of life, which is before it finished.
- **Correctness**: every task must end in its true terminal state (the simulator's
  `final_status`), completed ones with the simulator's video URL, with exactly one terminal
  event; and the event log (`GET /events`, read whole) is one contiguous sequence of seqs
  from 1.

How it runs. Three processes (more with `--replicas`), each bounded in time:

* the simulator, `python -m reconciler.simulator --no-callback-bodies --faults
  '{"drop": 0.1}' --callback-concurrency 64` (its own process: its memory and CPU are not
  the service's; up to 64 callbacks in flight, as a provider's many workers would send);
* the service, `python -m reconciler serve --host 127.0.0.1 --port 0` with the simulator's
  environment (base URLs, credentials), a fresh SQLite database in a temporary directory, a
  callback token, and the timing variables below;
* this process: it creates the tasks at the simulator through `POST /_sim/tasks` (arrays of
  `--chunk`), paced at `--create-rate` tasks per second, each with
  `callback_url = <service>/callbacks/<provider>?token=…`, and registers each one with the
  service (`POST /tasks`) over `--connections` keep-alive connections (a minimal HTTP/1.1
  client: httpx would cost this process more CPU than the service it measures, on a
  2-core machine). Then it waits until every task is terminal, reads every task back
  (`GET /tasks` pages), the event log of every poll-settled task, and the whole log.

Several replicas (`--database postgresql --replicas N`). The service's database is then a
fresh PostgreSQL database, `bench_reconcile_<pid>`, created on the server named by
`RECONCILER_BENCH_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`;
needs `pip install -e '.[postgres]'`) and dropped at the end. N `reconciler serve`
processes (`--replicas`, default 1; more than one needs PostgreSQL) are started one after
another on it, each on its own port, and this process waits (bounded) until exactly one of
them says `"loop": "leading"` on `GET /readyz`: that replica runs the reconciler loop, and
its `/metrics` gives the poll lag and the task counts. Task *i* is registered with replica
*i mod N* and its `callback_url` names replica *(i + 1) mod N*, so with N > 1 every callback
lands on another replica than the registration. The reads at the end go to the replicas in
turn (a `GET /tasks` page to one, the next page with its cursor to the next). Reported per
replica: sampled RSS, `VmHWM`, CPU seconds, and its loop state at the start and at the end;
the service RSS and CPU lines are the largest and the sum of the replicas. A replica that
exits before the end fails the run (the tasks are still read, from the others). The
PostgreSQL server's CPU time (the postmaster and its backends, when it runs on this machine:
the whole server, whoever else uses it) is reported on its own and not counted as "other
processes".

No CPU pinning. The service, the simulator, this process (and PostgreSQL) share the
machine's cores as the scheduler places them: on a 2-core machine, N replicas plus
PostgreSQL cannot each have a core, and pinning them to one would measure the pinning.
Read the figures with the "other processes" CPU line: they are as good as the machine was
quiet.

Task mix: kling (text2video, image2video), cometapi, gateway (all five renderings), acedata
and kie (jobs and veo); 10% fail. Each task runs `--min-duration`..`--max-duration` seconds
(uniform) and is `processing` from its creation (Kling-shaped providers send a `processing`
callback at once and a terminal one at the end; AceData and Kie only the terminal one). The
first poll is due `--first-poll-after` seconds after the last event, later than every task's
end, so a task whose terminal callback arrives is never polled, and one whose callback is
lost is polled once, after it finished. With the default pace (500 tasks/s: registration
costs the service more than a webhook) and durations (210-300 s) all 100,000 tasks are
non-terminal at once from about 200 s in.

Usage (from the repository root):

    python bench/reconcile.py                   # 100,000 tasks, about 10 minutes
    python bench/reconcile.py --tasks 20000     # fewer
    python bench/reconcile.py --quick           # smoke run: 2,000 tasks, about 1 minute
    python bench/reconcile.py --json out.json   # also write the figures as JSON
    python bench/reconcile.py --database postgresql --replicas 2   # 2 replicas, PostgreSQL
    python bench/reconcile.py --quick --database postgresql --replicas 2

The whole run is bounded by `--timeout` (default 900 s); every wait inside it is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-callback-token"
POSTGRES_URL = os.environ.get(
    "RECONCILER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

# SPEC §7 targets.
TARGET_LAG_SECONDS = 1.0
TARGET_RSS_MB = 200.0
TARGET_QUERIES_PER_TASK = 0.3

# (provider, action, rendering, weight): every provider, every gateway rendering, both Kie
# task APIs. Kling-shaped providers make up 55% of the tasks.
MIX: tuple[tuple[str, str, str | None, float], ...] = (
    ("kling", "text2video", None, 0.15),
    ("kling", "image2video", None, 0.10),
    ("cometapi", "text2video", None, 0.15),
    ("gateway", "text2video", "taskdto", 0.03),
    ("gateway", "text2video", "taskdto-legacy", 0.03),
    ("gateway", "text2video", "simplified", 0.03),
    ("gateway", "text2video", "kling-native", 0.03),
    ("gateway", "text2video", "openai", 0.03),
    ("acedata", "text2video", None, 0.20),
    ("kie", "jobs", None, 0.15),
    ("kie", "veo", None, 0.10),
)
FAIL_RATE = 0.10
PROVIDER_KINDS = ("query", "list", "batch")  # the simulator's kinds of provider requests


@dataclass
class Options:
    tasks: int = 100_000
    create_rate: float = 500.0  # tasks per second
    chunk: int = 250  # tasks per POST /_sim/tasks
    min_duration: float = 210.0
    max_duration: float = 300.0
    first_poll_after: float = 330.0
    drop: float = 0.10
    rate_limit: float = 2000.0
    concurrency: int = 32
    connections: int = 64  # registration connections to the service
    # Callbacks the simulator has in flight at once. Each waits for the service's durable
    # commit, so this bounds the callbacks per second: 16 gave about 320/s, below the
    # 775/s that 500 new tasks a second bring.
    callback_concurrency: int = 64
    sample_interval: float = 5.0  # /metrics scans the task table: not too often
    timeout: float = 900.0
    seed: int = 1
    json_path: str | None = None
    keep: bool = False
    database: str = "sqlite"  # or "postgresql"
    replicas: int = 1  # `reconciler serve` processes on the one database

    @classmethod
    def quick(cls) -> Options:
        return cls(
            tasks=2000,
            create_rate=500.0,
            min_duration=10.0,
            max_duration=20.0,
            first_poll_after=30.0,
            sample_interval=1.0,
            timeout=180.0,
        )


# --- a minimal HTTP/1.1 keep-alive client ------------------------------------------------


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and read its answer; reconnects once if the server had closed
        an idle connection."""
        for attempt in (1, 2):
            try:
                return await self._exchange(method, target, body)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                await self.close()
                if attempt == 2:
                    raise HttpError(f"{method} {target}: {error!r}") from error
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = await self._open()
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            content = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                content += chunk[:-2]
            payload = bytes(content)
        else:
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload


class Pool:
    """`size` connections to one server; `request` waits for a free one."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self._free: asyncio.Queue[Connection] = asyncio.Queue()
        self._all = [Connection(parts.hostname, parts.port) for _ in range(size)]
        for connection in self._all:
            self._free.put_nowait(connection)

    async def request(
        self, method: str, target: str, body: object = None, seconds: float = 60.0
    ) -> tuple[int, Any]:
        """The status and the decoded JSON answer (or the text, when it is not JSON)."""
        data = b"" if body is None else json.dumps(body).encode()
        connection = await self._free.get()
        try:
            async with asyncio.timeout(seconds):
                status, payload = await connection.request(method, target, data)
        except BaseException:
            await connection.close()
            raise
        finally:
            self._free.put_nowait(connection)
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode("utf-8", "replace")

    async def close(self) -> None:
        for connection in self._all:
            await connection.close()


class RoundRobin:
    """Requests sent to several servers in turn: reads any replica may answer."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self._turn = itertools.cycle(pools)

    async def request(
        self, method: str, target: str, body: object = None, seconds: float = 60.0
    ) -> tuple[int, Any]:
        return await next(self._turn).request(method, target, body, seconds)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess whose first stdout line told us what we need; the rest is drained."""

    name: str
    process: asyncio.subprocess.Process
    first_line: str
    drain: asyncio.Task[None]

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, seconds: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not end within `seconds`; returns its code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(seconds):
                    await self.process.wait()
            except TimeoutError:
                print(f"{self.name} did not stop within {seconds:g} s: killed", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        self.drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.drain
        assert self.process.returncode is not None
        return self.process.returncode


async def start_child(
    name: str, argv: Sequence[str], env: dict[str, str], stderr_path: Path, seconds: float = 30.0
) -> Child:
    """Start `argv` and wait (bounded) for its first line on stdout."""
    with log_file(stderr_path) as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(seconds):
            line = (await process.stdout.readline()).decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(
            f"{name} printed nothing within {seconds:g} s; see {stderr_path}"
        ) from None
    if not line:
        await process.wait()
        raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail(stderr_path)}")
    stdout = process.stdout

    async def drain() -> None:
        while await stdout.readline():
            pass

    return Child(name, process, line.strip(), asyncio.create_task(drain()))


def log_file(path: Path) -> BinaryIO:
    return path.open("wb")


def tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as error:
        return f"({error})"


def clean_environ() -> dict[str, str]:
    """The environment without any Reconciler or provider variable we did not set."""
    prefixes = ("RECONCILER_", "KLING_", "COMETAPI_", "GATEWAY_", "ACEDATA_", "KIE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "PORT"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle since boot (/proc/stat), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in kB (empty once it is gone)."""
    values = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of a PostgreSQL server so far: the postmaster, its living children, and the
    children it has reaped (an ended backend's time is in the postmaster's cutime/cstime)."""
    ticks = 0
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # a process that just ended: the postmaster's reaped time has it
        if int(path.parent.name) == postmaster:
            ticks += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the run -------------------------------------------------------------------------------


@dataclass
class Truth:
    status: str
    video_url: str | None
    created_at: float
    finished_at: float


@dataclass
class Sample:
    at: float  # seconds since the start of the run
    lag: float | None
    rss_kb: int | None
    open_tasks: int | None  # non-terminal tasks at the service
    terminal_tasks: int | None
    callbacks_pending: int | None  # at the simulator, due or not yet due
    provider_requests: int | None
    load: float  # the machine's 1-minute load average


@dataclass
class Replica:
    """One `reconciler serve` process and what it cost."""

    url: str
    pid: int
    loop_at_start: str = ""  # its GET /readyz "loop": "leading" or "standby"
    loop_at_end: str = ""
    rss_max_mb: float = 0.0
    hwm_mb: float = 0.0
    cpu_seconds: float = 0.0


@dataclass
class Result:
    """Everything measured, printed by `report` and written by `--json`."""

    options: dict[str, Any]
    machine: str
    tasks: int = 0
    created_seconds: float = 0.0
    registered_seconds: float = 0.0
    registration_errors: int = 0
    settled_seconds: float | None = None
    peak_open_tasks: int = 0
    lag_max: float = 0.0
    lag_p99: float = 0.0
    lag_samples: int = 0
    rss_max_mb: float = 0.0  # of the largest replica
    hwm_mb: float = 0.0  # of the largest replica
    service_cpu_seconds: float = 0.0  # all replicas together
    replicas: list[Replica] = field(default_factory=list)
    postgres_cpu_seconds: float | None = None  # the server's, when it runs on this machine
    other_cpu_seconds: float = 0.0  # CPU time of processes outside this benchmark
    run_seconds: float = 0.0
    load_max: float = 0.0
    provider_requests: dict[str, dict[str, int]] = field(default_factory=dict)
    queries_per_task: float = 0.0
    callbacks: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    not_terminal: int = 0
    missing: int = 0
    listing_missed: int = 0  # tasks `GET /tasks` paging skipped, read one by one instead
    poll_settled: int = 0
    detection_p50: float | None = None
    detection_p99: float | None = None
    detection_max: float | None = None
    detection_over_window: int = 0
    schedule_lag_p50: float | None = None
    schedule_lag_p99: float | None = None
    schedule_lag_max: float | None = None
    schedule_lag_over_1s: int = 0
    events_checked: int = 0
    duplicate_terminal_events: int = 0
    log_events: int = 0  # the whole log, read at the end
    log_problem: str | None = None  # a gap or a repeat in its seqs
    samples: list[Sample] = field(default_factory=list)


def plan_tasks(options: Options, replica_urls: Sequence[str]) -> list[dict[str, Any]]:
    """The creation specs, deterministic for `--seed`. Task n's callbacks go to replica
    n + 1 (mod N): the next one after the replica it is registered with."""
    rng = random.Random(options.seed)
    kinds = [(p, a, r) for p, a, r, _ in MIX]
    weights = [w for *_, w in MIX]
    specs = []
    for n in range(options.tasks):
        provider, action, rendering = rng.choices(kinds, weights)[0]
        callback_base = replica_urls[(n + 1) % len(replica_urls)]
        spec: dict[str, Any] = {
            "provider": provider,
            "action": action,
            "callback_url": f"{callback_base}/callbacks/{provider}?token={TOKEN}",
            "outcome": "failed" if rng.random() < FAIL_RATE else "completed",
            "processing_after": 0.0,
            "finish_after": round(rng.uniform(options.min_duration, options.max_duration), 3),
        }
        if rendering is not None:
            spec["rendering"] = rendering
        specs.append(spec)
    return specs


def local_postmaster(backend: int) -> int | None:
    """The PostgreSQL server's postmaster pid when it runs on this machine (the parent of
    our backend, a `postgres` process), else None."""
    try:
        parent = int(Path(f"/proc/{backend}/stat").read_text().rpartition(")")[2].split()[1])
        name = Path(f"/proc/{parent}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return parent if name == "postgres" else None


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


_METRIC = re.compile(r"^reconciler_(lag_seconds|tasks)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$")


def parse_metrics(text: str) -> tuple[float | None, int, int]:
    """(lag, open tasks, terminal tasks) from the Prometheus text."""
    lag: float | None = None
    open_tasks = terminal = 0
    for line in text.splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if name == "lag_seconds":
            lag = float(value)
        elif labels:
            status = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("status")
            if status in ("submitted", "processing"):
                open_tasks += int(float(value))
            else:
                terminal += int(float(value))
    return lag, open_tasks, terminal


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.result = Result(asdict(options), machine_description())
        self.truth: dict[tuple[str, str], Truth] = {}
        self.t0 = time.monotonic()
        self.sampling = asyncio.Event()
        self.postmaster: int | None = None  # of a PostgreSQL server on this machine

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    # -- processes

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """The service's database URL: a SQLite file in the work directory, or a fresh
        PostgreSQL database, dropped at the end."""
        if self.options.database == "sqlite":
            yield f"sqlite:///{self.workdir / 'reconciler.db'}"
            return
        import asyncpg  # the `postgres` extra, needed only here

        name = f"bench_reconcile_{os.getpid()}"
        server = urlsplit(POSTGRES_URL)
        try:
            admin = await asyncpg.connect(POSTGRES_URL)
        except (OSError, asyncpg.PostgresError) as error:
            # The class only: the driver's message may quote the URL's password.
            raise RuntimeError(
                f"cannot connect to PostgreSQL on {server.hostname}:{server.port or 5432} "
                f"({type(error).__name__}); set RECONCILER_BENCH_POSTGRES_URL"
            ) from None
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            self.postmaster = local_postmaster(await admin.fetchval("SELECT pg_backend_pid()"))
            try:
                yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
            finally:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    @contextlib.asynccontextmanager
    async def simulator(self) -> AsyncIterator[tuple[str, dict[str, str], Child]]:
        argv = [
            sys.executable,
            "-m",
            "reconciler.simulator",
            "--no-callback-bodies",
            "--seed",
            str(self.options.seed),
            "--faults",
            json.dumps({"drop": self.options.drop}),
            "--callback-concurrency",
            str(self.options.callback_concurrency),
        ]
        child = await start_child("simulator", argv, clean_environ(), self.workdir / "sim.err")
        try:
            started = json.loads(child.first_line)
            yield started["url"], started["environ"], child
        finally:
            await child.stop()

    @contextlib.asynccontextmanager
    async def service(
        self, sim_environ: dict[str, str], database_url: str, index: int
    ) -> AsyncIterator[Replica]:
        """Replica `index` of the service, recorded in the result with what it cost."""
        o = self.options
        env = clean_environ() | sim_environ
        env |= {
            "RECONCILER_DATABASE_URL": database_url,
            "RECONCILER_CALLBACK_TOKEN": TOKEN,
            "RECONCILER_FIRST_POLL_AFTER": f"{o.first_poll_after:g}",
            "RECONCILER_RATE_LIMIT": f"{o.rate_limit:g}",
            "RECONCILER_CONCURRENCY": str(o.concurrency),
        }
        argv = [
            sys.executable,
            "-m",
            "reconciler",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "WARNING",
        ]
        name = "service" if o.replicas == 1 else f"replica{index}"
        child = await start_child(name, argv, env, self.workdir / f"{name}.err")
        match = re.search(r"http://[\d.]+:\d+", child.first_line)
        if match is None:
            await child.stop()
            raise RuntimeError(f"unexpected first line from {name}: {child.first_line!r}")
        replica = Replica(match.group(0), child.pid)
        self.result.replicas.append(replica)
        try:
            yield replica
        finally:
            hwm = proc_status(child.pid).get("VmHWM")
            if hwm is not None:
                replica.hwm_mb = hwm / 1024
            replica.cpu_seconds = cpu_seconds(child.pid)
            code = await child.stop()
            if code != 0:
                self.result.wrong.append(f"{name} exited with {code}")
                print(
                    f"{name} exited with {code}:\n{tail(self.workdir / f'{name}.err')}",
                    file=sys.stderr,
                )

    async def loop_states(self, services: Sequence[Pool]) -> list[str]:
        """What each replica's GET /readyz says of the loop: "leading", "standby", or why
        it did not say."""
        states = []
        for service in services:
            try:
                status, body = await service.request("GET", "/readyz", seconds=10)
            except (HttpError, TimeoutError, OSError) as error:
                states.append(type(error).__name__)
                continue
            loop = body.get("loop") if isinstance(body, dict) else None
            states.append(loop if isinstance(loop, str) else f"HTTP {status}")
        return states

    async def wait_leader(self, services: Sequence[Pool], seconds: float = 60.0) -> int:
        """The index of the replica running the reconciler loop, once exactly one says so."""
        states: list[str] = []
        try:
            async with asyncio.timeout(seconds):
                # Another process's state: nothing to wait on but its answers.
                while True:
                    states = await self.loop_states(services)
                    if states.count("leading") == 1:
                        break
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise RuntimeError(
                f"no one replica led the loop within {seconds:g} s: {states}"
            ) from None
        for replica, state in zip(self.result.replicas, states, strict=True):
            replica.loop_at_start = state
        return states.index("leading")

    # -- phases

    async def sample(self, service: Pool, sim: Pool) -> None:
        """Every `sample_interval` until cancelled: lag and task counts from `service` (the
        leading replica), the replicas' RSS (the largest), the simulator's backlog."""
        while True:
            started = time.monotonic()
            lag = open_tasks = terminal = pending = requests = None
            with contextlib.suppress(HttpError, TimeoutError, OSError):
                status, text = await service.request("GET", "/metrics", seconds=10)
                if status == 200 and isinstance(text, str):
                    lag, open_tasks, terminal = parse_metrics(text)
            with contextlib.suppress(HttpError, TimeoutError, OSError):
                status, stats = await sim.request("GET", "/_sim/stats", seconds=10)
                if status == 200:
                    pending = stats["callbacks"].get("pending")
                    requests = sum(
                        count
                        for kinds in stats["requests"].values()
                        for kind, count in kinds.items()
                        if kind in PROVIDER_KINDS
                    )
            rss = None
            for replica in self.result.replicas:
                kb = proc_status(replica.pid).get("VmRSS")
                if kb is not None:
                    replica.rss_max_mb = max(replica.rss_max_mb, kb / 1024)
                    rss = max(rss or 0, kb)
            self.result.samples.append(
                Sample(
                    round(self.elapsed(), 2),
                    lag,
                    rss,
                    open_tasks,
                    terminal,
                    pending,
                    requests,
                    load_average(),
                )
            )
            self.sampling.set()
            spent = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.options.sample_interval - spent))

    async def create_and_register(self, services: Sequence[Pool], sim: Pool) -> None:
        """Create the tasks at the simulator, paced, and register task n with replica n
        (mod N)."""
        o = self.options
        specs = plan_tasks(o, [replica.url for replica in self.result.replicas])
        queue: asyncio.Queue[tuple[Pool, dict[str, Any]] | None] = asyncio.Queue()
        errors: Counter[str] = Counter()

        async def register() -> None:
            while (item := await queue.get()) is not None:
                service, task = item
                body = {
                    "provider": task["provider"],
                    "task_id": task["task_id"],
                    "action": task["action"],
                }
                try:
                    status, answer = await service.request("POST", "/tasks", body)
                except (HttpError, TimeoutError, OSError) as error:
                    errors[type(error).__name__] += 1
                    continue
                if status not in (200, 201):
                    errors[f"HTTP {status}"] += 1
                    if sum(errors.values()) <= 3:
                        self.log(f"registration answered {status}: {answer}")

        workers = [asyncio.create_task(register()) for _ in range(o.connections)]
        started = time.monotonic()
        for index in range(0, len(specs), o.chunk):
            due = started + index / o.create_rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            status, created = await sim.request(
                "POST", "/_sim/tasks", specs[index : index + o.chunk]
            )
            if status != 201:
                raise RuntimeError(f"the simulator refused the tasks: {status} {created}")
            for n, task in enumerate(created, index):
                self.truth[task["provider"], task["task_id"]] = Truth(
                    task["final_status"],
                    task["video_url"],
                    epoch(task["created_at"]),
                    epoch(task["finished_at"]),
                )
                queue.put_nowait((services[n % len(services)], task))
            if index and index % (o.chunk * 40) == 0:
                self.log(f"created {index + len(created)}, registration queue {queue.qsize()}")
        self.result.created_seconds = time.monotonic() - started
        self.log(f"created {len(specs)} tasks in {self.result.created_seconds:.1f} s")
        for _ in workers:
            queue.put_nowait(None)
        waiting = asyncio.gather(*workers)
        while not waiting.done():
            await asyncio.wait([waiting], timeout=20)
            if not waiting.done():
                self.log(f"registration queue {queue.qsize()}")
        await waiting
        self.result.registered_seconds = time.monotonic() - started
        self.result.registration_errors = sum(errors.values())
        self.log(
            f"registered in {self.result.registered_seconds:.1f} s "
            f"({self.result.registration_errors} errors: {dict(errors)})"
        )

    async def wait_settled(self, deadline: float) -> None:
        """Until the service reports no open task (read from the samples), or `deadline`."""
        expected = self.options.tasks
        last_log = 0.0
        while time.monotonic() < deadline:
            self.sampling.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self.sampling.wait()
            sample = self.result.samples[-1]
            if sample.open_tasks == 0 and (sample.terminal_tasks or 0) >= expected:
                self.result.settled_seconds = sample.at
                self.log(f"all {expected} tasks terminal")
                return
            if self.elapsed() - last_log >= 15:
                last_log = self.elapsed()
                self.log(
                    f"open {sample.open_tasks}, terminal {sample.terminal_tasks}, "
                    f"lag {sample.lag}, "
                    f"RSS {(sample.rss_kb or 0) / 1024:.0f} MB, "
                    f"callbacks pending {sample.callbacks_pending}, "
                    f"provider requests {sample.provider_requests}"
                )
        self.log("the timeout came before every task was terminal")

    async def collect(self, service: RoundRobin, sim: Pool) -> None:
        """Every task read back and checked against the truth; poll-settled tasks' events."""
        o, r = self.options, self.result
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        cursor: str | None = None
        while True:
            target = "/tasks?limit=1000" + (f"&cursor={quote(cursor)}" if cursor else "")
            status, page = await service.request("GET", target, seconds=60)
            if status != 200:
                raise RuntimeError(f"GET /tasks answered {status}: {page}")
            for task in page["tasks"]:
                seen[task["provider"], task["task_id"]] = task
            cursor = page["next_cursor"]
            if not cursor:
                break
        # Read on its own each task the listing did not show (see `listing_missed`).
        for provider, task_id in self.truth.keys() - seen.keys():
            status, task = await service.request("GET", f"/tasks/{provider}/{quote(task_id)}")
            if status == 200:
                r.listing_missed += 1
                seen[provider, task_id] = task
        sources: Counter[str] = Counter()
        polled: list[tuple[str, str]] = []
        detection: list[float] = []
        for ref, truth in self.truth.items():
            task = seen.get(ref)
            if task is None:
                r.missing += 1
                continue
            if task["status"] not in ("completed", "failed", "expired"):
                r.not_terminal += 1
                continue
            sources[task["source"]] += 1
            problem = None
            if task["status"] != truth.status:
                problem = f"status {task['status']}, truth {truth.status}"
            elif truth.status == "completed" and (
                not task["videos"] or task["videos"][0]["url"] != truth.video_url
            ):
                problem = f"videos {task['videos']}, truth {truth.video_url}"
            if problem:
                r.wrong.append(f"{ref[0]}/{ref[1]}: {problem}")
            if task["source"] == "poll":
                polled.append(ref)
                detection.append(epoch(task["completed_at"]) - truth.finished_at)
        r.by_source = dict(sources)
        r.poll_settled = len(polled)
        if detection:
            r.detection_p50 = statistics.median(detection)
            r.detection_p99 = percentile(detection, 99)
            r.detection_max = max(detection)
            r.detection_over_window = sum(d > o.first_poll_after + 1.0 for d in detection)
        await self.check_schedule(service, polled, seen)
        await self.check_log(service)
        status, stats = await sim.request("GET", "/_sim/stats")
        r.provider_requests = stats["requests"]
        r.callbacks = stats["callbacks"]
        queries = sum(
            count
            for kinds in stats["requests"].values()
            for kind, count in kinds.items()
            if kind in PROVIDER_KINDS
        )
        r.queries_per_task = queries / max(1, len(self.truth))

    async def check_schedule(
        self,
        service: RoundRobin,
        polled: list[tuple[str, str]],
        seen: dict[tuple[str, str], Any],
    ) -> None:
        """Each poll-settled task's lateness against the due time its events imply, and
        exactly one terminal event per task."""
        o, r = self.options, self.result
        lateness: list[float] = []
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for ref in polled:
            queue.put_nowait(ref)

        async def worker() -> None:
            while not queue.empty():
                provider, task_id = queue.get_nowait()
                target = f"/tasks/{provider}/{quote(task_id, safe='')}/events"
                status, body = await service.request("GET", target)
                if status != 200:
                    r.wrong.append(f"{provider}/{task_id}: events answered {status}")
                    continue
                events = body["events"]
                terminal = [e for e in events if e["status"] in ("completed", "failed")]
                if len(terminal) != 1:
                    r.duplicate_terminal_events += 1
                before = [e for e in events if e["status"] not in ("completed", "failed")]
                if not before or not terminal:
                    continue
                due = epoch(before[-1]["at"]) + o.first_poll_after
                deadline = epoch(seen[provider, task_id]["deadline_at"])
                lateness.append(epoch(terminal[0]["at"]) - min(due, deadline))

        await asyncio.gather(*(worker() for _ in range(min(16, o.connections))))
        r.events_checked = len(lateness)
        if lateness:
            r.schedule_lag_p50 = statistics.median(lateness)
            r.schedule_lag_p99 = percentile(lateness, 99)
            r.schedule_lag_max = max(lateness)
            r.schedule_lag_over_1s = sum(x > TARGET_LAG_SECONDS for x in lateness)

    async def check_log(self, service: RoundRobin) -> None:
        """The whole event log, page by page: seqs 1, 2, 3, ... without a gap or a repeat."""
        r = self.result
        r.log_problem = await self.read_log(service)
        if r.log_problem:
            r.wrong.append(r.log_problem)

    async def read_log(self, service: RoundRobin) -> str | None:
        """Counts the log's events into the result; what is wrong with its seqs, if any."""
        while True:
            after = self.result.log_events
            status, page = await service.request("GET", f"/events?after={after}&limit=1000")
            if status != 200:
                return f"GET /events?after={after} answered {status}: {page}"
            if not page["events"]:
                return None
            for event in page["events"]:
                if event["seq"] != self.result.log_events + 1:
                    return f"the log goes from seq {self.result.log_events} to {event['seq']}"
                self.result.log_events = event["seq"]

    def cpu_spent(self, sim_pid: int) -> tuple[float, float]:
        """CPU time so far of this benchmark's processes, and of the PostgreSQL server among
        them (0 when it is not on this machine)."""
        server = server_cpu_seconds(self.postmaster) if self.postmaster else 0.0
        replicas = sum(cpu_seconds(replica.pid) for replica in self.result.replicas)
        return replicas + cpu_seconds(sim_pid) + self_cpu_seconds() + server, server

    async def run(self) -> Result:
        o, r = self.options, self.result
        deadline = time.monotonic() + o.timeout
        async with contextlib.AsyncExitStack() as stack:
            database_url = await stack.enter_async_context(self.database())
            sim_url, sim_environ, sim_child = await stack.enter_async_context(self.simulator())
            for index in range(o.replicas):
                await stack.enter_async_context(self.service(sim_environ, database_url, index))
            services = [Pool(replica.url, o.connections) for replica in r.replicas]
            for service in services:
                stack.push_async_callback(service.close)
            leader = await self.wait_leader(services)
            busy_before = machine_busy_seconds()
            own_before, server_before = self.cpu_spent(sim_child.pid)
            if o.replicas == 1:
                self.log(
                    f"simulator {sim_url}, service {r.replicas[0].url} (pid {r.replicas[0].pid})"
                )
            else:
                listing = ", ".join(f"{replica.url} (pid {replica.pid})" for replica in r.replicas)
                self.log(f"simulator {sim_url}, replicas {listing}; replica {leader} leads")
            sim = Pool(sim_url, 2)
            stack.push_async_callback(sim.close)
            samples = Pool(r.replicas[leader].url, 1)
            stack.push_async_callback(samples.close)
            sim_samples = Pool(sim_url, 1)
            stack.push_async_callback(sim_samples.close)
            sampler = asyncio.create_task(self.sample(samples, sim_samples))
            try:
                async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                    await self.create_and_register(services, sim)
                await self.wait_settled(deadline)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            # What else ran on the machine meanwhile: busy CPU time not spent by the
            # processes of this benchmark (the figures are only as good as the machine was
            # quiet). Both from the start of the run: the start-up is not in the figures.
            own, server = self.cpu_spent(sim_child.pid)
            r.other_cpu_seconds = machine_busy_seconds() - busy_before - (own - own_before)
            if self.postmaster:
                r.postgres_cpu_seconds = server - server_before
            r.run_seconds = self.elapsed()
            r.tasks = len(self.truth)
            # Read from the replicas that still answer: one that died is reported, not read.
            states = await self.loop_states(services)
            living = []
            for service, replica, state in zip(services, r.replicas, states, strict=True):
                replica.loop_at_end = state
                if state in ("leading", "standby"):
                    living.append(service)
            self.log("reading every task back")
            try:
                async with asyncio.timeout(300):
                    await self.collect(RoundRobin(living or services), sim)
            except TimeoutError:
                r.wrong.append("reading the tasks back took over 300 s: figures incomplete")
        r.hwm_mb = max(replica.hwm_mb for replica in r.replicas)
        r.service_cpu_seconds = sum(replica.cpu_seconds for replica in r.replicas)
        summarize_samples(r)
        return r


def summarize_samples(r: Result) -> None:
    lags = [s.lag for s in r.samples if s.lag is not None]
    if lags:
        r.lag_max = max(lags)
        r.lag_p99 = percentile(lags, 99)
        r.lag_samples = len(lags)
    rss = [s.rss_kb for s in r.samples if s.rss_kb is not None]
    if rss:
        r.rss_max_mb = max(rss) / 1024
    r.peak_open_tasks = max((s.open_tasks or 0 for s in r.samples), default=0)
    r.load_max = max((s.load for s in r.samples), default=0.0)


def machine_description() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        total = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory = f", {total / 1024 / 1024:.0f} GiB RAM"
    return f"{os.cpu_count()} cores ({model}){memory}, Python {sys.version.split()[0]}"


def report(r: Result, o: Options) -> bool:
    """Print the summary; True when every SPEC §7 target and every check held."""

    def fmt(value: float | None, unit: str = " s", digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    lag_ok = r.lag_max < TARGET_LAG_SECONDS and (r.schedule_lag_max or 0.0) < TARGET_LAG_SECONDS
    rss_ok = max(r.rss_max_mb, r.hwm_mb) < TARGET_RSS_MB
    queries_ok = r.queries_per_task < TARGET_QUERIES_PER_TASK
    detected_ok = r.detection_over_window == 0 and r.poll_settled > 0
    correct = not r.wrong and r.not_terminal == 0 and r.missing == 0
    correct = correct and r.duplicate_terminal_events == 0

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    requests = {
        name: {k: v for k, v in kinds.items() if k in PROVIDER_KINDS}
        for name, kinds in r.provider_requests.items()
    }
    head, figures = replica_lines(r, o)
    rss_label = "service RSS" if o.replicas == 1 else "RSS, largest replica"
    server_cpu = ""
    if o.database == "postgresql":
        server_cpu = f", PostgreSQL server CPU {fmt(r.postgres_cpu_seconds, ' s', 0)}"
    lines = [
        "",
        f"Reconcile benchmark: {r.tasks} tasks, {o.drop:.0%} of callbacks dropped",
        f"  machine: {r.machine}",
        *head,
        f"  callbacks: at most {o.callback_concurrency} in flight from the simulator",
        f"  timing: FIRST_POLL_AFTER={o.first_poll_after:g} s, RATE_LIMIT={o.rate_limit:g}/s, "
        f"CONCURRENCY={o.concurrency}, durations {o.min_duration:g}-{o.max_duration:g} s, "
        f"created at {o.create_rate:g}/s",
        f"  created in {r.created_seconds:.1f} s, registered in {r.registered_seconds:.1f} s "
        f"({r.registration_errors} errors), all terminal at {fmt(r.settled_seconds, ' s', 1)}; "
        f"peak open tasks {r.peak_open_tasks}",
        "",
        f"  {'measure':<44} {'measured':>22}  {'target (SPEC §7)':<18}",
        f"  {'poll lag, /metrics (max / p99, ' + str(r.lag_samples) + ' samples)':<44} "
        f"{fmt(r.lag_max) + ' / ' + fmt(r.lag_p99):>22}  < 1 s  {verdict(r.lag_max < 1)}",
        f"  {'schedule lag per polled task (max / p99)':<44} "
        f"{fmt(r.schedule_lag_max) + ' / ' + fmt(r.schedule_lag_p99):>22}  < 1 s  "
        f"{verdict((r.schedule_lag_max or 0) < 1)} ({r.schedule_lag_over_1s} over)",
        f"  {rss_label + ' (sampled max / VmHWM)':<44} "
        f"{f'{r.rss_max_mb:.0f} MB / {r.hwm_mb:.0f} MB':>22}  < 200 MB  {verdict(rss_ok)}",
        f"  {'provider queries per task':<44} {r.queries_per_task:>22.3f}  < 0.3  "
        f"{verdict(queries_ok)}",
        f"  {'lost callback detected (p50 / p99 / max)':<44} "
        f"{fmt(r.detection_p50, '', 0) + ' / ' + fmt(r.detection_p99, '', 0) + ' / '}"
        f"{fmt(r.detection_max, ' s', 0)}  within {o.first_poll_after:g} s  "
        f"{verdict(detected_ok)} ({r.detection_over_window} over)",
        f"  {'every task in its true terminal state':<44} "
        f"{f'{len(r.wrong)} wrong, {r.not_terminal} open, {r.missing} missing':>22}  all  "
        f"{verdict(correct)}",
        "",
        f"  settled by: {r.by_source}; poll-settled {r.poll_settled} "
        f"({r.poll_settled / max(1, r.tasks):.1%}); events checked {r.events_checked}, "
        f"tasks without exactly one terminal event {r.duplicate_terminal_events}",
        f"  provider requests: {requests}",
        f"  simulator callbacks: {r.callbacks}",
        f"  tasks the GET /tasks pages skipped (read one by one): {r.listing_missed}",
        f"  service CPU {r.service_cpu_seconds:.0f} s{server_cpu}; "
        "other processes on the machine used "
        f"{r.other_cpu_seconds:.0f} CPU-s in the {r.run_seconds:.0f} s run "
        f"(1-min load average up to {r.load_max:.1f})",
    ]
    lines += figures
    for problem in r.wrong[:10]:
        lines.append(f"  wrong: {problem}")
    print("\n".join(lines), flush=True)
    return lag_ok and rss_ok and queries_ok and detected_ok and correct


def replica_lines(r: Result, o: Options) -> tuple[list[str], list[str]]:
    """For a PostgreSQL run, the lines saying how it ran (the database, who led the loop)
    and those with each replica's figures and the log's; none for SQLite, whose
    one-process report reads as it always did."""
    if o.database != "postgresql":
        return [], []

    def leaders(at: str) -> str:
        states = [getattr(replica, f"loop_at_{at}") for replica in r.replicas]
        return ", ".join(str(n) for n, state in enumerate(states) if state == "leading") or "none"

    server = urlsplit(POSTGRES_URL)
    head = [
        f"  database: PostgreSQL on {server.hostname}:{server.port or 5432}, a fresh database; "
        f"{o.replicas} replica{'s' if o.replicas > 1 else ''} of the service; the loop led by "
        f"replica {leaders('start')} at the start, {leaders('end')} at the end",
    ]
    figures = [
        f"  replica {n} {replica.url} (pid {replica.pid}): RSS {replica.rss_max_mb:.0f} MB "
        f"sampled max, VmHWM {replica.hwm_mb:.0f} MB, CPU {replica.cpu_seconds:.0f} s; "
        f"loop {replica.loop_at_start} at the start, {replica.loop_at_end} at the end"
        for n, replica in enumerate(r.replicas)
    ]
    figures.append(
        f"  log: {r.log_events} events read whole, "
        + (r.log_problem or f"seqs 1..{r.log_events} without a gap or a repeat")
    )
    return head, figures


def parse(argv: Sequence[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python bench/reconcile.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 short tasks")
    parser.add_argument("--tasks", type=int, help=f"tasks to track (default {defaults.tasks})")
    parser.add_argument("--create-rate", type=float, help="tasks created per second")
    parser.add_argument("--min-duration", type=float, help="shortest task, seconds")
    parser.add_argument("--max-duration", type=float, help="longest task, seconds")
    parser.add_argument("--first-poll-after", type=float, help="RECONCILER_FIRST_POLL_AFTER")
    parser.add_argument("--rate-limit", type=float, help="RECONCILER_RATE_LIMIT")
    parser.add_argument("--concurrency", type=int, help="RECONCILER_CONCURRENCY")
    parser.add_argument("--drop", type=float, help="share of callbacks the simulator drops")
    parser.add_argument("--connections", type=int, help="registration connections")
    parser.add_argument(
        "--callback-concurrency", type=int, help="callbacks the simulator sends at once"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="bound on the whole run, seconds")
    parser.add_argument("--json", dest="json_path", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        help="the service's store: a SQLite file (default), or a fresh PostgreSQL database "
        "on RECONCILER_BENCH_POSTGRES_URL's server, dropped at the end",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        help="`reconciler serve` processes on the one database (default 1; more needs "
        "--database postgresql)",
    )
    args = parser.parse_args(argv)
    options = Options.quick() if args.quick else Options()
    for name, value in vars(args).items():
        if name != "quick" and value is not None and value is not False:
            setattr(options, name, value)
    if options.tasks < 1 or options.create_rate <= 0 or options.min_duration <= 0:
        parser.error("--tasks, --create-rate and --min-duration must be positive")
    if options.max_duration < options.min_duration:
        parser.error("--max-duration must be at least --min-duration")
    if options.database == "postgresql" and importlib.util.find_spec("asyncpg") is None:
        parser.error("--database postgresql needs asyncpg: pip install -e '.[postgres]'")
    if options.replicas < 1:
        parser.error("--replicas must be at least 1")
    if options.replicas > 1 and options.database != "postgresql":
        parser.error("--replicas above 1 needs --database postgresql: SQLite has one process")
    return options


async def amain(options: Options) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    try:
        return await Bench(options, workdir).run()
    finally:
        if options.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    try:
        try:
            import uvloop  # the load side should cost as little CPU as it can
        except ImportError:
            result = asyncio.run(amain(options))
        else:
            result = uvloop.run(amain(options))
    except KeyboardInterrupt:
        return 130
    ok = report(result, options)
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(asdict(result), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

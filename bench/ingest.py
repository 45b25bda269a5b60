"""Webhook ingest benchmark: the durable callback path against a bare Starlette endpoint.

What it measures (SPEC §7, "Webhook ingest"):

- **Throughput pairs.** For each pair, two servers are started in turn, each a fresh
  subprocess pinned to CPU 0 with `taskset -c 0`:

  * `durable`: the real service, `python -m reconciler serve --host 127.0.0.1 --port 0`, on a
    fresh SQLite database in a temporary directory (WAL, `synchronous=FULL`, group commit),
    with `RECONCILER_CALLBACK_TOKEN` set and passed as `?token=`;
  * `bare`: one Starlette route that reads the body and answers a small JSON, served by the
    same `reconciler.runtime.bind` + `server_for` (uvicorn with uvloop + httptools, lifespan
    off, no access log, no server header) and the same garbage-collector tuning as
    `run_service` (this file, `python bench/ingest.py _bare`).

  The load generator is **wrk 4.1** (Debian package `wrk`), pinned to CPU 1 with
  `taskset -c 1`: `wrk -t2 -c64 -d10s --latency -s <script> URL`, closed loop (each of the 64
  connections sends its next request when the previous answer arrived). Its Lua `request()`
  builds a ~1.5 KB Kling callback (the bare task object, PROVIDERS §1.5, three videos) with a
  unique 18-digit task id per request: a random run number, the wrk thread number and a
  per-thread counter. Every request is therefore a new task and a new event, never a
  duplicate. Each server gets a discarded warm-up run first. The pair order alternates
  (bare first, then durable first, …) so drift over the run does not favour one side.

  Printed per pair: requests/s, p50 and p99 latency of each, and the ratio durable/bare;
  then the medians. SPEC §7 compares only the median ratio of at least 5 back-to-back pairs.

- **Storage check.** After each durable run the server is stopped (SIGTERM, graceful) and
  its database is read with `sqlite3`: the deliveries stored must cover every 2xx answer wrk
  counted, and may exceed it by at most the requests in flight when wrk stopped (wrk does
  not count answers that arrive after its deadline, one per connection per run).

- **Pruning beside the load** (`--prune-backlog N`). The real service runs twice in every
  group (beside `bare`), both times on a copy of one database seeded beforehand
  (`seed_backlog`) with N terminal tasks, N deliveries and N events, all 100 days old: past
  every default retention (30 days, 30 days, 90 days). `kept` runs with retention off
  (`RECONCILER_RETAIN_*=0`); `pruning` with the defaults, so that retention's pruner starts
  its first pass at start-up and works through the backlog in its paced batches
  (`reconciler/retention.py`) while wrk runs. The two differ only by the pruner: the group
  compares the webhook path with and without pruning beside it, in the same run. Their
  storage checks count only the deliveries the run stored, and a line after `pruning`'s says
  how much of the backlog was left when the server stopped (the rest was pruned during its
  warm-up and run). The half-load run is then made on `kept` and on `pruning`, at half the
  median rate of `kept`.

- **Latency at half load.** The p99 target is "at half that load". wrk2 is not available,
  so this file has its own **open-loop, constant-rate** generator (`_openloop`, asyncio +
  uvloop + httptools over raw keep-alive connections, pinned to CPU 1): request *i* is due at
  `start + i / rate`; it goes out on an idle connection, or waits for one; its latency is
  measured from its due time (as wrk2 does), so a stall is not hidden by the generator
  waiting. The rate is half the median durable requests/s of the pairs. It waits for every
  answer, so the stored deliveries must equal its 2xx count exactly.

Usage (from the repository root):

    python bench/ingest.py                      # 5 pairs of 10 s, then the half-load run
    python bench/ingest.py --pairs 7 --duration 15
    python bench/ingest.py --quick              # CI smoke: 1 pair of 2 s, 2 s half load
    python bench/ingest.py --prune-backlog 20000  # the same, with pruning beside the load

Every subprocess and every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import hashlib
import json
import os
import queue
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-callback-token"
SERVER_CPU = "0"
LOAD_CPU = "1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0
# Slack on top of a load run's own duration before it is killed.
RUN_GRACE_SECONDS = 30.0
LISTENING = re.compile(r"listening on (http://\S+)")
# The real service: on a new database; on a seeded backlog with retention off; and on the
# same backlog with the default retention, which prunes it while the load runs.
SERVICES = ("durable", "kept", "pruning")
RETAIN = ("RECONCILER_RETAIN_EVENTS", "RECONCILER_RETAIN_DELIVERIES", "RECONCILER_RETAIN_TASKS")
ID = "@ID@"

# --- the request body ----------------------------------------------------------------------


def kling_callback_template() -> str:
    """A Kling callback as Kling sends it: the bare task object, no envelope (PROVIDERS §1.5),
    a succeeded multi-prompt task with three videos. `@ID@` stands for the task id."""
    base = "https://cdn.klingai.com/bs2/upload-kling-api/7261/text2video/"
    videos = [
        {
            "id": f"{ID}0{n}",
            "url": f"{base}{ID}-{n}_raw_video_{n + 1}.mp4",
            "watermark_url": f"{base}{ID}-{n}_raw_video_{n + 1}_watermark.mp4",
            "duration": duration,
        }
        for n, duration in enumerate(("5.1", "5.041", "5.1"))
    ]
    body = {
        "task_id": ID,
        "task_status": "succeed",
        "task_status_msg": "",
        "created_at": 1751048279423,
        "updated_at": 1751048350123,
        "final_unit_deduction": "1",
        "watermark_info": {"enabled": False},
        "task_info": {
            "external_task_id": f"order-{ID}",
            "parent_video": {
                "id": "842250903629086001",
                "url": f"{base}CjI17WevH1IAAAAAAHmgsw-0_raw_video_1.mp4",
                "duration": "5.1",
            },
        },
        "task_result": {
            "images": [{"index": 0, "url": f"{base}{ID}-0_first_frame.png"}],
            "videos": videos,
        },
    }
    return json.dumps(body, separators=(",", ":"))


def body_size() -> int:
    return len(kling_callback_template().replace(ID, "842250903629086785").encode())


WRK_SCRIPT = r"""
-- One new Kling task per request: an 18-digit id from a random run number (argument 1),
-- the wrk thread number and a per-thread counter.
local template = [==[TEMPLATE]==]
local headers = {["Content-Type"] = "application/json"}
local counter = 0
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_number", next_thread)
end

function init(args)
  run_number = tonumber(args[1])
end

function request()
  counter = counter + 1
  local id = string.format("%07d%02d%09d", run_number, thread_number, counter)
  local body = string.gsub(template, "@ID@", id)
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script() -> str:
    return WRK_SCRIPT.replace("TEMPLATE", kling_callback_template())


# --- servers -------------------------------------------------------------------------------


def pinned(cpu: str, argv: Sequence[str], pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if pin else list(argv)


@dataclass
class Server:
    """A server subprocess and where it listens."""

    kind: str
    process: subprocess.Popen[str]
    url: str
    database: Path | None
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM, wait for the graceful exit; SIGKILL if it does not come in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_SECONDS)
        return self.process.returncode


def _drain(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_server(
    kind: str, workdir: Path, pin: bool, bare_loop: str = "uvloop", seed: Path | None = None
) -> Server:
    """Start `durable`, `kept` or `pruning` (both on a copy of `seed`), or `bare`, on
    127.0.0.1, port 0; wait for its "listening on" line."""
    log = workdir / f"{kind}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_RETAIN_")}
    database = None
    if kind in SERVICES:
        database = workdir / "reconciler.db"
        if kind != "durable":
            assert seed is not None
            shutil.copyfile(seed, database)
        if kind == "kept":
            env |= dict.fromkeys(RETAIN, "0")
        env["RECONCILER_DATABASE_URL"] = f"sqlite:///{database}"
        env["RECONCILER_CALLBACK_TOKEN"] = TOKEN
        argv = [sys.executable, "-m", "reconciler", "serve", "--host", "127.0.0.1", "--port", "0"]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "_bare", bare_loop]
    with log.open("w") as stderr:
        process = subprocess.Popen(
            pinned(SERVER_CPU, argv, pin),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_drain, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            process.kill()
            process.wait()
            raise SystemExit(f"{kind} server did not start; its log:\n{log.read_text()[-3000:]}")
        if match := LISTENING.search(line):
            return Server(kind, process, match.group(1), database, log)


def serve_bare(loop: str) -> None:
    """The baseline: the same server stack as `reconciler serve`, one trivial route.

    `loop` is `uvloop` (what `reconciler serve` runs, what `uvicorn.run` picks with
    `uvicorn[standard]`, and what SPEC §7's "~17k req/s" was measured on) or `asyncio`
    (the standard library's loop, for comparison).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from reconciler.runtime import bind, server_for

    async def callback(request: Request) -> Response:
        await request.body()
        return Response(b'{"ok":true}', media_type="application/json")

    app = Starlette(routes=[Route("/callbacks/{provider}", callback, methods=["POST"])])

    async def main() -> None:
        sock = bind("127.0.0.1", 0)
        server = server_for(app)
        # As runtime.run_service does, so the only difference is the endpoint.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        host, port = sock.getsockname()[:2]
        name = type(asyncio.get_running_loop()).__module__
        print(f"bare ({name}) listening on http://{host}:{port}", flush=True)
        await server.serve(sockets=[sock])

    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# --- wrk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu: CpuShare

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU-second the server used: robust to other processes taking part
        of the server's core, which skews raw req/s (see docs/benchmarks.md)."""
        return self.rate / self.cpu.server if self.cpu.server else 0.0


@dataclass(frozen=True)
class CpuShare:
    """CPU time during a run, in CPUs (1.0 = one core busy all the time): the server's, the
    load generator's, and everything else's (other processes sharing the machine)."""

    server: float
    load: float
    other: float

    def __str__(self) -> str:
        return f"cpu: server {self.server:.2f}, load {self.load:.2f}, other {self.other:.2f}"


class CpuMeter:
    """Reads /proc around one load run; the load generator is a waited-for child."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(values) - values[3] - values[4]) / self.tick  # minus idle and iowait
        wall = time.monotonic()
        fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime, all threads
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, busy, server, children.ru_utime + children.ru_stime

    def __enter__(self) -> CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end = self._read()

    def share(self) -> CpuShare:
        wall, busy, server, load = (b - a for a, b in zip(self.start, self.end, strict=True))
        return CpuShare(server / wall, load / wall, max(0.0, busy - server - load) / wall)


def wrk_argv(url: str, script: Path, seconds: int, threads: int, connections: int) -> list[str]:
    """wrk posting the Lua script's callbacks to `url`'s Kling endpoint, with a random run
    number (the script makes task ids unique with it)."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"{url}/callbacks/kling?token={TOKEN}",
        "--",
        str(random.randrange(1_000_000, 10_000_000)),
    ]


def wrk_summary(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The figures the Lua script's `done()` printed as one `WRK_JSON` line."""
    line = next((x for x in stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{stdout}\n{stderr}")
    data: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    return data


def run_wrk(url: str, script: Path, seconds: int, options: Options, server_pid: int) -> WrkResult:
    argv = wrk_argv(url, script, seconds, options.threads, options.connections)
    with CpuMeter(server_pid) as meter:
        done = subprocess.run(
            pinned(LOAD_CPU, argv, options.pin),
            capture_output=True,
            text=True,
            timeout=seconds + RUN_GRACE_SECONDS,
            check=True,
        )
    data = wrk_summary(done.stdout, done.stderr)
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non_2xx=data["status"],
        socket_errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        cpu=meter.share(),
    )


# --- the storage check ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What a run stored (rows past the seeded backlog, if any), and what of the backlog is
    left: (tasks, deliveries, events)."""

    deliveries: dict[str, int]
    events: int
    tasks: int
    backlog_left: tuple[int, int, int] = (0, 0, 0)

    @property
    def total(self) -> int:
        return sum(self.deliveries.values())


def read_database(path: Path, backlog: int = 0) -> Stored:
    """Seeded rows are ids and seqs 1..backlog, tasks `old-*` (see `seed_backlog`)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        outcomes = dict(
            db.execute(
                "SELECT outcome, COUNT(*) FROM deliveries WHERE id > ? GROUP BY outcome",
                (backlog,),
            )
        )
        (events,) = db.execute("SELECT COUNT(*) FROM events WHERE seq > ?", (backlog,)).fetchone()
        (tasks,) = db.execute(
            "SELECT COUNT(*) FROM tasks WHERE task_id NOT LIKE 'old-%'"
        ).fetchone()
        left = db.execute(
            "SELECT (SELECT COUNT(*) FROM tasks WHERE task_id LIKE 'old-%'), "
            "(SELECT COUNT(*) FROM deliveries WHERE id <= ?), "
            "(SELECT COUNT(*) FROM events WHERE seq <= ?)",
            (backlog, backlog),
        ).fetchone()
    return Stored(outcomes, events, tasks, tuple(left))


# --- the pruning backlog -------------------------------------------------------------------

BACKLOG_AGE_DAYS = 100  # past every default retention: 30 d events and deliveries, 90 d tasks


def seed_backlog(path: Path, rows: int) -> None:
    """A migrated database holding `rows` terminal tasks, `rows` deliveries (their 1.5 KB
    callbacks) and `rows` events (each holding its task's JSON, as stored events do), all
    BACKLOG_AGE_DAYS old, for retention to prune while the load runs."""
    env = {**os.environ, "RECONCILER_DATABASE_URL": f"sqlite:///{path}"}
    subprocess.run(
        [sys.executable, "-m", "reconciler", "migrate"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT_SECONDS,
    )
    at = time.time() - BACKLOG_AGE_DAYS * 86400
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(at))
    template = kling_callback_template()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for start in range(1, rows + 1, 10_000):
            numbers = range(start, min(rows, start + 9_999) + 1)
            ids = [f"old-{n:012d}" for n in numbers]
            bodies = [template.replace(ID, task_id).encode() for task_id in ids]
            tasks = [_old_task(task_id, stamp) for task_id in ids]
            db.executemany(
                "INSERT INTO tasks (provider, task_id, status, source, created_at, updated_at, "
                "version, data) VALUES ('kling', ?, 'completed', 'webhook', ?, ?, 2, ?)",
                [(task_id, at, at, task) for task_id, task in zip(ids, tasks, strict=True)],
            )
            db.executemany(
                "INSERT INTO deliveries (id, provider, received_at, headers, body, sha256, "
                "outcome, task_id) VALUES (?, 'kling', ?, '{}', ?, ?, 'applied', ?)",
                [
                    (n, at, body, hashlib.sha256(body).hexdigest(), task_id)
                    for n, body, task_id in zip(numbers, bodies, ids, strict=True)
                ],
            )
            db.executemany(
                "INSERT INTO events (seq, provider, task_id, type, at, body) "
                "VALUES (?, 'kling', ?, 'task.completed', ?, ?)",
                [
                    (n, task_id, at, _old_event(n, task, stamp))
                    for n, task_id, task in zip(numbers, ids, tasks, strict=True)
                ],
            )


def _old_task(task_id: str, stamp: str) -> str:
    videos = [{"url": f"https://cdn.example/{task_id}-{n}.mp4", "cover_url": None,
               "duration": 5.1, "id": f"{task_id}0{n}"} for n in range(3)]  # fmt: skip
    return json.dumps(
        {"provider": "kling", "task_id": task_id, "action": "text2video",
         "status": "completed", "provider_status": "succeed", "progress": 100,
         "videos": videos, "error": None, "metadata": {}, "created_at": stamp,
         "updated_at": stamp, "completed_at": stamp, "deadline_at": stamp,
         "source": "webhook", "callbacks": 1, "polls": 0, "next_poll_at": None, "version": 2},
        separators=(",", ":"),
    )  # fmt: skip


def _old_event(seq: int, task: str, stamp: str) -> str:
    head = {"type": "task.completed", "provider": "kling", "task_id": json.loads(task)["task_id"],
            "source": "webhook", "status": "completed", "previous_status": None,
            "delivery_id": seq, "at": stamp}  # fmt: skip
    return json.dumps(head, separators=(",", ":"))[:-1] + f',"task":{task}}}'


# --- the open-loop generator ---------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, generator: OpenLoop) -> None:
        import httptools

        self.generator = generator
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, due: float, request: bytes) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.generator.answered(self, self.due, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)


@dataclass
class OpenLoop:
    """Requests at a constant rate, latency measured from each request's due time."""

    host: str
    port: int
    path: str
    rate: float
    seconds: float
    connections: int
    template: bytes
    run_number: int = field(default_factory=lambda: random.randrange(1_000_000, 10_000_000))
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    idle: collections.deque[_Connection] = field(default_factory=collections.deque)
    waiting: collections.deque[float] = field(default_factory=collections.deque)
    sent: int = 0
    lost_connections: int = 0
    closing: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    total: int = 0

    def request(self) -> bytes:
        self.sent += 1
        task_id = f"{self.run_number:07d}99{self.sent:09d}".encode()
        body = self.template.replace(ID.encode(), task_id)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def dispatch(self, due: float) -> None:
        if self.idle:
            # Oldest idle first, so no connection sits idle long enough for the server's
            # keep-alive timeout (uvicorn: 5 s) to close it.
            self.idle.popleft().send(due, self.request())
        else:
            self.waiting.append(due)

    def answered(self, connection: _Connection, due: float, status: int) -> None:
        self.latencies.append(time.perf_counter() - due)
        self.statuses[status] += 1
        if len(self.latencies) == self.total:
            self.finished.set()
        if self.waiting:
            connection.send(self.waiting.popleft(), self.request())
        else:
            self.idle.append(connection)

    def lost(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        if not self.closing:  # closed by the server, not by us at the end
            self.lost_connections += 1

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(self.connections):
            transport, connection = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
            transports.append(transport)
            self.idle.append(connection)
        self.total = int(self.rate * self.seconds)
        start = time.perf_counter() + 0.01
        try:
            index = 0
            while index < self.total:
                now = time.perf_counter()
                while index < self.total and start + index / self.rate <= now:
                    self.dispatch(start + index / self.rate)
                    index += 1
                if index < self.total:
                    await asyncio.sleep(start + index / self.rate - time.perf_counter())
            sent_all = time.perf_counter()
            async with asyncio.timeout(RUN_GRACE_SECONDS):
                await self.finished.wait()
        finally:
            self.closing = True
            for transport in transports:
                transport.close()
        latencies = sorted(self.latencies)
        return {
            "rate": self.rate,
            "requests": self.total,
            "answered": len(latencies),
            "ok": sum(n for status, n in self.statuses.items() if 200 <= status < 300),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "send_seconds": sent_all - start,
            "lost_connections": self.lost_connections,
            "p50_ms": percentile(latencies, 50) * 1000,
            "p90_ms": percentile(latencies, 90) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "p999_ms": percentile(latencies, 99.9) * 1000,
            "max_ms": latencies[-1] * 1000,
        }


def percentile(ordered: Sequence[float], pct: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def open_loop_main(url: str, rate: float, seconds: float, connections: int) -> None:
    import uvloop

    parts = urlsplit(url)
    generator = OpenLoop(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 80,
        path=f"{parts.path}?{parts.query}",
        rate=rate,
        seconds=seconds,
        connections=connections,
        template=kling_callback_template().encode(),
    )
    result = uvloop.run(generator.run())
    print("OPENLOOP_JSON " + json.dumps(result), flush=True)


def run_open_loop(
    url: str, rate: float, seconds: float, options: Options, server_pid: int
) -> tuple[dict[str, Any], CpuShare]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_openloop",
        f"{url}/callbacks/kling?token={TOKEN}",
        f"{rate:.1f}",
        f"{seconds:.1f}",
        str(options.connections),
    ]
    with CpuMeter(server_pid) as meter:
        done = subprocess.run(
            pinned(LOAD_CPU, argv, options.pin),
            capture_output=True,
            text=True,
            timeout=seconds + 2 * RUN_GRACE_SECONDS,
            check=True,
            cwd=REPO,
        )
    line = next((x for x in done.stdout.splitlines() if x.startswith("OPENLOOP_JSON ")), None)
    if line is None:
        raise SystemExit(f"the open-loop generator printed no summary:\n{done.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("OPENLOOP_JSON "))
    return result, meter.share()


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Options:
    pairs: int
    seconds: int
    warmup: int
    connections: int
    threads: int
    half_load: bool
    pin: bool
    bare_loop: str = "uvloop"
    prune_backlog: int = 0  # > 0: a `pruning` server beside each pair, on this many old rows
    seed: Path | None = None  # the seeded database `pruning` servers start from


@contextlib.contextmanager
def running(kind: str, workdir: Path, options: Options) -> Iterator[Server]:
    server = start_server(kind, workdir, options.pin, options.bare_loop, options.seed)
    try:
        yield server
    finally:
        server.stop()


def measure(kind: str, options: Options, script: Path) -> tuple[WrkResult, str]:
    """One measured wrk run on a fresh server; for `durable` and `pruning`, the storage check
    too."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        workdir = Path(tmp)
        with running(kind, workdir, options) as server:
            warm = None
            if options.warmup:
                warm = run_wrk(server.url, script, options.warmup, options, server.pid)
            result = run_wrk(server.url, script, options.seconds, options, server.pid)
            code = server.stop()
        if server.database is None:
            return result, ""
        backlog = options.prune_backlog if kind != "durable" else 0
        stored = read_database(server.database, backlog)
        acked = result.ok + (warm.ok if warm else 0)
        slack = options.connections * (2 if warm else 1)
        verdict = "ok" if acked <= stored.total <= acked + slack else "MISMATCH"
        check = (
            f"stored {stored.total} deliveries {stored.deliveries}, {stored.events} events, "
            f"{stored.tasks} tasks; wrk 2xx (warm-up + run) {acked}; "
            f"unanswered in flight at wrk's stop {stored.total - acked} (<= {slack}): {verdict}; "
            f"server exit code {code}"
        )
        if kind == "pruning":
            check += "\n    " + backlog_line(backlog, stored)
        return result, check


def backlog_line(backlog: int, stored: Stored) -> str:
    tasks, deliveries, events = stored.backlog_left
    return (
        f"backlog left when the server stopped (of {backlog} each): {events} events, "
        f"{deliveries} deliveries, {tasks} tasks"
    )


def line_of(kind: str, result: WrkResult) -> str:
    errors = ""
    if result.non_2xx or result.socket_errors:
        errors = f"  non-2xx {result.non_2xx}, socket errors {result.socket_errors}"
    return (
        f"  {kind:8} {result.rate:9.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
        f"p99 {result.p99_ms:6.2f} ms  max {result.max_ms:7.2f} ms  ({result.requests} requests)"
        f"{errors}\n    {result.cpu}; {result.per_cpu_second:.0f} requests per server CPU-second"
    )


def benchmark(options: Options) -> None:
    print(describe(options), flush=True)
    print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    kinds = ("bare", "kept", "pruning") if options.prune_backlog else ("bare", "durable")
    served = kinds[1:]
    ratios: dict[str, list[float]] = {kind: [] for kind in served}
    cpu_ratios: dict[str, list[float]] = {kind: [] for kind in served}
    results: dict[str, list[WrkResult]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "kling_callback.lua"
        script.write_text(wrk_script())
        for pair in range(options.pairs):
            # Each kind goes first in turn, so drift over the run favours none.
            order = kinds[pair % len(kinds) :] + kinds[: pair % len(kinds)]
            measured: dict[str, WrkResult] = {}
            print(f"pair {pair + 1}/{options.pairs} ({' then '.join(order)})", flush=True)
            for kind in order:
                result, check = measure(kind, options, script)
                measured[kind] = result
                results[kind].append(result)
                print(line_of(kind, result), flush=True)
                if check:
                    print(f"    {check}", flush=True)
            bare_cost = measured["bare"].per_cpu_second
            for kind in served:
                ratio = measured[kind].rate / measured["bare"].rate
                ratios[kind].append(ratio)
                cpu_ratio = measured[kind].per_cpu_second / bare_cost if bare_cost else 0.0
                cpu_ratios[kind].append(cpu_ratio)
                print(
                    f"  ratio {kind}/bare {ratio:.3f} (per server CPU-second {cpu_ratio:.3f})",
                    flush=True,
                )

    def median(kind: str, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in results[kind])

    print(f"\nmedians over {options.pairs} pair(s):")
    for kind in kinds:
        print(
            f"  {kind:8} {median(kind, 'rate'):9.0f} req/s  p50 {median(kind, 'p50_ms'):6.2f} ms"
            f"  p99 {median(kind, 'p99_ms'):6.2f} ms  "
            f"{median(kind, 'per_cpu_second'):6.0f} per server CPU-second"
        )
    for kind in served:
        print(
            f"  ratio {kind}/bare: median {statistics.median(ratios[kind]):.3f} "
            f"(min {min(ratios[kind]):.3f}, max {max(ratios[kind]):.3f}; SPEC target >= 0.60)\n"
            f"  ratio {kind}/bare per server CPU-second: median "
            f"{statistics.median(cpu_ratios[kind]):.3f} "
            f"(min {min(cpu_ratios[kind]):.3f}, max {max(cpu_ratios[kind]):.3f})",
            flush=True,
        )
    if options.half_load:
        for kind in served:
            half_load(median(served[0], "rate") / 2, options, kind)
    print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}", flush=True)


def half_load(rate: float, options: Options, kind: str = "durable") -> None:
    print(
        f"\nhalf load: {kind} server, open-loop constant rate {rate:.0f} req/s for "
        f"{options.seconds} s over {options.connections} connections "
        "(bench/ingest.py _openloop, latency from each request's due time)",
        flush=True,
    )
    backlog = options.prune_backlog if kind != "durable" else 0
    with tempfile.TemporaryDirectory(prefix="bench-half-") as tmp:
        with running(kind, Path(tmp), options) as server:
            result, cpu = run_open_loop(server.url, rate, options.seconds, options, server.pid)
            code = server.stop()
        assert server.database is not None
        stored = read_database(server.database, backlog)
    achieved = result["answered"] / result["send_seconds"] if result["send_seconds"] else 0
    print(
        f"  sent {result['requests']} at {achieved:.0f} req/s, answers {result['statuses']}, "
        f"connections closed by the server {result['lost_connections']}\n"
        f"  p50 {result['p50_ms']:.2f} ms  p90 {result['p90_ms']:.2f} ms  "
        f"p99 {result['p99_ms']:.2f} ms  p99.9 {result['p999_ms']:.2f} ms  "
        f"max {result['max_ms']:.2f} ms  (SPEC target: p99 < 50 ms)\n  {cpu}"
    )
    verdict = "ok" if stored.total == result["ok"] else "MISMATCH"
    print(
        f"  stored {stored.total} deliveries {stored.deliveries}, {stored.events} events; "
        f"2xx answered {result['ok']}: {verdict}; server exit code {code}",
        flush=True,
    )
    if kind == "pruning":
        print(f"  {backlog_line(backlog, stored)}", flush=True)


def describe(options: Options) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    version = (wrk_version.stdout + wrk_version.stderr).splitlines()[0].strip()
    pinning = (
        f"servers on CPU {SERVER_CPU}, load on CPU {LOAD_CPU} (taskset)"
        if options.pin
        else "no CPU pinning"
    )
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}\n"
        f"load generator: {version}; -t{options.threads} -c{options.connections} "
        f"-d{options.seconds}s (+{options.warmup} s warm-up per server), --latency, "
        f"Lua request() with a {body_size()} B Kling callback, a unique task id per request\n"
        f"{pinning}; {options.pairs} pair(s), order alternating; "
        f"bare server on the {options.bare_loop} event loop"
        + (
            f"; the service on a backlog of {options.prune_backlog} old tasks, deliveries "
            "and events, with retention off (`kept`) and on (`pruning`)"
            if options.prune_backlog
            else ""
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_bare"]:
        serve_bare(args[1] if len(args) > 1 else "uvloop")
        return
    if args[:1] == ["_openloop"]:
        url, rate, seconds, connections = args[1:5]
        open_loop_main(url, float(rate), float(seconds), int(connections))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="back-to-back pairs (default 5)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--no-half-load", action="store_true", help="skip the half-load run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument(
        "--bare-loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="event loop of the bare server (default uvloop, as `reconciler serve` runs)",
    )
    parser.add_argument(
        "--half-load-rate",
        type=float,
        help="skip the pairs; run only the open-loop latency run, at this many req/s",
    )
    parser.add_argument(
        "--prune-backlog",
        type=int,
        default=0,
        metavar="N",
        help="run the service on a database seeded with N tasks, N deliveries and N events old "
        "enough to prune, with retention off (`kept`) and on (`pruning`: pruned while the load "
        "runs), instead of on a new database (`durable`)",
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 pair of 2 s")
    ns = parser.parse_args(args)
    if ns.quick:
        ns.pairs, ns.duration, ns.warmup = 1, 2, 1
    pin = not ns.no_pin and (os.cpu_count() or 1) >= 2
    options = Options(
        pairs=ns.pairs,
        seconds=ns.duration,
        warmup=ns.warmup,
        connections=ns.connections,
        threads=ns.threads,
        half_load=not ns.no_half_load,
        pin=pin,
        bare_loop=ns.bare_loop,
        prune_backlog=max(0, ns.prune_backlog),
    )
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        if options.prune_backlog:
            options.seed = Path(tmp) / "backlog.db"
            print(f"seeding {options.prune_backlog} old rows of each kind…", flush=True)
            seed_backlog(options.seed, options.prune_backlog)
        if ns.half_load_rate:
            for kind in ("kept", "pruning") if options.prune_backlog else ("durable",):
                half_load(ns.half_load_rate, options, kind)
            return
        benchmark(options)


if __name__ == "__main__":
    main()

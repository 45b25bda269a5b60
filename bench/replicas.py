"""Webhook ingest on each backend in the same run: a bare endpoint, SQLite, and PostgreSQL
with one and with two replicas (two `reconciler serve` on one database).

Each round starts every variant in turn on a fresh database, in an order that rotates from
round to round, and loads it with wrk for the same time (`bench/ingest.py`'s Lua request: a
~1.5 KB Kling callback, a new task per request). Servers are pinned to CPU 0 (both replicas
share it: this machine has two cores, so "two replicas" measures what several writers on one
database cost, not what a second machine would add), wrk to CPU 1, and PostgreSQL runs
where the kernel puts it (its CPU shows as "other"). With two replicas, two wrk processes
run at once, each with half the connections, one per replica; their requests are summed.

After each durable run the database is counted: stored deliveries must cover every 2xx wrk
counted (plus at most one request in flight per connection when wrk stopped).

Printed per round: req/s, p50/p99, CPU shares; the ratio of each durable variant to bare;
then the medians. PostgreSQL must answer at RECONCILER_BENCH_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/postgres, which must allow CREATE DATABASE).

    python bench/replicas.py                 # 5 rounds of 10 s
    python bench/replicas.py --rounds 3 --duration 5

Every server and every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest

POSTGRES_URL = os.environ.get(
    "RECONCILER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
VARIANTS = ("bare", "sqlite", "postgresql x1", "postgresql x2")


@dataclass(frozen=True)
class Run:
    variant: str
    rate: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    server_cpu: float
    other_cpu: float
    check: str


def database_url(name: str) -> str:
    return urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _count(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        deliveries = await conn.fetchval("SELECT count(*) FROM deliveries")
        events = await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()
    return deliveries, events


def start(kind: str, workdir: Path, env: dict[str, str], pin: bool, n: int = 0) -> ingest.Server:
    """`bare`, or a durable server with `env` (its database) set."""
    if kind == "bare":
        return ingest.start_server("bare", workdir, pin)
    log = workdir / f"durable{n}.log"
    argv = [sys.executable, "-m", "reconciler", "serve", "--host", "127.0.0.1", "--port", "0"]
    full = {**os.environ, **env, "RECONCILER_CALLBACK_TOKEN": ingest.TOKEN}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            ingest.pinned(ingest.SERVER_CPU, argv, pin),
            cwd=ingest.REPO,
            env=full,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + ingest.START_TIMEOUT_SECONDS
    for line in process.stdout:
        if match := ingest.LISTENING.search(line):
            return ingest.Server("durable", process, match.group(1), None, log)
        if time.monotonic() > deadline:
            break
    process.kill()
    process.wait()
    raise SystemExit(f"server did not start; its log:\n{log.read_text()[-3000:]}")


def load(servers: list[ingest.Server], script: Path, seconds: int, options: ingest.Options) -> dict:
    """wrk against every server at once (connections split between them); summed."""
    per = max(1, options.connections // len(servers))
    threads = max(1, options.threads // len(servers))
    meters = [ingest.CpuMeter(server.pid) for server in servers]
    for meter in meters:
        meter.__enter__()
    runs = [
        subprocess.Popen(
            ingest.pinned(
                ingest.LOAD_CPU,
                ingest.wrk_argv(server.url, script, seconds, threads, per),
                options.pin,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for server in servers
    ]
    outputs = [run.communicate(timeout=seconds + ingest.RUN_GRACE_SECONDS)[0] for run in runs]
    for meter in meters:
        meter.__exit__()
    data = [ingest.wrk_summary(output) for output in outputs]
    shares = [meter.share() for meter in meters]
    return {
        "rate": sum(d["requests"] / (d["duration_us"] / 1e6) for d in data),
        "requests": sum(d["requests"] for d in data),
        "non_2xx": sum(d["status"] for d in data),
        "errors": sum(d["connect"] + d["read"] + d["write"] + d["timeout"] for d in data),
        "p50_ms": max(d["p50_us"] for d in data) / 1000,
        "p99_ms": max(d["p99_us"] for d in data) / 1000,
        "server_cpu": sum(share.server for share in shares),
        # Each meter counts the other replica as "other": take it once, minus the servers.
        "other_cpu": max(0.0, shares[0].other - sum(s.server for s in shares[1:])),
    }


def measure(variant: str, round_: int, script: Path, options: ingest.Options) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        workdir = Path(tmp)
        database = f"bench_replicas_{os.getpid()}_{round_}_{VARIANTS.index(variant)}"
        replicas = 2 if variant.endswith("x2") else 1
        if variant.startswith("postgresql"):
            asyncio.run(_admin(f'CREATE DATABASE "{database}"'))
            env = {"RECONCILER_DATABASE_URL": database_url(database)}
        else:
            env = {"RECONCILER_DATABASE_URL": f"sqlite:///{workdir / 'reconciler.db'}"}
        try:
            servers = [start(variant, workdir, env, options.pin, n) for n in range(replicas)]
            try:
                warm = load(servers, script, options.warmup, options) if options.warmup else None
                result = load(servers, script, options.seconds, options)
            finally:
                codes = [server.stop() for server in servers]
            check = ""
            if variant != "bare":
                if variant == "sqlite":
                    stored = ingest.read_database(workdir / "reconciler.db")
                    deliveries, events = stored.total, stored.events
                else:
                    deliveries, events = asyncio.run(_count(database_url(database)))
                acked = result["requests"] - result["non_2xx"]
                if warm:
                    acked += warm["requests"] - warm["non_2xx"]
                slack = options.connections * (2 if warm else 1)
                verdict = "ok" if acked <= deliveries <= acked + slack else "MISMATCH"
                check = (
                    f"stored {deliveries} deliveries, {events} events; wrk 2xx {acked}: "
                    f"{verdict}; exit codes {codes}"
                )
        finally:
            if variant.startswith("postgresql"):
                asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    return Run(
        variant,
        result["rate"],
        result["p50_ms"],
        result["p99_ms"],
        result["non_2xx"],
        result["errors"],
        result["server_cpu"],
        result["other_cpu"],
        check,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per variant")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-pin", action="store_true")
    ns = parser.parse_args(argv)
    options = ingest.Options(
        pairs=ns.rounds,
        seconds=ns.duration,
        warmup=ns.warmup,
        connections=ns.connections,
        threads=2,
        half_load=False,
        pin=not ns.no_pin and (os.cpu_count() or 1) >= 2,
    )
    print(ingest.describe(options).replace("pair(s)", "round(s)"), flush=True)
    print(f"PostgreSQL: {urlsplit(POSTGRES_URL).hostname}:{urlsplit(POSTGRES_URL).port}")
    print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    runs: dict[str, list[Run]] = {variant: [] for variant in VARIANTS}
    ratios: dict[str, list[float]] = {variant: [] for variant in VARIANTS[1:]}
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "kling_callback.lua"
        script.write_text(ingest.wrk_script())
        for round_ in range(ns.rounds):
            order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
            print(f"round {round_ + 1}/{ns.rounds} ({', '.join(order)})", flush=True)
            measured = {}
            for variant in order:
                run = measure(variant, round_, script, options)
                measured[variant] = run
                runs[variant].append(run)
                errors = (
                    f"  non-2xx {run.non_2xx}, socket errors {run.errors}"
                    if (run.non_2xx or run.errors)
                    else ""
                )
                print(
                    f"  {variant:14} {run.rate:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                    f"p99 {run.p99_ms:7.2f} ms  cpu: servers {run.server_cpu:.2f}, "
                    f"other {run.other_cpu:.2f}{errors}",
                    flush=True,
                )
                if run.check:
                    print(f"    {run.check}", flush=True)
            for variant in VARIANTS[1:]:
                ratios[variant].append(measured[variant].rate / measured["bare"].rate)
            print(
                "  ratio to bare: " + ", ".join(f"{v} {ratios[v][-1]:.3f}" for v in VARIANTS[1:]),
                flush=True,
            )
    print(f"\nmedians over {ns.rounds} round(s):")
    for variant in VARIANTS:
        rates = [run.rate for run in runs[variant]]
        p99 = [run.p99_ms for run in runs[variant]]
        ratio = (
            f"  ratio to bare {statistics.median(ratios[variant]):.3f} "
            f"(min {min(ratios[variant]):.3f}, max {max(ratios[variant]):.3f})"
            if variant in ratios
            else ""
        )
        print(
            f"  {variant:14} {statistics.median(rates):8.0f} req/s  "
            f"p99 {statistics.median(p99):7.2f} ms{ratio}"
        )
    print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}", flush=True)


if __name__ == "__main__":
    main()

"""The webhook write path without HTTP: CPU per delivery, by how many wait at once.

`bench/ingest.py` measures the whole path through uvicorn; this one isolates what happens
after the body is read. It opens the real runtime (`runtime.open_runtime`, a fresh SQLite
database in a temporary directory, WAL, `synchronous=FULL`, group commit) and sends N new
Kling callbacks (the same ~1.5 KB body as bench/ingest.py, a unique task id each) through
`Service.ingest` from C concurrent callers, for each C given. Printed per C:

- deliveries per second (wall clock);
- the event loop thread's CPU per delivery (interpreting, rules, encoding, statements);
- the whole process's CPU per delivery (adds the writer thread: COMMIT, WAL writes, fsync);
- transactions and the mean batch, so the per-transaction and per-delivery costs can be
  told apart: more concurrent callers make bigger batches;
- WAL written per delivery (frames of page size + 24 bytes, as counted at the writer's
  checkpoints): a transaction rewrites every page it touched, so small batches write more.

The machine is noisy: compare runs made back to back, and several of them.

Usage, from the repository root (pin to one CPU, as the server is in bench/ingest.py):

    taskset -c 0 python bench/write_path.py                 # 20,000 deliveries; C = 4, 16, 64
    taskset -c 0 python bench/write_path.py -n 5000 -c 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from bench.ingest import ID, kling_callback_template
from reconciler.config import Settings
from reconciler.runtime import open_runtime

HEADERS = {"content-type": "application/json", "user-agent": "bench/write_path.py"}


async def run(count: int, callers: int, run_number: int) -> str:
    template = kling_callback_template()
    bodies = [template.replace(ID, f"{run_number:03d}{n:015d}").encode() for n in range(count)]
    with tempfile.TemporaryDirectory(prefix="bench-write-path-") as tmp:
        settings = Settings.from_environ({"RECONCILER_DATABASE_URL": f"sqlite:///{tmp}/r.db"})
        async with open_runtime(settings) as runtime:
            service = runtime.service
            # As runtime.run_service does before serving.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            pending = iter(bodies)

            async def caller() -> None:
                for body in pending:
                    result = await service.ingest("kling", HEADERS, body)
                    assert result.outcome.value == "applied", result

            commits_before = runtime.store.stats.commits
            wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
            await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(callers))), 600)
            wall = time.perf_counter() - wall
            thread = time.thread_time() - thread
            process = time.process_time() - process
            stats = runtime.store.stats
            commits = stats.commits - commits_before
            # WAL written per commit, over the commits up to the last checkpoint.
            frames_per_commit = stats.wal_frames / max(stats.checkpointed_commits, 1)
            with contextlib.closing(sqlite3.connect(Path(tmp, "r.db"))) as db:
                [(page_size,)] = db.execute("PRAGMA page_size").fetchall()
    return (
        f"C={callers:<3d} {count / wall:7.0f} deliveries/s   "
        f"loop thread {1e6 * thread / count:6.1f} us   "
        f"process {1e6 * process / count:6.1f} us per delivery   "
        f"{commits} transactions, mean batch {count / commits:5.1f}, "
        f"WAL {frames_per_commit * (page_size + 24) / 1024 * commits / count:5.1f} KiB per delivery"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=20_000, help="deliveries per run")
    parser.add_argument(
        "-c", "--callers", type=int, nargs="+", default=[4, 16, 64], help="concurrent callers"
    )
    ns = parser.parse_args(argv)
    import uvloop  # as `reconciler serve` runs

    for number, callers in enumerate(ns.callers):
        print(uvloop.run(run(ns.count, callers, number)), flush=True)


if __name__ == "__main__":
    main()

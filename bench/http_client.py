"""The CPU one provider request costs the reconciler loop: a lane's aiohttp connections
(`polling.lane.Lane.send`, what the loop uses) against an httpx client, in the same run.

A 50-task AceData `retrieve_batch` (the burst's request) is sent over and over to a bare ASGI
endpoint that answers 50 task records (~15 KB), served by uvicorn in a child process on
CPU 1; this process runs on CPU 0 and measures its own CPU time per request. Five
alternating rounds of each; the medians and their ratio. Every request names 50 ids and
carries the provider's bearer token; bodies are read whole, as an exchange reads them.

    python bench/http_client.py                 # 5 rounds of 1,000 requests each
    python bench/http_client.py --requests 300  # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import uvicorn
import uvloop

from reconciler.clock import SystemClock
from reconciler.config import Settings
from reconciler.polling.lane import Lane
from reconciler.providers import PROVIDERS
from reconciler.runtime import bind

IDS = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(50)]
ANSWER = orjson.dumps(
    {
        "items": [
            {
                "id": task_id,
                "trace_id": task_id,
                "type": "videos",
                "request": {"action": "text2video", "model": "kling-v2-1", "prompt": "a cat"},
                "created_at": 1765000000.0,
                "started_at": 1765000001.0,
                "response": {"state": "processing", "task_id": task_id},
            }
            for task_id in IDS
        ]
    }
)


async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def serve(fd: int) -> None:
    """The child: the endpoint on CPU 1, on the listening socket its parent bound."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(answer, lifespan="off", log_config=None, access_log=False)
    uvloop.run(uvicorn.Server(config).serve(sockets=[sock]))


async def round_cpu(send: Callable[[], Awaitable[httpx.Response]], requests: int) -> float:
    """µs of this process's CPU per request, over `requests` requests."""
    started = time.process_time()
    for _ in range(requests):
        response = await send()
        assert response.status_code == 200 and len(response.content) == len(ANSWER)
    return (time.process_time() - started) / requests * 1e6


async def run(url: str, requests: int, rounds: int) -> None:
    settings = Settings.from_environ({"ACEDATA_API_TOKEN": "token", "ACEDATA_BASE_URL": url})
    lane = Lane(PROVIDERS["acedata"](settings.providers["acedata"], SystemClock()), SystemClock())
    lane.open()
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))

    def request() -> httpx.Request:
        body = {"action": "retrieve_batch", "ids": IDS}
        return httpx.Request("POST", f"{url}/kling/tasks", json=body)

    async def by_lane() -> httpx.Response:
        return await lane.send(request())

    async def by_httpx() -> httpx.Response:
        response = await client.send(request(), auth=lane.auth)
        await response.aread()
        return response

    try:
        async with asyncio.timeout(300):
            for send in (by_lane, by_httpx):  # warm up: connections, caches
                await round_cpu(send, 100)
            results: dict[str, list[float]] = {"lane (aiohttp)": [], "httpx client": []}
            for _ in range(rounds):
                results["lane (aiohttp)"].append(await round_cpu(by_lane, requests))
                results["httpx client"].append(await round_cpu(by_httpx, requests))
    finally:
        await lane.close()
        await client.aclose()
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        spread = ", ".join(f"{value:.0f}" for value in values)
        print(f"{name}: median {medians[name]:.0f} µs of CPU per request ({spread})")
    ratio = medians["httpx client"] / medians["lane (aiohttp)"]
    print(f"an httpx client costs {ratio:.1f}x the lane's CPU per request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child's socket
    ns = parser.parse_args()
    if ns.serve is not None:
        serve(ns.serve)
        return 0
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    # Bound and listening before the child starts: the first request waits for it, if need be.
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    argv = [sys.executable, __file__, "--serve", str(sock.fileno())]
    child = subprocess.Popen(argv, pass_fds=[sock.fileno()])
    sock.close()
    try:
        uvloop.run(run(f"http://127.0.0.1:{port}", ns.requests, ns.rounds))
    finally:
        child.terminate()
        child.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

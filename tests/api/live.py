"""A real service behind real uvicorn on a pre-bound loopback socket, for the read-side API
tests (stream, operations, OpenAPI, dashboard), plus small SSE and waiting helpers.

The reconciler loop does not run here: these tests create events by registering tasks and
posting callbacks, and set `service.health` where a test needs the loop's view.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from reconciler.api.stream import Streams, close_streams
from reconciler.config import Settings
from reconciler.runtime import bind, open_runtime, server_for
from reconciler.service import Service


@dataclass
class Live:
    service: Service
    app: Starlette
    url: str
    client: httpx.AsyncClient
    sock: socket.socket

    @property
    def streams(self) -> Streams:
        streams: Streams = self.app.state.streams
        return streams


@asynccontextmanager
async def live_service(
    tmp_path: Path,
    environ: Mapping[str, str] | None = None,
    streams: Streams | None = None,
    send_buffer: int | None = None,
) -> AsyncIterator[Live]:
    """The service as `reconciler serve` assembles it (`runtime.open_runtime`, `bind`,
    `server_for`), with the streams' settings given. `send_buffer` sets SO_SNDBUF on the
    listening socket (accepted ones inherit it), so a client that stops reading fills the
    server's buffers with little data."""
    settings = Settings.from_environ(
        {"RECONCILER_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite", **(environ or {})}
    )
    async with open_runtime(settings) as runtime:
        app = runtime.app
        app.state.streams = streams or Streams()
        sock = bind("127.0.0.1", 0)
        if send_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        server = server_for(app)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                yield Live(runtime.service, app, url, client, sock)
        finally:
            # uvicorn waits for open responses on shutdown: end the streams first.
            close_streams(app)
            server.should_exit = True
            await serving


async def until(streams: Streams, condition: Callable[[Streams], bool]) -> None:
    async with asyncio.timeout(10):
        await streams.wait_until(condition)


def kling_callback(task_id: str, status: str = "succeed", updated: int = 1751048350123) -> bytes:
    body: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "created_at": 1751048279423,
        "updated_at": updated,
        "task_result": {},
    }
    if status == "succeed":
        body["task_result"] = {
            "videos": [{"id": "v", "url": f"https://cdn.example/{task_id}.mp4", "duration": "5.1"}]
        }
    if status == "failed":
        body["task_status_msg"] = "Image pixel is invalid"
    return json.dumps(body).encode()


@dataclass
class Frame:
    id: int | None = None
    event: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class SSEReader:
    """Splits a text/event-stream body into frames, as EventSource does."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> Frame:
        frame = Frame()
        seen = False
        async for line in self.lines:
            if line == "":
                if seen:
                    return frame
                continue
            seen = True
            if line.startswith(":"):
                frame.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                frame.id = int(value)
            elif name == "event":
                frame.event = value
            elif name == "data":
                frame.data = value if frame.data is None else frame.data + "\n" + value
        raise EOFError("the stream ended")

    async def events(self, count: int) -> list[Frame]:
        """The next `count` event frames, skipping comments and the retry hint."""
        frames: list[Frame] = []
        while len(frames) < count:
            frame = await self.next()
            if frame.id is not None:
                frames.append(frame)
        return frames

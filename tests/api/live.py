"""The read-side API tests' way into a running service (`live_service`, which is the suite's
one `serve` under the name these tests use), plus small SSE and waiting helpers.

The reconciler loop does not run here: these tests create events by registering tasks and
posting callbacks, and set the loop's own `health` (`live.health`) where a test needs the
loop's view.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reconciler.api.stream import Streams
from tests.conftest import Served, serve

Live = Served


@asynccontextmanager
async def live_service(
    tmp_path: Path,
    environ: Mapping[str, str] | None = None,
    streams: Streams | None = None,
    send_buffer: int | None = None,
) -> AsyncIterator[Live]:
    """`serve` on `tmp_path/db.sqlite`, with the streams' settings given."""
    async with serve(
        tmp_path / "db.sqlite", environ, streams=streams, send_buffer=send_buffer, client_timeout=10
    ) as live:
        yield live


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

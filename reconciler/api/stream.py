"""`GET /events/stream`: the event log as server-sent events (SPEC §2 "The event log").

Every client runs its own loop over the durable log: read the events after its cursor
(waiting on the in-process feed when there are none), send them, advance the cursor. There is
no shared fan-out queue, so a slow client can only delay itself, and what one client holds in
memory is bounded: one page of events (`Streams.page` rows), sent in chunks of about
`CHUNK_BYTES`, plus the server's transport buffer. A client whose send stays blocked longer
than `Streams.send_timeout_seconds` has fallen too far behind and is disconnected; it resumes
from its `Last-Event-ID` with no gap.

Frames carry the stored event JSON as is (spliced, not re-encoded). Stored JSON is compact,
so it never contains a line break and always fits in one `data:` line.

This module does not own the feed (`feed.py`) nor reading the log (`Service.events`).
Tunables live in a `Streams` on `app.state.streams` (created on first use with defaults; tests
and the runtime may set their own), and `close_streams(app)` ends every open stream so that
uvicorn's graceful shutdown, which waits for open responses, can finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from reconciler.api.errors import ApiError
from reconciler.api.events import int_param
from reconciler.service import CursorExpired, Service

logger = logging.getLogger(__name__)

MAX_SEQ = 2**62
# The first frame: a reconnect delay for EventSource, and it puts the headers on the wire
# at once so that a client knows it is connected before the first event.
HELLO = b"retry: 2000\n\n"
PING = b": ping\n\n"
CHUNK_BYTES = 64 * 1024


class Streams:
    """The open event streams of one app: their tunables, a count, and a way to end them."""

    def __init__(
        self,
        heartbeat_seconds: float = 15.0,
        send_timeout_seconds: float = 30.0,
        page: int = 100,
    ) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self.page = page
        self.open = 0
        self.dropped = 0  # clients disconnected for being too slow
        self.closing = asyncio.Event()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self.closing.set()

    def _count(self, opened: int = 0, dropped: int = 0) -> None:
        self.open += opened
        self.dropped += dropped
        # Wake the current waiters; later ones wait on a fresh event (as in `Feed`).
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_until(self, condition: Callable[[Streams], bool]) -> None:
        """Wait until `condition(self)` holds, e.g. no stream is open after `close()`."""
        while not condition(self):
            await self._changed.wait()


def streams_of(app: Any) -> Streams:
    streams: Streams | None = getattr(app.state, "streams", None)
    if streams is None:
        streams = app.state.streams = Streams()
    return streams


def close_streams(app: Any) -> None:
    """End every open stream (call before stopping the server); clients reconnect elsewhere."""
    streams_of(app).close()


class Row(Protocol):
    """A stored event as `Service.events` returns it (the API does not import the store)."""

    @property
    def seq(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def body(self) -> str: ...


def frame(row: Row) -> bytes:
    return f"id: {row.seq}\nevent: {row.type}\ndata: {row.body}\n\n".encode()


async def frames(
    service: Service,
    after: int,
    provider: str | None,
    task_id: str | None,
    streams: Streams,
) -> AsyncGenerator[bytes, None]:
    yield HELLO
    while True:
        seen = service.feed.last_seq
        try:
            rows = await service.events(
                after, streams.page, provider, task_id, streams.heartbeat_seconds
            )
        except CursorExpired:
            # Retention pruned past a stream that fell that far behind: end it. The client
            # reconnects with its Last-Event-ID and gets the 410 before a new stream starts.
            return
        if rows:
            # Sends of at most about CHUNK_BYTES, so that a send timing out means the client
            # could not take that much in `send_timeout_seconds`, whatever the events weigh.
            chunk: list[bytes] = []
            size = 0
            for row in rows:
                chunk.append(frame(row))
                size += len(chunk[-1])
                if size >= CHUNK_BYTES:
                    yield b"".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield b"".join(chunk)
            after = rows[-1].seq
        else:
            # Nothing up to `seen` matched the filter: the next read can start past it.
            after = max(after, seen)
            yield PING


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse whose sends are bounded in time, which ends on `Streams.close()`,
    and which closes its generator however it ends."""

    def __init__(self, content: AsyncGenerator[bytes, None], streams: Streams) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={
                "cache-control": "no-cache",
                "x-accel-buffering": "no",  # proxies: pass frames on as they come
                # A stream that ends (slow client, shutdown) ends its connection too, so the
                # client notices at once and reconnects instead of idling on a keep-alive.
                "connection": "close",
            },
        )
        self.content = content
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streams = self.streams
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        streams._count(opened=1)
        pump = asyncio.create_task(self._pump(send))
        hangup = asyncio.create_task(_disconnect(receive))
        closing = asyncio.create_task(streams.closing.wait())
        tasks = (pump, hangup, closing)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            streams._count(opened=-1)
        if hangup.done() and not hangup.cancelled():
            return  # the client is gone: there is nobody to finish the response for
        error = None if pump.cancelled() else pump.exception()
        if error is not None:
            raise error
        try:
            async with asyncio.timeout(streams.send_timeout_seconds):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # The client reads nothing at all. Returning with the response unfinished makes
            # the server close the connection, which is what this client needs.
            logger.warning("event stream client stopped reading; closing its connection")

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self.content:
                try:
                    async with asyncio.timeout(self.streams.send_timeout_seconds):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except TimeoutError:
                    # The transport buffer stayed full: the client is too far behind. Dropping
                    # it frees the server; its Last-Event-ID brings it back without a gap.
                    self.streams._count(dropped=1)
                    logger.info("event stream client too slow; disconnecting it")
                    return
        finally:
            # Runs on cancellation too: the generator's own cleanup must not wait for GC.
            await self.content.aclose()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def resume_point(request: Request) -> int:
    """Where a stream starts: `Last-Event-ID` (a reconnecting EventSource) wins over
    `?after=`, which the same EventSource repeats from its original URL (and which must be
    valid all the same)."""
    after = int_param(request, "after", 0, 0, MAX_SEQ)
    header = request.headers.get("last-event-id", "").strip()
    if not header:
        return after
    # ASCII digits only: `isdigit` also takes "²", which `int` refuses.
    if not (header.isascii() and header.isdigit()) or int(header) > MAX_SEQ:
        raise ApiError(422, "invalid", "Last-Event-ID must be an event seq", field="Last-Event-ID")
    return int(header)


async def event_stream(request: Request) -> Response:
    service: Service = request.app.state.service
    streams = streams_of(request.app)
    after = resume_point(request)
    await service.check_cursor(after)  # a cursor that fell off the log: 410, before the stream
    if request.method == "HEAD":  # the headers only: a stream that nobody reads never ends
        return Response(media_type="text/event-stream", headers={"cache-control": "no-cache"})
    provider = request.query_params.get("provider") or None
    task_id = request.query_params.get("task_id") or None
    return EventStreamResponse(frames(service, after, provider, task_id, streams), streams)


routes = [Route("/events/stream", event_stream, methods=["GET"])]

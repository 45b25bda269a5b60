"""GET /events/stream through real uvicorn: frames, exact resume, heartbeats, many clients,
a slow client dropped without holding up the others, clean disconnects and shutdown."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from reconciler.api.stream import Streams
from tests.api.live import Live, SSEReader, kling_callback, live_service, until


async def register(live: Live, count: int, prefix: str = "t", **metadata: str) -> None:
    for n in range(count):
        await live.service.register("kling", f"{prefix}{n}", metadata=metadata or None)


async def test_frames_carry_seq_type_and_the_stored_event(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await register(live, 1)
        response = await live.client.post("/callbacks/kling", content=kling_callback("t0"))
        assert response.status_code == 200
        async with live.client.stream("GET", "/events/stream") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-cache"
            registered, completed = await SSEReader(stream).events(2)
        page = (await live.client.get("/events")).json()["events"]
        assert [registered.json(), completed.json()] == page
        assert (registered.id, registered.event) == (page[0]["seq"], "task.registered")
        assert (completed.id, completed.event) == (page[1]["seq"], "task.completed")
        assert completed.json()["task"]["videos"][0]["url"] == "https://cdn.example/t0.mp4"


async def test_last_event_id_resumes_with_no_gap_and_no_repeat(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await register(live, 5, "a")
        async with live.client.stream("GET", "/events/stream") as stream:
            first = await SSEReader(stream).events(3)
        assert [f.id for f in first] == [1, 2, 3]
        await register(live, 4, "b")  # written while the client is away
        # A reconnecting EventSource repeats its URL (here ?after=0) and adds the header.
        headers = {"Last-Event-ID": str(first[-1].id)}
        async with live.client.stream(
            "GET", "/events/stream", params={"after": 0}, headers=headers
        ) as stream:
            reader = SSEReader(stream)
            rest = await reader.events(6)
            await register(live, 1, "c")  # and one that arrives live
            (live_one,) = await reader.events(1)
        seqs = [f.id for f in [*first, *rest, live_one]]
        assert seqs == list(range(1, 11))
        assert [f.json()["task_id"] for f in rest] == ["a3", "a4", "b0", "b1", "b2", "b3"]
        async with live.client.stream("GET", "/events/stream", params={"after": 8}) as stream:
            assert [f.id for f in await SSEReader(stream).events(2)] == [9, 10]


async def test_filters_by_provider_and_task(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await live.service.register("kie", "k1")
        await register(live, 2)
        await live.service.register("kie", "k2")
        params = {"provider": "kie"}
        async with live.client.stream("GET", "/events/stream", params=params) as stream:
            frames = await SSEReader(stream).events(2)
        assert [f.json()["task_id"] for f in frames] == ["k1", "k2"]
        params = {"provider": "kling", "task_id": "t1"}
        async with live.client.stream("GET", "/events/stream", params=params) as stream:
            (frame,) = await SSEReader(stream).events(1)
        assert frame.json()["task_id"] == "t1"


async def test_idle_stream_sends_heartbeat_comments(tmp_path: Path) -> None:
    async with live_service(tmp_path, streams=Streams(heartbeat_seconds=0.05)) as live:
        await register(live, 1, "other", note="x")
        # Filtered to a task that never appears: only heartbeats, while events go by.
        params = {"task_id": "never"}
        async with live.client.stream("GET", "/events/stream", params=params) as stream:
            reader = SSEReader(stream)
            hello = await reader.next()
            assert hello.id is None and not hello.comments  # the retry hint
            await register(live, 2, "more")
            for _ in range(3):
                frame = await reader.next()
                assert frame.comments == ["ping"] and frame.id is None


async def test_many_subscribers_each_get_every_event_in_order(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        clients = 25
        connected = asyncio.Barrier(clients + 1)

        async def subscribe() -> list[int]:
            async with httpx.AsyncClient(base_url=live.url, timeout=10) as client:
                async with client.stream("GET", "/events/stream") as stream:
                    reader = SSEReader(stream)
                    await reader.next()  # the retry hint: connected
                    await connected.wait()
                    return [f.id or 0 for f in await reader.events(40)]

        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(subscribe()) for _ in range(clients)]
                await connected.wait()
                await register(live, 40)
        for task in tasks:
            assert task.result() == list(range(1, 41))
        await until(live.streams, lambda s: s.open == 0)


async def test_client_disconnect_ends_its_stream(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        async with live.client.stream("GET", "/events/stream") as stream:
            await SSEReader(stream).next()
            assert live.streams.open == 1
        await until(live.streams, lambda s: s.open == 0)
        await register(live, 1)  # nothing is left to be woken by the feed


async def test_close_streams_ends_open_streams(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await register(live, 1)
        async with live.client.stream("GET", "/events/stream") as stream:
            reader = SSEReader(stream)
            await reader.events(1)
            live.streams.close()
            with pytest.raises(EOFError):
                await reader.next()
        assert live.streams.open == 0


async def test_head_answers_with_headers_only(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        response = await live.client.head("/events/stream")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert live.streams.open == 0


async def test_bad_last_event_id_is_refused(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        response = await live.client.get("/events/stream", headers={"Last-Event-ID": "x1"})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid"
        response = await live.client.get("/events/stream", params={"after": "-1"})
        assert response.status_code == 422


async def test_slow_client_is_dropped_without_holding_up_others(tmp_path: Path) -> None:
    streams = Streams(send_timeout_seconds=0.3, heartbeat_seconds=5)
    async with live_service(tmp_path, streams=streams, send_buffer=4096) as live:
        host, port = live.sock.getsockname()
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(slow, (host, port))
        request = f"GET /events/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        await loop.sock_sendall(slow, request)
        async with live.client.stream("GET", "/events/stream") as stream:
            fast = SSEReader(stream)
            await fast.next()
            await until(live.streams, lambda s: s.open == 2)
            # Write big events until the slow client, which reads nothing, is dropped; the
            # fast client keeps up with every one of them meanwhile.
            padding = "x" * 16_000
            written = 0
            async with asyncio.timeout(20):
                while live.streams.dropped == 0:
                    await live.service.register("kling", f"big{written}", {"pad": padding})
                    written += 1
                    (frame,) = await fast.events(1)
                    assert frame.id == written
            assert live.streams.dropped == 1
            await until(live.streams, lambda s: s.open == 1)
            # The slow client gets what was buffered, then the connection ends.
            received = bytearray()
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(slow, 65536):
                    received += chunk
            slow.close()
            ids = [int(line[4:]) for line in received.decode().splitlines() if line[:4] == "id: "]
            assert ids == list(range(1, len(ids) + 1))
            assert len(ids) < written
        # It resumes by id and misses nothing (reading the backlog at its own pace).
        live.streams.send_timeout_seconds = 30
        headers = {"Last-Event-ID": str(ids[-1] if ids else 0)}
        async with live.client.stream("GET", "/events/stream", headers=headers) as stream:
            rest = await SSEReader(stream).events(written - len(ids))
        assert [f.id for f in rest] == list(range(len(ids) + 1, written + 1))

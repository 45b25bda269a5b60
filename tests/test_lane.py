"""A lane's connections (`polling.lane.Lane.send`), against live servers on loopback: the
provider's auth flow, redirects not followed, bodies decoded by their headers, the proxy
from the environment, and what a provider that does not speak HTTP does to an exchange."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from reconciler.clock import FakeClock
from reconciler.config import Settings
from reconciler.errors import ServerError, Verdict
from reconciler.metrics import Metrics
from reconciler.model import Source, TaskRef
from reconciler.polling.exchange import exchange
from reconciler.polling.lane import Lane
from reconciler.providers import PROVIDERS
from reconciler.runtime import bind
from reconciler.state import new_task
from tests.providers.support import serve

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Recorder:
    """An ASGI app that records each request's path and Authorization header and answers
    from `answers` in turn: (status, headers, body)."""

    def __init__(self, answers: list[tuple[int, list[tuple[bytes, bytes]], bytes]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        self.seen.append((scope["path"], auth.decode() if auth else None))
        status, extra, body = self.answers[min(len(self.seen), len(self.answers)) - 1]
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def live() -> AsyncIterator[Callable[[Recorder], Awaitable[str]]]:
    """`await live(app)`: `support.serve` for the length of the test; the app's URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(app: Recorder) -> str:
            return await stack.enter_async_context(serve(app))

        yield start


def kling_lane(url: str) -> Lane:
    settings = Settings.from_environ(
        {"KLING_ACCESS_KEY": "ak", "KLING_SECRET_KEY": "sk", "KLING_BASE_URL": url}
    )
    lane = Lane(PROVIDERS["kling"](settings.providers["kling"], FakeClock()), FakeClock())
    lane.open()
    return lane


async def test_a_401_goes_back_through_the_auth_flow_once(live: Any) -> None:
    """Kling's auth re-mints its token after a 401 and sends the request again."""
    app = Recorder([(401, [], b'{"code":1004}'), (200, [], b'{"code":0}')])
    lane = kling_lane(await live(app))
    try:
        response = await lane.send(httpx.Request("GET", f"{lane.provider.base_url}/v1/x"))
    finally:
        await lane.close()
    assert response.status_code == 200 and response.json() == {"code": 0}
    assert [path for path, _ in app.seen] == ["/v1/x", "/v1/x"]
    assert all(auth and auth.startswith("Bearer ey") for _, auth in app.seen)


async def test_a_redirect_is_answered_not_followed_and_bodies_are_decoded(live: Any) -> None:
    redirect = (302, [(b"location", b"/elsewhere")], b"")
    zipped = (200, [(b"content-encoding", b"gzip")], gzip.compress(b'{"code":0}'))
    app = Recorder([redirect, zipped])
    lane = kling_lane(await live(app))
    try:
        moved = await lane.send(httpx.Request("GET", f"{lane.provider.base_url}/v1/a"))
        decoded = await lane.send(httpx.Request("GET", f"{lane.provider.base_url}/v1/b"))
    finally:
        await lane.close()
    assert moved.status_code == 302 and [path for path, _ in app.seen] == ["/v1/a", "/v1/b"]
    assert decoded.json() == {"code": 0}


async def test_requests_go_through_the_proxy_the_environment_names(
    live: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with an httpx client: `HTTP_PROXY` is used, except for the hosts `NO_PROXY` names."""
    proxy = Recorder([(200, [], b'{"via":"proxy"}')])
    direct = Recorder([(200, [], b'{"via":"direct"}')])
    monkeypatch.setenv("HTTP_PROXY", await live(proxy))
    direct_url = await live(direct)
    for no_proxy, url in [("localhost", "http://provider.invalid"), ("127.0.0.1", direct_url)]:
        monkeypatch.setenv("NO_PROXY", no_proxy)
        lane = kling_lane(url)  # provider.invalid: reachable only through the proxy
        try:
            response = await lane.send(httpx.Request("GET", f"{url}/v1/x"))
        finally:
            await lane.close()
        assert response.json() == {"via": "proxy" if no_proxy == "localhost" else "direct"}
    assert [path for path, _ in proxy.seen] == [path for path, _ in direct.seen] == ["/v1/x"]


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1024)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("handler", [close_at_once, answer_garbage, None])
async def test_a_provider_that_does_not_speak_http_fails_the_exchange_not_the_loop(
    handler: Any,
) -> None:
    """A connection closed at once, an answer that is not HTTP, a port nobody listens on:
    the exchange ends with a `ServerError` for its tasks (backoff, breaker), whatever the
    HTTP client raised."""
    if handler is None:
        unused = bind("127.0.0.1", 0)  # bound, never listening: connections are refused
        port = unused.getsockname()[1]
        unused.close()
        server = None
    else:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    settings = Settings.from_environ(
        {"ACEDATA_API_TOKEN": "t", "ACEDATA_BASE_URL": f"http://127.0.0.1:{port}"}
    )
    clock = FakeClock()
    lane = Lane(PROVIDERS["acedata"](settings.providers["acedata"], clock), clock)
    lane.open()
    tasks = [
        new_task(TaskRef("acedata", f"t{n}"), "text2video", clock.now(), 3600, Source.REGISTER)
        for n in range(3)
    ]
    permit = lane.limits.start(clock.now())
    assert permit is not None
    try:
        ending = await exchange(
            lane, permit, tasks, stop=asyncio.Event(), metrics=Metrics(), sent=Counter()
        )
    finally:
        await lane.close()
        if server is not None:
            server.close()
            await server.wait_closed()
    assert ending.results is None and isinstance(ending.error, ServerError)
    assert ending.error.verdict is Verdict.FAILED

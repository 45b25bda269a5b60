"""The dashboard page: served with its script inlined behind the API token, and, in a real
headless Chromium driven over the DevTools protocol, a task's row turning `completed` when
its callback arrives, with no reload.

Chromium is Debian's `chromium` package; the browser test is skipped when it is absent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from reconciler.api.stream import Streams, close_streams
from reconciler.clock import FakeClock
from reconciler.retention import Retention
from tests.api.live import Live, kling_callback, live_service
from tests.conftest import StartService

TOKEN = "dash-token-Qx19"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(os.environ.get("DASHBOARD_SCREENSHOT", "/tmp/dashboard.png"))


async def test_page_is_served_with_its_assets_inlined(tmp_path: Path) -> None:
    async with live_service(tmp_path, {"RECONCILER_API_TOKEN": TOKEN}) as live:
        assert (await live.client.get("/")).status_code == 401
        response = await live.client.get("/", params={"access_token": TOKEN})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["referrer-policy"] == "no-referrer"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        page = response.text
        assert "<!-- SCRIPT -->" not in page and "<!-- STYLE -->" not in page
        assert "new EventSource(" in page
        # Nothing is fetched from elsewhere: no external script, style or font.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


# --- a minimal DevTools protocol client ------------------------------------------------


class Browser:
    """Headless Chromium spoken to over its DevTools websocket (flattened sessions)."""

    def __init__(self, process: asyncio.subprocess.Process, socket: Any) -> None:
        self.process = process
        self.socket = socket
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self.problems: list[str] = []  # console errors and uncaught exceptions

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path) -> AsyncIterator[Browser]:
        assert CHROMIUM is not None
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-quic",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1440,900",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            async with asyncio.timeout(60):
                while not (match := re.search(rb"ws://\S+", await process.stderr.readline())):
                    if process.stderr.at_eof():
                        raise RuntimeError("chromium exited before it listened")
            async with (
                websockets.connect(match[0].decode(), max_size=None) as socket,
                asyncio.TaskGroup() as group,
            ):
                browser = cls(process, socket)
                # Chromium writes to stderr as it runs: keep the pipe from filling up.
                drain = group.create_task(process.stderr.read())
                reader = group.create_task(browser.read())
                try:
                    yield browser
                finally:
                    reader.cancel()
                    drain.cancel()
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()

    async def read(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if "id" in message:
                future = self.pending.pop(message["id"])
                if "error" in message:
                    future.set_exception(RuntimeError(message["error"]["message"]))
                else:
                    future.set_result(message.get("result", {}))
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.problems.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.problems.append(params["entry"]["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                self.problems.append(json.dumps(params["args"])[:500])
            for name, waiter in list(self.waiters):
                if name == method and not waiter.done():
                    waiter.set_result(params)
                    self.waiters.remove((name, waiter))

    async def send(self, method: str, session: str | None = None, **params: Any) -> Any:
        number = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[number] = future
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.socket.send(json.dumps(message))
        return await future

    def expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters.append((method, future))
        return future

    async def open(self, url: str, width: int = 1440, height: int = 900) -> str:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session: str = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable", session)
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        loaded = self.expect("Page.loadEventFired")
        await self.send("Page.navigate", session, url=url)
        await loaded
        return session

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"]["text"])
        return result["result"].get("value")

    async def until(self, session: str, predicate: str, seconds: float = 15) -> None:
        """Wait until the JavaScript expression `predicate` is true in the page: checked
        now and on every DOM change (a MutationObserver), not on a timer."""
        script = f"""new Promise((resolve) => {{
            const holds = () => {{ try {{ return Boolean({predicate}); }} catch (_) {{ return false; }} }};
            if (holds()) return resolve(true);
            const observer = new MutationObserver(() => {{
                if (holds()) {{ observer.disconnect(); resolve(true); }}
            }});
            observer.observe(document, {{subtree: true, childList: true, characterData: true,
                                         attributes: true}});
        }})"""  # noqa: E501
        async with asyncio.timeout(seconds):
            await self.evaluate(session, script)

    async def screenshot(self, session: str) -> bytes:
        shot = await self.send("Page.captureScreenshot", session, format="png")
        return base64.b64decode(shot["data"])


def status_of(task: str) -> str:
    return f"document.querySelector('tr[data-key=\"{task}\"] .status')?.textContent"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_row_turns_completed_live_when_the_callback_arrives(tmp_path: Path) -> None:
    async with (
        live_service(tmp_path, {"RECONCILER_API_TOKEN": TOKEN}) as live,
        Browser.launch(tmp_path / "profile") as browser,
    ):
        await seed(live)
        await live.service.register("kling", "t1", metadata={"user": 42})
        page = await browser.open(f"{live.url}/?access_token={TOKEN}")
        await browser.until(page, f"{status_of('kling/t1')} === 'submitted'")
        await browser.until(page, "document.getElementById('connection').textContent === 'live'")
        await browser.evaluate(page, "window.notReloaded = true")

        response = await live.client.post("/callbacks/kling", content=kling_callback("t1"))
        assert response.status_code == 200

        await browser.until(page, f"{status_of('kling/t1')} === 'completed'")
        assert await browser.evaluate(page, "window.notReloaded") is True
        row = "document.querySelector('tr[data-key=\"kling/t1\"]')"
        link = await browser.evaluate(page, f"{row}.querySelector('.result a').href")
        assert link == "https://cdn.example/t1.mp4"
        assert await browser.evaluate(page, f"{row}.querySelector('.source').textContent") == (
            "webhook"
        )
        # The settlement picture follows (it refreshes shortly after each event).
        await browser.until(page, "document.querySelector('#settled .nums b')")

        # Filters: by status, then back; the URL keeps them for a reload.
        await browser.evaluate(
            page,
            "(() => { const s = document.getElementById('f-status'); s.value = 'failed';"
            " s.dispatchEvent(new Event('change')); })()",
        )
        await browser.until(page, "document.querySelector('tr[data-key=\"kling/t1\"]') === null")
        await browser.until(page, "document.querySelector('tr[data-key=\"kie/k-failed\"]')")
        assert "status=failed" in await browser.evaluate(page, "location.search")
        await browser.evaluate(
            page,
            "(() => { const s = document.getElementById('f-status'); s.value = '';"
            " s.dispatchEvent(new Event('change')); })()",
        )
        await browser.until(page, f"{status_of('kling/t1')} === 'completed'")
        SCREENSHOT.write_bytes(await browser.screenshot(page))  # noqa: ASYNC240 (a test)
        assert browser.problems == []


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_a_page_whose_next_events_were_pruned_starts_over(
    tmp_path: Path, start_service: StartService
) -> None:
    """The stream resumes after the last event the page saw. When retention pruned the events
    after it while the page was cut off, the server refuses that resume (410
    cursor_expired): the page starts over from what is true now, without a reload, instead
    of asking again for what is gone."""
    clock = FakeClock()
    live = await start_service(env={"RECONCILER_API_TOKEN": TOKEN}, clock=clock)
    await live.service.register("kling", "t1")
    async with Browser.launch(tmp_path / "profile") as browser:
        page = await browser.open(f"{live.url}/?access_token={TOKEN}")
        await browser.until(page, f"{status_of('kling/t1')} === 'submitted'")
        await browser.until(page, "document.getElementById('connection').textContent === 'live'")
        await browser.evaluate(page, "window.notReloaded = true")

        # Cut the page off, then let its next events happen and be pruned.
        await browser.send("Network.enable", page)
        await browser.send(
            "Network.emulateNetworkConditions",
            page,
            offline=True,
            latency=0,
            downloadThroughput=-1,
            uploadThroughput=-1,
        )
        close_streams(live.app)  # ends the page's stream; the server takes new ones after it
        live.app.state.streams = Streams()
        await browser.until(page, "document.getElementById('connection').textContent !== 'live'")
        response = await live.client.post("/callbacks/kling", content=kling_callback("t1"))
        assert response.status_code == 200
        await live.service.register("kling", "t2")
        clock.advance(31 * 86400)  # past the events' 30 days
        await Retention(live.service, pause_seconds=0).prune_once()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        head = (await live.client.get("/stats", headers=bearer)).json()["last_seq"]
        expired = await live.client.get("/events", params={"after": 1}, headers=bearer)
        assert expired.status_code == 410, expired.text

        await browser.send(
            "Network.emulateNetworkConditions",
            page,
            offline=False,
            latency=0,
            downloadThroughput=-1,
            uploadThroughput=-1,
        )
        await browser.until(page, f"{status_of('kling/t1')} === 'completed'", seconds=30)
        await browser.until(page, f"{status_of('kling/t2')} === 'submitted'")
        await browser.until(page, "document.getElementById('connection').textContent === 'live'")
        assert await browser.evaluate(page, "window.notReloaded") is True
        assert await browser.evaluate(page, "document.getElementById('last-seq').textContent") == (
            f"#{head}"
        )

        # Live again from the new head: the next change arrives as an event.
        response = await live.client.post("/callbacks/kling", content=kling_callback("t2"))
        assert response.status_code == 200
        await browser.until(page, f"{status_of('kling/t2')} === 'completed'")


async def seed(live: Live) -> None:
    """A few tasks in every state, so that the page (and its screenshot) shows them all."""
    service = live.service
    await service.register("acedata", "a-running", action="text2video")
    await service.register("kie", "k-failed", action="jobs")
    failed = {
        "code": 501,
        "msg": "upstream failed",
        "data": {"taskId": "k-failed", "state": "fail", "failMsg": "content policy violation"},
    }
    await live.client.post("/callbacks/kie", content=json.dumps(failed).encode())
    for n in range(3):
        await service.register("kling", f"done-{n}", metadata={"n": n})
        await live.client.post("/callbacks/kling", content=kling_callback(f"done-{n}"))
    processing = json.loads(kling_callback("p1", "processing"))
    processing["task_progress"] = 40
    await service.register("cometapi", "p1")
    await live.client.post("/callbacks/cometapi", content=json.dumps(processing).encode())

"""The read side through real uvicorn: health and readiness, metrics, /stats, long-poll on
/events, and which routes the API token guards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.errors import NotFound
from reconciler.model import Observation, Status, TaskRef, Video
from reconciler.providers import PollResult
from reconciler.store.sqlite import SQLiteStore
from tests.api.live import Live, kling_callback, live_service

API_TOKEN = "api-token-Zq81"
SECRETS = {
    "RECONCILER_API_TOKEN": API_TOKEN,
    "RECONCILER_CALLBACK_TOKEN": "callback-token-Hw27",
    "KLING_ACCESS_KEY": "kling-access-Ab12",
    "KLING_SECRET_KEY": "kling-secret-Cd34",
    "KLING_WEBHOOK_SECRET": "whsec_c2VjcmV0LWtsaW5nLXdlYmhvb2s=",
    "COMETAPI_KEY": "comet-key-Ef56",
    "GATEWAY_API_KEY": "gateway-key-Gh78",
    "GATEWAY_BASE_URL": "https://gateway.example",
    "ACEDATA_API_TOKEN": "acedata-token-Ij90",
    "KIE_API_KEY": "kie-key-Kl12",
    "KIE_WEBHOOK_HMAC_KEY": "kie-hmac-Mn34",
}
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


# Lets a task unknown at the provider be failed by the reconciler at once.
GRACE = {"KLING_NOT_FOUND_GRACE": "0"}


async def settle(live: Live) -> None:
    """Tasks settled every way. kling: t0 by its callback, t1 and t2 by polls (completed;
    failed at the provider), t3 failed by the reconciler (not found), t4 open. kie: k0
    expired."""
    service = live.service
    for n in range(5):
        await service.register("kling", f"t{n}")
    response = await live.client.post("/callbacks/kling", content=kling_callback("t0"))
    assert response.status_code == 200, response.text
    video = Video("https://cdn.example/t1.mp4", duration=5.0)
    results = {
        "t1": PollResult("t1", Observation("t1", Status.COMPLETED, "succeed", 100, (video,))),
        "t2": PollResult("t2", Observation("t2", Status.FAILED, "failed", error="bad prompt")),
        "t3": PollResult("t3", error=NotFound("no such task")),
    }
    for task_id, result in results.items():
        task = await service.store.get_task(TaskRef("kling", task_id))
        assert task is not None
        [settled] = await service.settle_polls([task], [result])
        assert settled is not None and settled.terminal
    task, _ = await service.register("kie", "k0")
    assert (await service.expire(task)) is not None


async def test_healthz_is_always_ok(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        response = await live.client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


async def test_readyz_gives_the_reasons(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        response = await live.client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["error"]["code"] == "not_ready"
        assert body["reasons"] == ["reconciler loop not running"]
        assert "reconciler loop not running" in body["error"]["message"]

        live.health.loop_running = True
        live.health.breakers_open.add("acedata")
        response = await live.client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "loop": "leading",
            "breakers_open": ["acedata"],
        }

        live.health.paused["kling"] = "HTTP 401: access key not found"
        body = (await live.client.get("/readyz")).json()
        assert body["reasons"] == ["kling: credentials rejected (HTTP 401: access key not found)"]
        assert "kling: credentials rejected" in body["error"]["message"]


async def test_readyz_reads_the_running_loop(tmp_path: Path) -> None:
    """The loop owns its health; /readyz sees it through the service, while it runs only."""
    async with live_service(tmp_path) as live:
        running = asyncio.create_task(live.loop.run())
        try:
            response = await live.client.get("/readyz")
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ready", "loop": "leading", "breakers_open": []}
        finally:
            live.loop.stop()
            async with asyncio.timeout(10):
                await running
        response = await live.client.get("/readyz")
        assert response.json()["reasons"] == ["reconciler loop not running"]


async def test_readyz_reports_an_unreachable_database(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        live.health.loop_running = True
        async with SQLiteStore(tmp_path / "other.sqlite") as closed:
            pass
        opened, live.service.store = live.service.store, closed
        try:
            response = await live.client.get("/readyz")
        finally:
            live.service.store = opened
        assert response.status_code == 503
        assert response.json()["reasons"] == ["database unreachable (StoreError)"]


async def test_metrics_figures(tmp_path: Path) -> None:
    async with live_service(tmp_path, GRACE) as live:
        await settle(live)
        live.health.breakers_open.add("acedata")
        live.health.paused["cometapi"] = "HTTP 401"
        response = await live.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples[name, tuple(sorted(labels.items()))]

        settled = "reconciler_tasks_settled"
        assert value(settled, provider="kling", by="callback") == 1
        assert value(settled, provider="kling", by="poll") == 2  # t2: failed, found by a poll
        assert value(settled, provider="kling", by="failed") == 1
        assert value(settled, provider="kling", by="expired") == 0
        assert value(settled, provider="kie", by="expired") == 1
        assert value(settled, provider="acedata", by="callback") == 0
        assert value("reconciler_tasks", provider="kling", status="completed") == 2
        assert value("reconciler_tasks", provider="kling", status="submitted") == 1
        assert value("reconciler_tasks", provider="kling", status="failed") == 2
        assert value("reconciler_tasks", provider="kie", status="expired") == 1
        assert value("reconciler_breaker_open", provider="acedata") == 1
        assert value("reconciler_breaker_open", provider="kling") == 0
        assert value("reconciler_provider_paused", provider="cometapi") == 1
        assert value("reconciler_lag_seconds") == 0  # t3's first poll is minutes away
        assert value("reconciler_deliveries_total", provider="kling", outcome="applied") == 1
        assert value("reconciler_polls_total", provider="kling", outcome="observed") == 2
        assert value("reconciler_polls_total", provider="kling", outcome="not_found") == 1

        # The gauges follow the database: nothing lingers at an old value.
        await live.client.post("/callbacks/kling", content=kling_callback("t4", "failed"))
        live.health.breakers_open.clear()
        text = (await live.client.get("/metrics")).text
        assert 'reconciler_tasks{provider="kling",status="submitted"} 0.0' in text
        assert 'reconciler_tasks_settled{by="callback",provider="kling"} 2.0' in text
        assert 'reconciler_breaker_open{provider="acedata"} 0.0' in text


async def test_lag_counts_overdue_polls_even_without_the_loop(tmp_path: Path) -> None:
    environ = {"KLING_FIRST_POLL_AFTER": "0"}
    async with live_service(tmp_path, environ) as live:
        await live.service.register("kling", "due")  # due now; no loop is there to poll it
        assert (await live.service.overview()).lag_seconds > 0
        assert live.health.lag_seconds == 0
        live.health.lag_seconds = 12.5  # what a stuck loop would report
        stats = (await live.client.get("/stats")).json()
        assert stats["lag_seconds"] >= 12.5


async def test_stats_for_the_dashboard(tmp_path: Path) -> None:
    async with live_service(tmp_path, GRACE) as live:
        await settle(live)
        live.health.paused["kie"] = "HTTP 403"
        response = await live.client.get("/stats")
        assert response.status_code == 200
        stats = response.json()
        kling = {"callback": 1, "poll": 2, "failed": 1, "expired": 0, "open": 1}
        assert stats["providers"]["kling"] == kling
        assert stats["providers"]["kie"] == {
            "callback": 0, "poll": 0, "failed": 0, "expired": 1, "open": 0
        }  # fmt: skip
        assert set(stats["providers"]) == {"kling", "cometapi", "gateway", "acedata", "kie"}
        head = (await live.client.get("/events", params={"limit": 1000})).json()["last_seq"]
        assert stats["last_seq"] == head
        assert stats["paused"] == {"kie": "HTTP 403"}
        assert stats["breakers_open"] == []


async def test_long_poll_returns_when_an_event_arrives(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await live.service.register("kling", "first")
        head = (await live.client.get("/events")).json()["last_seq"]
        loop = asyncio.get_running_loop()
        empty = await live.client.get("/events", params={"after": head, "wait": 0.05})
        assert empty.json() == {"events": [], "last_seq": head}

        wait = 30.0
        started = loop.time()
        poll = asyncio.create_task(
            live.client.get("/events", params={"after": head, "wait": wait}, timeout=wait + 5)
        )
        await live.service.register("kling", "second")
        response = await poll
        assert loop.time() - started < wait  # answered by the event, not by the end of the wait
        events = response.json()["events"]
        assert [e["task_id"] for e in events] == ["second"]
        assert response.json()["last_seq"] == events[0]["seq"] == head + 1


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/stats", "/openapi.json", "/", "/events", "/tasks", "/events/stream"],
)
async def test_api_token_guards_read_routes(tmp_path: Path, path: str) -> None:
    async with live_service(tmp_path, SECRETS) as live:
        response = await live.client.get(path)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = await live.client.get(path, params={"access_token": "nope"})
        assert wrong.status_code == 401
        live.streams.close()  # so that the stream answers and ends at once
        for kwargs in ({"headers": BEARER}, {"params": {"access_token": API_TOKEN}}):
            response = await live.client.get(path, **kwargs)  # type: ignore[arg-type]
            assert response.status_code == 200, (path, kwargs)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_checks_need_no_token(tmp_path: Path, path: str) -> None:
    async with live_service(tmp_path, SECRETS) as live:
        live.health.loop_running = True
        response = await live.client.get(path)
        assert response.status_code == 200


async def test_no_secret_appears_on_read_routes(tmp_path: Path) -> None:
    async with live_service(tmp_path, SECRETS) as live:
        await settle_with_token(live)
        live.health.paused["kling"] = "HTTP 401: credentials rejected"
        live.streams.close()
        for path in ("/metrics", "/stats", "/readyz", "/healthz", "/openapi.json", "/"):
            response = await live.client.get(path, headers=BEARER)
            assert response.status_code in (200, 503), path
            for name, secret in SECRETS.items():
                if name != "GATEWAY_BASE_URL":
                    assert secret not in response.text, (path, name)


async def settle_with_token(live: Live) -> None:
    await live.service.register("kling", "t0")
    token = SECRETS["RECONCILER_CALLBACK_TOKEN"]
    response = await live.client.post(
        "/callbacks/kling", params={"token": token}, content=kling_callback("t0")
    )
    # KLING_WEBHOOK_SECRET is set, so an unsigned callback is refused: it is still a request
    # that must leave no secret behind.
    assert response.status_code in (200, 401)

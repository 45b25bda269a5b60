"""POST /callbacks/{provider} through a real uvicorn server: durable before acknowledge,
authenticated, idempotent, and nothing lost on bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import sqlite3
import time
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from reconciler.logs import RedactQuery
from reconciler.model import Outcome, TaskRef
from tests.conftest import Served, StartService

TOKEN = "cb-secret-token-123"
VIDEO = "https://cdn.example.com/v/{}.mp4"


def kling(task_id: str, status: str = "succeed", updated: int = 1751048350123) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": "Image pixel is invalid" if status == "failed" else "",
        "created_at": 1751048279423,
        "updated_at": updated,
        "task_info": {"external_task_id": f"ext-{task_id}"},
        "task_result": {},
    }
    if status == "succeed":
        body["task_result"] = {
            "videos": [{"id": "v1", "url": VIDEO.format(task_id), "duration": "5.1"}]
        }
    return body


def acedata(task_id: str, ok: bool = True) -> dict[str, Any]:
    if ok:
        return {
            "success": True,
            "video_id": "v",
            "video_url": VIDEO.format(task_id),
            "duration": "5.1",
            "state": "succeed",
            "task_id": task_id,
            "trace_id": "tr",
        }
    return {
        "success": False,
        "task_id": task_id,
        "trace_id": "tr",
        "error": {"code": "api_error", "message": "generation failed"},
    }


def kie(task_id: str, ok: bool = True) -> dict[str, Any]:
    data = {
        "taskId": task_id,
        "model": "kling-2.6/text-to-video",
        "state": "success" if ok else "fail",
        "param": "{}",
        "resultJson": json.dumps({"resultUrls": [VIDEO.format(task_id)]}) if ok else "",
        "failCode": None if ok else "500",
        "failMsg": None if ok else "upstream failed",
        "createTime": 1751048279423,
        "updateTime": 1751048350123,
        "completeTime": 1751048350123,
    }
    return {"code": 200 if ok else 501, "msg": "success" if ok else "upstream failed", "data": data}


BODIES = {
    "kling": lambda i, ok: kling(i, "succeed" if ok else "failed"),
    "cometapi": lambda i, ok: kling(i, "succeed" if ok else "failed"),
    "gateway": lambda i, ok: kling(i, "succeed" if ok else "failed"),
    "acedata": acedata,
    "kie": kie,
}


async def post(
    served: Served, provider: str, body: object, token: str | None = TOKEN, **kwargs: Any
) -> httpx.Response:
    params = {"token": token} if token is not None else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await served.client.post(
        f"/callbacks/{provider}", params=params, content=content, **kwargs
    )


@pytest.fixture
async def served(start_service: StartService) -> Served:
    return await start_service({"RECONCILER_CALLBACK_TOKEN": TOKEN})


def db_path(served: Served) -> str:
    return served.runtime.settings.database_url.removeprefix("sqlite:///")


async def test_acknowledged_delivery_is_visible_from_another_connection(served: Served) -> None:
    observer = sqlite3.connect(db_path(served))
    for n in range(20):
        response = await post(served, "kling", kling(f"t{n}"))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["duplicate"] is False
        assert body["task"]["status"] == "completed"
        assert body["task"]["videos"][0]["url"] == VIDEO.format(f"t{n}")
        row = observer.execute(
            "SELECT provider, outcome FROM deliveries WHERE id = ?", (body["delivery_id"],)
        ).fetchone()
        assert row == ("kling", "applied")


async def test_500_concurrent_callbacks_across_providers(served: Served) -> None:
    plan = [(provider, f"{provider}-{n}", n % 4 != 0) for n in range(100) for provider in BODIES]
    assert len(plan) == 500

    async def send(provider: str, task_id: str, ok: bool) -> httpx.Response:
        return await post(served, provider, BODIES[provider](task_id, ok))

    responses = await asyncio.gather(*(send(*item) for item in plan))
    assert [r.status_code for r in responses] == [200] * 500, {r.text for r in responses}
    assert len({r.json()["delivery_id"] for r in responses}) == 500

    service = served.runtime.service
    events = await service.events(0, 1000)
    assert len(events) == 500
    assert [e.seq for e in events] == list(range(1, 501))
    by_task = {(e.provider, e.task_id): json.loads(e.body) for e in events}
    for provider, task_id, ok in plan:
        event = by_task[(provider, task_id)]
        assert event["type"] == ("task.completed" if ok else "task.failed")
        assert event["source"] == "webhook"
        assert event["delivery_id"] is not None
        task = await service.get_task(TaskRef(provider, task_id))
        assert task is not None and task.status.value == ("completed" if ok else "failed")
        assert task.callbacks == 1

    # The same 500 bodies again: all duplicates, no new event.
    again = await asyncio.gather(*(send(*item) for item in plan))
    assert all(r.status_code == 200 and r.json()["duplicate"] for r in again)
    assert len(await service.events(0, 1000)) == 500
    assert len(await served.runtime.store.deliveries(limit=2000)) == 1000


BAD_INPUTS: list[tuple[str, str, bytes, dict[str, Any], int, str | None]] = [
    # (name, provider, body, request kwargs, status, error code)
    ("empty body", "kling", b"", {}, 400, "invalid_json"),
    ("not JSON", "kling", b"hello, world", {}, 400, "invalid_json"),
    ("JSON array", "kling", b"[1, 2, 3]", {}, 400, "bad_payload"),
    ("invalid UTF-8", "kling", b'{"task_id": "\xff\xfe"}', {}, 400, "invalid_json"),
    ("NUL bytes", "kling", b'{"task_id":\x00"x"}', {}, 400, "invalid_json"),
    ("5,000-deep nesting", "kling", b"[" * 5000 + b"]" * 5000, {}, 400, "invalid_json"),
    ("no task id", "kling", b'{"task_status": "succeed"}', {}, 400, "bad_payload"),
    (
        "wrong field types",
        "kling",
        b'{"task_id": {"a": 1}, "task_status": 7}',
        {},
        400,
        "bad_payload",
    ),
    (
        "10 KB task id",
        "kling",
        json.dumps({"task_id": "x" * 10_000, "task_status": "submitted"}).encode(),
        {},
        400,
        "bad_payload",
    ),
    (
        "wrong content type",
        "acedata",
        json.dumps(acedata("ct")).encode(),
        {"headers": {"content-type": "text/plain"}},
        200,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "provider", "body", "kwargs", "status", "code"),
    BAD_INPUTS,
    ids=[case[0] for case in BAD_INPUTS],
)
async def test_bad_input_is_answered_and_kept(
    served: Served,
    name: str,
    provider: str,
    body: bytes,
    kwargs: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    response = await post(served, provider, body, **kwargs)
    assert response.status_code == status, response.text
    if code is not None:
        error = response.json()["error"]
        assert error["code"] == code and error["message"]
        stored = await served.runtime.store.deliveries([response.json()["delivery_id"]])
        assert stored[0].body == body and stored[0].outcome is Outcome.REJECTED
        assert stored[0].error
    assert (await served.client.get("/healthz")).status_code == 200


async def test_refused_requests_store_nothing(served: Served) -> None:
    too_big = b'{"task_id":"big","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    cases = [
        (await post(served, "kling", kling("a"), token=None), 401, "unauthorized"),
        (await post(served, "kling", kling("a"), token="wrong"), 401, "unauthorized"),
        (await post(served, "nosuch", kling("a")), 404, "unknown_provider"),
        (await post(served, "kling", too_big), 413, "payload_too_large"),
    ]

    async def chunked() -> Any:
        for _ in range(3):
            yield b"x" * (512 * 1024)

    streamed = await served.client.post(
        "/callbacks/kling", params={"token": TOKEN}, content=chunked()
    )
    cases.append((streamed, 413, "payload_too_large"))
    for response, status, code in cases:
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
    assert await served.runtime.store.deliveries() == []
    assert (await served.client.get("/healthz")).status_code == 200


async def test_duplicates_out_of_order_and_conflicts(served: Served) -> None:
    service = served.runtime.service
    first = await post(served, "kling", kling("t", "processing", updated=2))
    assert first.json()["task"]["status"] == "processing"
    dup = await post(served, "kling", kling("t", "processing", updated=2))
    assert dup.json()["duplicate"] is True
    done = await post(served, "kling", kling("t", "succeed", updated=3))
    assert done.json()["task"]["status"] == "completed"
    late = await post(served, "kling", kling("t", "submitted", updated=1))
    assert late.status_code == 200 and late.json()["task"]["status"] == "completed"
    conflict = await post(served, "kling", kling("t", "failed", updated=4))
    assert conflict.json()["task"]["status"] == "completed"
    assert conflict.json()["task"]["error"] is None
    events = [json.loads(e.body)["type"] for e in await service.events(0, 100)]
    assert events == ["task.processing", "task.completed"]
    outcomes = [d.outcome for d in await served.runtime.store.deliveries()]
    assert outcomes == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.UNCHANGED,
        Outcome.CONFLICT,
    ]


async def test_callback_before_registration_then_registration_merges(served: Served) -> None:
    response = await post(served, "acedata", acedata("early"))
    assert response.json()["task"]["status"] == "completed"
    registered = await served.client.post(
        "/tasks", json={"provider": "acedata", "task_id": "early", "metadata": {"user": 42}}
    )
    assert registered.status_code == 200
    task = registered.json()
    assert task["status"] == "completed" and task["metadata"] == {"user": 42}
    assert task["callbacks"] == 1 and task["next_poll_at"] is None
    types = [json.loads(e.body)["type"] for e in await served.runtime.service.events(0, 10)]
    assert types == ["task.completed", "task.registered"]


async def test_callback_matches_a_task_registered_by_external_id(served: Served) -> None:
    await served.client.post("/tasks", json={"provider": "kling", "task_id": "ext-real"})
    response = await post(served, "kling", kling("real"))
    task = response.json()["task"]
    assert (task["task_id"], task["status"]) == ("ext-real", "completed")


async def test_kling_standard_webhooks_signature(start_service: StartService) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    served = await start_service({"KLING_WEBHOOK_SECRET": secret})
    body = json.dumps(kling("signed")).encode()
    msg_id, stamp = "msg_1", str(int(time.time()))
    signature = Webhook(secret).sign(msg_id, _utc(int(stamp)), body.decode())
    headers = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    ok = await served.client.post("/callbacks/kling", content=body, headers=headers)
    assert ok.status_code == 200, ok.text
    bad = await served.client.post(
        "/callbacks/kling", content=body.replace(b"signed", b"forged"), headers=headers
    )
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "bad_signature"
    missing = await served.client.post("/callbacks/kling", content=body)
    assert missing.status_code == 401
    assert len(await served.runtime.store.deliveries()) == 1


async def test_kie_hmac_signature(start_service: StartService) -> None:
    key = "kie-hmac-key"
    served = await start_service({"KIE_WEBHOOK_HMAC_KEY": key})
    body = kie("kt")
    stamp = str(int(time.time()))
    digest = hmac.new(key.encode(), f"kt.{stamp}".encode(), hashlib.sha256).digest()
    headers = {
        "X-Webhook-Timestamp": stamp,
        "X-Webhook-Signature": base64.b64encode(digest).decode(),
    }
    ok = await served.client.post("/callbacks/kie", json=body, headers=headers)
    assert ok.status_code == 200, ok.text
    headers["X-Webhook-Signature"] = base64.b64encode(b"0" * 32).decode()
    bad = await served.client.post("/callbacks/kie", json=body, headers=headers)
    assert bad.status_code == 401


async def test_token_never_reaches_the_access_log(start_service: StartService) -> None:
    from reconciler.runtime import bind, server_for

    served = await start_service({"RECONCILER_CALLBACK_TOKEN": TOKEN})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactQuery())
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    sock = bind("127.0.0.1", 0)
    server = server_for(served.runtime.app, access_log=True)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        port = sock.getsockname()[1]
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{port}/callbacks/kling?token={TOKEN}", json=kling("logged")
            )
        assert response.status_code == 200
    finally:
        server.should_exit = True
        await task
        access.removeHandler(handler)
    text = stream.getvalue()
    assert "/callbacks/kling?[redacted]" in text
    assert TOKEN not in text


def _utc(seconds: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC)


async def test_other_methods_and_paths_get_the_envelope(served: Served) -> None:
    wrong_method = await served.client.get("/callbacks/kling", params={"token": TOKEN})
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    for path in ("/callbacks/kling/extra", "/callbacks/", "/callbacks"):
        response = await served.client.post(path, params={"token": TOKEN}, content=b"{}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert await served.runtime.store.deliveries() == []

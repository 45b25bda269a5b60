"""Task routes through a real server: registration, validation, listing by cursor, waiting."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from reconciler.model import parse_iso
from tests.conftest import Served, StartService


@pytest.fixture
async def served(start_service: StartService) -> Served:
    return await start_service()


async def test_register_is_idempotent_and_merges_metadata(served: Served) -> None:
    body = {"provider": "kling", "task_id": "8422509036", "metadata": {"user": 42}}
    first = await served.client.post("/tasks", json=body)
    assert first.status_code == 201
    task = first.json()
    assert (task["status"], task["action"], task["source"]) == (
        "submitted",
        "text2video",
        "register",
    )
    assert task["next_poll_at"] is not None and task["deadline_at"] is not None
    again = await served.client.post(
        "/tasks", json={**body, "metadata": {"plan": "pro"}, "action": "text2video"}
    )
    assert again.status_code == 200
    assert again.json()["metadata"] == {"user": 42, "plan": "pro"}
    events = (await served.client.get("/tasks/kling/8422509036/events")).json()["events"]
    assert [e["type"] for e in events] == ["task.registered"]


async def test_kie_defaults_to_the_jobs_api_and_numbers_are_ids(served: Served) -> None:
    response = await served.client.post("/tasks", json={"provider": "kie", "task_id": 123})
    assert response.status_code == 201
    assert (response.json()["task_id"], response.json()["action"]) == ("123", "jobs")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task_id": "a"}, "provider"),
        ({"provider": "nosuch", "task_id": "a"}, "provider"),
        ({"provider": "kling"}, "task_id"),
        ({"provider": "kling", "task_id": ""}, "task_id"),
        ({"provider": "kling", "task_id": "x" * 300}, "task_id"),
        ({"provider": "kling", "task_id": "a\nb"}, "task_id"),
        ({"provider": "kling", "task_id": "a", "action": 5}, "action"),
        ({"provider": "kling", "task_id": "a", "metadata": [1]}, "metadata"),
        ({"provider": "kling", "task_id": "a", "deadline_seconds": -1}, "deadline_seconds"),
        ({"provider": "kling", "task_id": "a", "deadline_seconds": True}, "deadline_seconds"),
        ([1, 2], "body"),
    ],
)
async def test_validation_names_the_field(served: Served, body: Any, field: str) -> None:
    response = await served.client.post("/tasks", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["message"]
    assert response.json()["field"] == field


async def test_not_json_is_400(served: Served) -> None:
    response = await served.client.post("/tasks", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_list_pages_by_cursor_newest_first_without_gaps(served: Served) -> None:
    # Registered in one burst: many share a millisecond, so the cursor must be exact.
    ids = [f"t{n:03d}" for n in range(60)]
    await asyncio.gather(
        *(served.client.post("/tasks", json={"provider": "acedata", "task_id": i}) for i in ids)
    )
    await served.client.post("/tasks", json={"provider": "kling", "task_id": "other"})
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"provider": "acedata", "limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = (await served.client.get("/tasks", params=params)).json()
        seen.extend(page["tasks"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(t["task_id"] for t in seen) == ids
    # Newest first, as instants and as text alike (SPEC §2: times sort as text).
    created = [parse_iso(t["created_at"]) for t in seen]
    assert created == sorted(created, reverse=True)
    assert [t["created_at"] for t in seen] == sorted((t["created_at"] for t in seen), reverse=True)
    by_status = (await served.client.get("/tasks", params={"status": "completed"})).json()
    assert by_status == {"tasks": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "done"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "garbage"}, "cursor"),
    ],
)
async def test_list_rejects_bad_parameters(
    served: Served, params: dict[str, Any], field: str
) -> None:
    response = await served.client.get("/tasks", params=params)
    assert response.status_code == 422
    assert response.json()["field"] == field


async def test_unknown_task_is_404(served: Served) -> None:
    for path in ("/tasks/kling/none", "/tasks/kling/none/events"):
        response = await served.client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "task_not_found"
    response = await served.client.post("/tasks/kling/none/poll")
    assert response.status_code == 404


async def test_wait_answers_when_the_task_becomes_terminal(served: Served) -> None:
    await served.client.post("/tasks", json={"provider": "acedata", "task_id": "w1"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(served.client.get("/tasks/acedata/w1", params={"wait": 30}))
    assert (await served.client.get("/healthz")).status_code == 200
    assert not waiting.done()  # a running task does not end the wait
    callback = await served.client.post(
        "/callbacks/acedata",
        json={
            "success": True,
            "task_id": "w1",
            "video_url": "https://cdn.example/w1.mp4",
            "state": "succeed",
        },
    )
    assert callback.status_code == 200
    response = await waiting
    assert response.json()["status"] == "completed"
    assert loop.time() - started < 30  # answered by the event, not by the end of the wait
    quick = await served.client.get("/tasks/acedata/w1", params={"wait": 30})
    assert quick.json()["status"] == "completed"
    bad = await served.client.get("/tasks/acedata/w1", params={"wait": 61})
    assert bad.status_code == 422


async def test_a_cursor_from_before_times_were_text_still_pages(served: Served) -> None:
    """Cursors handed out by earlier versions carried the creation time as Unix seconds."""
    for n in range(3):
        await served.client.post("/tasks", json={"provider": "kie", "task_id": f"k{n}"})
    first = (await served.client.get("/tasks", params={"limit": 1})).json()
    [newest] = first["tasks"]
    created = parse_iso(newest["created_at"])
    assert created is not None
    key = json.dumps([created.timestamp(), newest["provider"], newest["task_id"]])
    old = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    rest = (await served.client.get("/tasks", params={"cursor": old})).json()
    assert [t["task_id"] for t in rest["tasks"]] == ["k1", "k0"]

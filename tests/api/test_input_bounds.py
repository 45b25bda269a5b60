"""Input that can be read but not stored or served: numbers beyond what a deadline, a float
or JSON holds, strings cut inside a UTF-16 pair, absurd cursors and parameters. Each is
refused with a 4xx naming the field and leaves nothing behind, or is stored in a form that
every read route then serves."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.model import parse_iso
from reconciler.service import MAX_DEADLINE_SECONDS
from tests.api.live import Live, live_service
from tests.api.readback import Reader


@pytest.fixture
async def live(tmp_path: Path) -> Any:
    async with live_service(tmp_path) as served:
        yield served


async def read_back(live: Live, task: dict[str, Any]) -> None:
    """`task` reads back the same through every read route, each answer valid."""

    def read() -> None:
        with httpx.Client(base_url=live.url, timeout=10, trust_env=False) as client:
            Reader(client).task(task)

    await asyncio.to_thread(read)


async def nothing_stored(live: Live) -> None:
    page = (await live.client.get("/events")).json()
    assert page == {"events": [], "last_seq": 0}
    assert (await live.client.get("/tasks")).json()["tasks"] == []


def registration(**fields: str) -> bytes:
    """A registration of kling/t1 with each of `fields` written as raw JSON text."""
    members = ['"provider":"kling"', '"task_id":"t1"'] + [f'"{k}":{v}' for k, v in fields.items()]
    return ("{" + ",".join(members) + "}").encode()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (registration(deadline_seconds="1e308"), "deadline_seconds", "ten years"),
        (registration(deadline_seconds="1" + "0" * 30), "deadline_seconds", "ten years"),
        (registration(deadline_seconds="300000000000"), "deadline_seconds", "ten years"),
        (registration(deadline_seconds="315360000.5"), "deadline_seconds", "ten years"),
        (registration(deadline_seconds="NaN"), "deadline_seconds", "positive"),
        (registration(deadline_seconds="Infinity"), "deadline_seconds", "positive"),
        (registration(deadline_seconds="1e400"), "deadline_seconds", "positive"),
        (
            registration(metadata='{"x": NaN, "y": Infinity}'),
            "metadata",
            "metadata.x is NaN, which is not a JSON number",
        ),
        (
            registration(metadata='{"a": [1, {"b": -Infinity}]}'),
            "metadata",
            "metadata.a[1].b is -Infinity",
        ),
        (registration(metadata='{"a": -1' + "0" * 400 + "}"), "metadata", "metadata.a is"),
        (
            registration(metadata='{"a": ' + "[" * 128 + "]" * 128 + "}"),
            "metadata",
            "nests deeper than 128 levels",
        ),
    ],
)
async def test_what_cannot_be_stored_is_422_and_leaves_nothing(
    live: Live, body: bytes, field: str, words: str
) -> None:
    response = await live.client.post("/tasks", content=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["field"] == field
    assert answer["error"]["code"] == "invalid"
    assert words in answer["error"]["message"]
    assert (await live.client.get("/tasks/kling/t1")).status_code == 404
    await nothing_stored(live)


async def test_the_longest_deadline_and_deepest_metadata_are_taken(live: Live) -> None:
    metadata = "[" * 127 + "]" * 127
    body = registration(
        deadline_seconds=f"{MAX_DEADLINE_SECONDS:.0f}", metadata=f'{{"a":{metadata}}}'
    )
    response = await live.client.post("/tasks", content=body)
    assert response.status_code == 201, response.text
    task = response.json()
    created, deadline = parse_iso(task["created_at"]), parse_iso(task["deadline_at"])
    assert created and deadline and deadline - created == timedelta(seconds=MAX_DEADLINE_SECONDS)
    await read_back(live, task)


async def test_a_lone_surrogate_is_stored_as_the_replacement_character(live: Live) -> None:
    body = b'{"provider": "kling", "task_id": "t\\ud800", "metadata": {"\\udc00": ["x\\udbff"]}}'
    response = await live.client.post("/tasks", content=body)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["task_id"] == "t\ufffd"
    assert task["metadata"] == {"\ufffd": ["x\ufffd"]}
    await read_back(live, task)


KIE_SUCCESS = {
    "code": 200,
    "msg": "success",
    "data": {
        "taskId": "kie-1",
        "state": "success",
        "resultJson": '{"resultUrls": ["https://cdn.example/a\\ud800.mp4"]}',
    },
}


def kling(**fields: Any) -> dict[str, Any]:
    return {"task_id": "k1", "task_status": "processing", **fields}


@pytest.mark.parametrize(
    ("provider", "body", "expected"),
    [
        # Strings cut inside a UTF-16 pair, in fields the adapters store.
        ("kling", b'{"task_id": "k\\ud800", "task_status": "submitted"}', {"task_id": "k\ufffd"}),
        (
            "kling",
            b'{"task_id": "k1", "task_status": "proc\\udfff"}',
            {"provider_status": "proc\ufffd", "status": "submitted"},
        ),
        (
            "kling",
            b'{"task_id": "k1", "task_status": "failed", "task_status_msg": "bad \\ud83c"}',
            {"error": "bad \ufffd", "status": "failed"},
        ),
        ("kie", json.dumps(KIE_SUCCESS).encode(), {"status": "completed"}),
        # Times whose offset moves them past the first or the last day there is.
        ("kling", json.dumps(kling(updated_at="0001-01-01T00:00:00+01:00")).encode(), {}),
        ("kling", json.dumps(kling(created_at="9999-12-31T23:59:59-01:00")).encode(), {}),
        # Numbers that are not JSON, or beyond a float, where a progress or duration goes.
        (
            "kling",
            b'{"task_id": "k1", "task_status": "succeed", "updated_at": NaN, "task_result":'
            b' {"videos": [{"url": "https://cdn.example/v.mp4", "duration": 1e400}]}}',
            {"status": "completed"},
        ),
        (
            "gateway",
            b'{"task_id": "g1", "status": "IN_PROGRESS", "progress": -Infinity}',
            {"status": "processing", "progress": None},
        ),
    ],
)
async def test_callback_values_that_json_cannot_carry_are_stored_servable(
    live: Live, provider: str, body: bytes, expected: dict[str, Any]
) -> None:
    response = await live.client.post(f"/callbacks/{provider}", content=body)
    assert response.status_code == 200, response.text
    task = response.json()["task"]
    assert {key: task[key] for key in expected} == expected
    for video in task["videos"]:
        assert "\ud800" not in video["url"] and video["duration"] is None
    await read_back(live, task)


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


CURSORS = [
    "[1" + "0" * 400 + ', "kling", "t"]',  # beyond a float
    '[1e400, "kling", "t"]',
    '[NaN, "kling", "t"]',
    '[-Infinity, "kling", "t"]',
    '["1.5", "kling", "t"]',
    '[true, "kling", "t"]',
    '[1, {"a": 1}, ["t"]]',
    '[1, "kling"]',
    '{"a": 1}',
    "[" * 5000 + "]" * 5000,
    "not json",
]


async def test_a_cursor_it_did_not_hand_out_is_422(live: Live) -> None:
    for key in CURSORS:
        response = await live.client.get("/tasks", params={"cursor": cursor(key)})
        assert response.status_code == 422, (key[:40], response.text)
        assert response.json()["field"] == "cursor"


async def test_a_cursor_with_a_lone_surrogate_reads_a_page(live: Live) -> None:
    response = await live.client.get("/tasks", params={"cursor": cursor('[1, "kling", "\\ud800"]')})
    assert response.status_code == 200, response.text
    assert response.json() == {"tasks": [], "next_cursor": None}


# Negative, past the maximum, not a number, not finite, beyond a float, beyond int()'s digits.
ABSURD = ["-1", "1e3", "nan", "inf", "-inf", "1e400", "0x10", "ten", "1" + "0" * 5000]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/tasks", "limit"),
        ("/events", "limit"),
        ("/events", "after"),
        ("/events", "wait"),
        ("/tasks/kling/t1", "wait"),
        ("/events/stream", "after"),
    ],
)
async def test_absurd_parameters_are_422(live: Live, path: str, name: str) -> None:
    for value in ABSURD:
        response = await live.client.get(path, params={name: value})
        assert response.status_code == 422, (value[:20], response.text)
        assert response.json()["field"] == name


async def test_a_last_event_id_that_is_no_seq_is_422(live: Live) -> None:
    for header in [b"\xb2", b"1\xb9", b"-1", b"1e3", b"99999999999999999999"]:
        response = await live.client.get("/events/stream", headers={"Last-Event-ID": header})
        assert response.status_code == 422, (header, response.text)
        assert response.json()["field"] == "Last-Event-ID"


async def test_after_is_checked_also_when_last_event_id_is_given(live: Live) -> None:
    response = await live.client.get(
        "/events/stream", params={"after": "x"}, headers={"Last-Event-ID": "1"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "after"

"""Reading back what the service stored, through every read route, each answer checked
against the OpenAPI document: the task, its events, the task list, the event log and the
event stream. Synchronous, for property tests that run in a worker thread beside the
server's event loop."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

from tests.api.test_openapi import DOC, validator

SCHEMAS = DOC["components"]["schemas"]
VALID = {name: validator({"$ref": f"#/components/schemas/{name}"}) for name in SCHEMAS}


def valid(name: str, response: httpx.Response) -> Any:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    errors = [error.message for error in VALID[name].iter_errors(body)]
    assert not errors, (name, errors, response.text[:500])
    return body


class Reader:
    """Reads what the service stored through every read route, checking each answer."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.seen = 0  # the event log read so far

    def new_events(self) -> list[dict[str, Any]]:
        """The events written since the last call, each valid."""
        response = self.client.get("/events", params={"after": self.seen, "limit": 1000})
        assert response.status_code == 200, response.text
        page = valid("EventPage", response)
        self.seen = page["last_seq"]
        events: list[dict[str, Any]] = page["events"]
        return events

    def task(self, task: dict[str, Any]) -> None:
        """`task`, as just answered, reads back the same, with its history and in lists."""
        provider, task_id = task["provider"], task["task_id"]
        path = f"/tasks/{quote(provider, safe='')}/{quote(task_id, safe='')}"
        response = self.client.get(path)
        assert response.status_code == 200, response.text
        assert valid("Task", response) == task
        response = self.client.get(path + "/events")
        assert response.status_code == 200, response.text
        history = valid("EventPage", response)["events"]
        assert history and all(e["task_id"] == task_id for e in history)
        response = self.client.get("/tasks", params={"provider": provider, "limit": 5})
        assert response.status_code == 200, response.text
        valid("TaskPage", response)
        response = self.client.get("/events", params={"provider": provider, "task_id": task_id})
        assert response.status_code == 200, response.text
        assert valid("EventPage", response)["events"] == history
        assert self.streamed(provider, task_id, history[-1]["seq"] - 1) == history[-1]

    def streamed(self, provider: str, task_id: str, after: int) -> Any:
        """The first event the stream sends after `after` for this task. Lines end at LF
        only, as an EventSource reads them: a task's text may hold U+2028 and the like,
        which `iter_lines` would split on."""
        params = {"provider": provider, "task_id": task_id, "after": after}
        with self.client.stream("GET", "/events/stream", params=params) as response:
            assert response.status_code == 200
            buffer = b""
            for chunk in response.iter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        event = json.loads(line.removeprefix(b"data: "))
                        VALID["Event"].validate(event)
                        return event
        raise AssertionError("the stream ended before its first event")

"""/openapi.json describes the whole API: every route is in it, the document is well formed,
and real responses from a running server validate against its schemas."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Route

from reconciler.api import callbacks, openapi, routes
from reconciler.api.stream import Streams
from tests.api.live import Live, SSEReader, kling_callback, live_service

DOC = openapi.document()
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Validate against one schema of the document, resolving `#/components/...` in it."""
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    root["components"] = DOC["components"]
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_document_is_well_formed() -> None:
    assert DOC["openapi"] == "3.1.0"
    for target in refs(DOC):
        assert target.startswith("#/components/"), target
        node: Any = DOC
        for part in target[2:].split("/"):
            node = node[part]
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for template, item in DOC["paths"].items():
        declared = set(re.findall(r"{(\w+)}", template))
        for method, operation in item.items():
            assert method in HTTP_METHODS
            assert operation["responses"], (template, method)
            params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert params == declared, (template, method)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status)
                assert response["description"]
    # It is what the server serves, as JSON.
    assert json.loads(json.dumps(DOC)) == DOC


def test_every_route_is_described_and_nothing_else() -> None:
    served = {(callbacks.TEMPLATE, "post")}  # served by App itself, ahead of the router
    for route in routes():
        assert isinstance(route, Route)
        template = re.sub(r":\w+}", "}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((template, method.lower()))
    documented = {(t, m) for t, item in DOC["paths"].items() for m in item}
    assert served == documented


class Conformance:
    """Checks responses against the document and records what was checked."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, response: httpx.Response, template: str, method: str) -> None:
        status = str(response.status_code)
        operation = DOC["paths"][template][method]
        assert status in operation["responses"], (template, method, status, response.text)
        documented = operation["responses"][status]
        media = response.headers.get("content-type", "").split(";")[0]
        assert media in documented["content"], (template, method, status, media)
        schema = documented["content"][media]["schema"]
        if media == "application/json":
            errors = list(validator(schema).iter_errors(response.json()))
            assert not errors, (template, method, status, [e.message for e in errors])
        self.seen.add((template, method, status))

    def check_events(self, frames: list[Any]) -> None:
        media = DOC["paths"]["/events/stream"]["get"]["responses"]["200"]["content"]
        item = validator(media["text/event-stream"]["x-item-schema"])
        for frame in frames:
            event = frame.json()
            item.validate(event)
            assert (frame.id, frame.event) == (event["seq"], event["type"])


@pytest.fixture
def conformance() -> Conformance:
    return Conformance()


async def exercise(live: Live, c: Conformance) -> None:
    client = live.client
    # webhooks
    response = await client.post("/callbacks/kling", content=kling_callback("cb1", "processing"))
    c.check(response, "/callbacks/{provider}", "post")
    c.check(await client.post("/callbacks/kling", content=b"{"), "/callbacks/{provider}", "post")
    c.check(await client.post("/callbacks/nope", content=b"{}"), "/callbacks/{provider}", "post")
    too_big = b"x" * (live.service.settings.max_body_bytes + 1)
    c.check(await client.post("/callbacks/kling", content=too_big), "/callbacks/{provider}", "post")
    # tasks
    body = {"provider": "kling", "task_id": "t/1", "action": "image2video", "metadata": {"u": 1}}
    c.check(await client.post("/tasks", json=body), "/tasks", "post")
    c.check(await client.post("/tasks", json=body), "/tasks", "post")
    c.check(await client.post("/tasks", json={"provider": "kling"}), "/tasks", "post")
    c.check(await client.post("/tasks", content=b"nope"), "/tasks", "post")
    response = await client.post("/callbacks/kling", content=kling_callback("t/1"))
    c.check(response, "/callbacks/{provider}", "post")
    c.check(await client.get("/tasks", params={"limit": 1}), "/tasks", "get")
    c.check(await client.get("/tasks", params={"status": "done"}), "/tasks", "get")
    one = "/tasks/{provider}/{task_id}"
    c.check(await client.get("/tasks/kling/t/1", params={"wait": 1}), one, "get")
    c.check(await client.get("/tasks/kling/missing"), one, "get")
    c.check(await client.get("/tasks/kling/t/1", params={"wait": "soon"}), one, "get")
    c.check(await client.get("/tasks/kling/t/1/events"), one + "/events", "get")
    c.check(await client.get("/tasks/kling/missing/events"), one + "/events", "get")
    c.check(await client.post("/tasks/kling/t/1/poll"), one + "/poll", "post")
    c.check(await client.post("/tasks/kling/missing/poll"), one + "/poll", "post")
    # events
    c.check(await client.get("/events", params={"after": 0, "limit": 2}), "/events", "get")
    c.check(await client.get("/events", params={"limit": 0}), "/events", "get")
    async with client.stream("GET", "/events/stream") as stream:
        c.check(stream, "/events/stream", "get")
        c.check_events(await SSEReader(stream).events(3))
    c.check(await client.get("/events/stream", params={"after": "x"}), "/events/stream", "get")
    # operations
    c.check(await client.get("/healthz"), "/healthz", "get")
    c.check(await client.get("/readyz"), "/readyz", "get")
    live.service.health.loop_running = True
    c.check(await client.get("/readyz"), "/readyz", "get")
    c.check(await client.get("/metrics"), "/metrics", "get")
    c.check(await client.get("/stats"), "/stats", "get")
    c.check(await client.get("/openapi.json"), "/openapi.json", "get")
    c.check(await client.get("/"), "/", "get")


async def test_real_responses_match_the_document(tmp_path: Path, conformance: Conformance) -> None:
    async with live_service(tmp_path) as live:
        await exercise(live, conformance)
        served = (await live.client.get("/openapi.json")).json()
        assert served == DOC
    # Every operation's success answer was checked, and the common errors with it.
    for template, item in DOC["paths"].items():
        for method, operation in item.items():
            success = min(s for s in operation["responses"] if s.startswith("2"))
            assert (template, method, success) in conformance.seen, (template, method)
    for expected in [
        ("/callbacks/{provider}", "post", "400"),
        ("/callbacks/{provider}", "post", "404"),
        ("/callbacks/{provider}", "post", "413"),
        ("/tasks", "post", "201"),
        ("/tasks", "post", "422"),
        ("/tasks/{provider}/{task_id}", "get", "404"),
        ("/readyz", "get", "503"),
    ]:
        assert expected in conformance.seen


async def test_refusals_match_the_document(tmp_path: Path, conformance: Conformance) -> None:
    environ = {"RECONCILER_API_TOKEN": "t0ken", "RECONCILER_CALLBACK_TOKEN": "cb"}
    async with live_service(tmp_path, environ, streams=Streams(heartbeat_seconds=5)) as live:
        for template, item in DOC["paths"].items():
            for method, operation in item.items():
                if "401" not in operation["responses"]:
                    continue
                url = re.sub(r"{(\w+)}", lambda m: "kling" if m[1] == "provider" else "x", template)
                response = await live.client.request(method.upper(), url, content=b"{}")
                assert response.status_code == 401, (template, method)
                conformance.check(response, template, method)

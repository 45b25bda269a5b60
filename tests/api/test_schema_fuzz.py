"""schemathesis over every operation of the live `/openapi.json`: whatever it generates from
the document, valid (positive) or not (negative), the service answers without a 5xx, with a
status, media type and body that the document describes.

The service is the real one behind uvicorn on 127.0.0.1 (`live_service`), and schemathesis
sends its requests from a worker thread so that the server keeps running on the test's
event loop. Generation is derandomized and bounded per operation: the same examples on
every run, and no per-example deadline.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reconciler.api import openapi
from tests.api.live import Live, kling_callback, live_service

EXAMPLES = 30
OPERATIONS = [
    pytest.param(method.upper(), path, id=f"{method.upper()} {path}")
    for path, item in openapi.document()["paths"].items()
    for method in item
]
# A long-poll that waits for nothing is not what is fuzzed here (tests/api/test_read.py
# covers the wait): valid waits are shortened so that each example answers at once.
SHORT_WAIT = 0.01
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# What is checked of every answer: no 5xx; a status, media type, headers and body that the
# document gives for the operation; schema-violating input refused with a 4xx; and no
# answer without the API token where the document asks for it. (Not "schema-valid input is
# accepted": a cursor is any string to the document, but only the ones it handed out work.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


async def seed(live: Live) -> None:
    """A few settled tasks and their events, so that lists and pages have rows to check."""
    for task_id in ("0", "a", "t/1"):
        response = await live.client.post(
            "/tasks", json={"provider": "kling", "task_id": task_id, "metadata": {"n": 1}}
        )
        assert response.status_code == 201, response.text
        response = await live.client.post("/callbacks/kling", content=kling_callback(task_id))
        assert response.status_code == 200, response.text


def shorten_waits(case: schemathesis.Case) -> None:
    query = case.query
    if isinstance(query, dict):
        wait = query.get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > SHORT_WAIT:
            query["wait"] = SHORT_WAIT


def loopback() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names
    session.headers.update(AUTH)
    return session


def live_schema(session: requests.Session, url: str) -> schemathesis.BaseSchema:
    response = session.get(f"{url}/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    return schemathesis.openapi.from_dict(response.json())


def fuzz(url: str, method: str, path: str) -> None:
    with loopback() as session:
        operation = live_schema(session, url)[path][method]
        modes = [operation.as_strategy(GenerationMode.POSITIVE)]
        if operation.query or operation.headers or operation.body:
            modes.append(operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=st.one_of(modes))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        def check(case: schemathesis.Case) -> None:
            shorten_waits(case)
            response = case.call(base_url=url, session=session, timeout=10)
            case.validate_response(response, checks=CHECKS, headers=AUTH)

        check()


async def test_every_live_operation_is_fuzzed(tmp_path: Path) -> None:
    async with live_service(tmp_path, {"RECONCILER_API_TOKEN": TOKEN}) as live:
        with loopback() as session:
            schema = await asyncio.to_thread(live_schema, session, live.url)
    operations = [result.ok() for result in schema.get_all_operations()]  # none invalid
    fuzzed = {(param.values[0], param.values[1]) for param in OPERATIONS}
    assert {(op.method.upper(), op.path) for op in operations} == fuzzed


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
async def test_operation(tmp_path: Path, method: str, path: str) -> None:
    async with live_service(tmp_path, {"RECONCILER_API_TOKEN": TOKEN}) as live:
        live.client.headers.update(AUTH)
        await seed(live)
        live.service.health.loop_running = True  # ready: /readyz answers 200
        # Every stream ends as soon as it has started: a fuzzed request that opens one must
        # get its whole answer, not wait on an endless body.
        live.streams.close()
        await asyncio.to_thread(fuzz, live.url, method, path)

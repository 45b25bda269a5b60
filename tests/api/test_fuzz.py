"""Hostile bodies against the live service: registrations and each provider's callbacks,
built by the strategies in `tests/api/hostile.py`.

Whatever comes in, the answer is never a 5xx and matches the OpenAPI document; a refused
registration stores nothing; and whatever was stored reads back through every read route
(the task, its events, the task list, the event log and the event stream), each answer valid
against the document. Examples run in a worker thread with a synchronous client, so that the
server keeps running on the test's event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from reconciler.config import PROVIDER_NAMES
from tests.api.hostile import callbacks, encode, registrations
from tests.api.live import live_service
from tests.api.readback import Reader, valid

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz_registrations(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        reader = Reader(client)

        @FUZZ
        @given(body=registrations)
        def check(body: Any) -> None:
            content = encode(body)
            response = client.post("/tasks", content=content)
            assert response.status_code in (200, 201, 400, 422), (content[:500], response.text)
            events = reader.new_events()
            if response.status_code >= 400:
                valid("Error", response)
                assert events == [], "a refused registration stored something"
                return
            task = valid("Task", response)
            assert [e["type"] for e in events] == (
                ["task.registered"] if response.status_code == 201 else []
            )
            reader.task(task)

        check()


def fuzz_callbacks(url: str, provider: str) -> None:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        reader = Reader(client)

        @FUZZ
        @given(body=callbacks(provider))
        def check(body: Any) -> None:
            content = encode(body)
            response = client.post(f"/callbacks/{provider}", content=content)
            assert response.status_code in (200, 400), (content[:500], response.text)
            reader.new_events()
            if response.status_code == 400:
                assert isinstance(valid("Error", response)["delivery_id"], int)  # kept
                return
            answer = valid("CallbackResult", response)
            if answer["task"] is not None:
                reader.task(answer["task"])

        check()


async def test_hostile_registrations(tmp_path: Path) -> None:
    async with live_service(tmp_path) as live:
        await asyncio.to_thread(fuzz_registrations, live.url)


@pytest.mark.parametrize("provider", PROVIDER_NAMES)
async def test_hostile_callbacks(tmp_path: Path, provider: str) -> None:
    async with live_service(tmp_path) as live:
        await asyncio.to_thread(fuzz_callbacks, live.url, provider)

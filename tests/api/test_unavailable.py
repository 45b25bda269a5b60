"""SPEC §4: when the store cannot commit, nothing is acknowledged: 503, and the sender
tries again later."""

from __future__ import annotations

from tests.conftest import StartService


async def test_a_write_the_store_cannot_commit_answers_503(start_service: StartService) -> None:
    served = await start_service()
    await served.runtime.store.close()  # as good as a database that refuses every write
    callback = await served.client.post(
        "/callbacks/kling", json={"task_id": "1", "task_status": "submitted"}
    )
    registration = await served.client.post("/tasks", json={"provider": "kling", "task_id": "1"})
    for response in (callback, registration):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "store_unavailable"
        assert response.headers["retry-after"] == "5"

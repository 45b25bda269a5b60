"""The provider simulator over real HTTP: shapes, lifecycle, auth, callbacks, faults, control.

Time is a FakeClock advanced by the tests; callbacks go to a small Starlette receiver served
on another loopback port and are sent with `deliver_due()`. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reconciler.clock import FakeClock
from reconciler.simulator import Faults, RecordedRequest, Simulator

# -- fixtures and helpers --------------------------------------------------------------


class Receiver:
    """The application side of callbacks: records every POST it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str | None, Any]] = []
        self.arrived = asyncio.Event()
        self.base = ""

    def url(self, provider: str) -> str:
        return f"{self.base}/callbacks/{provider}?token=t"

    def bodies(self, provider: str | None = None) -> list[Any]:
        return [body for name, _, body in self.received if provider in (None, name)]

    async def endpoint(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.received.append(
            (request.path_params["provider"], request.query_params.get("token"), body)
        )
        self.arrived.set()
        return JSONResponse({"ok": True})


@asynccontextmanager
async def serve_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/callbacks/{provider}", receiver.endpoint, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    receiver.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield receiver
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as served:
        yield served


def kling_token(sim: Simulator, clock: FakeClock, **claims: Any) -> str:
    env = sim.environ()
    now = clock.now().timestamp()
    secret = claims.pop("secret", env["KLING_SECRET_KEY"])
    payload = {"iss": env["KLING_ACCESS_KEY"], "exp": now + 1800, "nbf": now - 5} | claims
    return jwt.encode(payload, secret, algorithm="HS256")


def client_for(sim: Simulator, clock: FakeClock, provider: str, **kwargs: Any) -> httpx.AsyncClient:
    env = sim.environ()
    if provider == "kling":
        token = kling_token(sim, clock)
    else:
        key = {"cometapi": "COMETAPI_KEY", "gateway": "GATEWAY_API_KEY"}
        key |= {"acedata": "ACEDATA_API_TOKEN", "kie": "KIE_API_KEY"}
        token = env[key[provider]]
    return httpx.AsyncClient(
        base_url=sim.base_url(provider), headers={"Authorization": f"Bearer {token}"}, **kwargs
    )


# -- Kling ------------------------------------------------------------------------------


async def test_kling_query_follows_the_clock(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kling", processing_after=5, finish_after=60, external_task_id="ext-1")
    url = f"/v1/videos/text2video/{task.task_id}"
    async with client_for(sim, clock, "kling") as client:
        first = (await client.get(url)).json()
        assert first["code"] == 0 and first["message"] == "SUCCEED" and first["request_id"]
        data = first["data"]
        assert data["task_status"] == "submitted" and data["task_result"] == {}
        assert data["task_info"] == {"external_task_id": "ext-1"}
        assert data["created_at"] == int(clock.now().timestamp() * 1000)
        assert sim.truth("kling", task.task_id) == "submitted"

        clock.advance(5)
        assert (await client.get(url)).json()["data"]["task_status"] == "processing"
        assert sim.truth("kling", task.task_id) == "processing"

        clock.advance(55)
        data = (await client.get(url)).json()["data"]
        assert data["task_status"] == "succeed" and data["task_status_msg"] == ""
        assert data["task_result"]["videos"] == [
            {"id": task.video_id, "url": task.video_url, "duration": "5.1"}
        ]
        assert data["updated_at"] - data["created_at"] == 60_000
        assert sim.truth("kling", task.task_id) == task.final_status == "completed"

        by_external = (await client.get("/v1/videos/text2video/ext-1")).json()
        assert by_external["data"]["task_id"] == task.task_id


async def test_kling_failure_keeps_message_succeed(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kling", "image2video", outcome="failed", finish_after=10)
    clock.advance(10)
    async with client_for(sim, clock, "kling") as client:
        body = (await client.get(f"/v1/videos/image2video/{task.task_id}")).json()
    assert body["message"] == "SUCCEED" and body["data"]["task_status"] == "failed"
    assert body["data"]["task_status_msg"] == "Image pixel is invalid"
    assert task.video_url is None and sim.truth("kling", task.task_id) == "failed"


async def test_kling_unknown_task_or_wrong_action_is_404_1203(
    sim: Simulator, clock: FakeClock
) -> None:
    task = sim.create_task("kling", "text2video")
    async with client_for(sim, clock, "kling") as client:
        for path in ("/v1/videos/text2video/nope", f"/v1/videos/image2video/{task.task_id}"):
            response = await client.get(path)
            assert response.status_code == 404 and response.json()["code"] == 1203


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"iss": "someone-else"}, 1002),
        ({"secret": "a-different-secret-of-at-least-32-bytes"}, 1002),
        ({"nbf": 2_000_000_000}, 1003),
        ({"exp": 1_000}, 1004),
    ],
)
async def test_kling_jwt_rejections(
    sim: Simulator, clock: FakeClock, claims: dict[str, Any], code: int
) -> None:
    task = sim.create_task("kling")
    headers = {"Authorization": f"Bearer {kling_token(sim, clock, **claims)}"}
    async with httpx.AsyncClient(base_url=sim.base_url("kling"), headers=headers) as client:
        response = await client.get(f"/v1/videos/text2video/{task.task_id}")
    assert response.status_code == 401 and response.json()["code"] == code


async def test_kling_jwt_expires_on_the_simulator_clock(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kling")
    path = f"/v1/videos/text2video/{task.task_id}"
    async with client_for(sim, clock, "kling") as client:  # minted at clock.now(), exp +1800 s
        assert (await client.get(path)).status_code == 200
        clock.advance(1799)
        assert (await client.get(path)).status_code == 200
        clock.advance(1)
        expired = await client.get(path)
        assert expired.status_code == 401 and expired.json()["code"] == 1004
        empty = await client.get(path, headers={"Authorization": ""})
        assert empty.status_code == 401 and empty.json()["code"] == 1001


async def test_kling_list_is_a_bare_array_newest_first_per_action(
    sim: Simulator, clock: FakeClock
) -> None:
    ids = []
    for _ in range(5):
        ids.append(sim.create_task("kling", "text2video").task_id)
        clock.advance(1)
    sim.create_task("kling", "image2video")
    async with client_for(sim, clock, "kling") as client:
        pages = [
            (await client.get("/v1/videos/text2video", params={"pageNum": n, "pageSize": 2})).json()
            for n in (1, 2, 3, 4)
        ]
        assert all(isinstance(page["data"], list) for page in pages)
        listed = [task["task_id"] for page in pages for task in page["data"]]
        assert listed == ids[::-1] and pages[3]["data"] == []
        default = (await client.get("/v1/videos/text2video")).json()["data"]
        assert len(default) == 5
        too_big = await client.get("/v1/videos/text2video", params={"pageSize": 501})
        assert too_big.status_code == 400 and too_big.json()["code"] == 1201
    assert [r.kind for r in sim.requests] == ["list"] * 6


async def test_kling_create_endpoint_and_its_callbacks(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    body = {"prompt": "a cat", "callback_url": receiver.url("kling"), "external_task_id": "e-9"}
    async with client_for(sim, clock, "kling") as client:
        created = (await client.post("/v1/videos/text2video", json=body)).json()
        again = await client.post("/v1/videos/text2video", json=body)  # external id reused
    assert created["code"] == 0 and created["data"]["task_status"] == "submitted"
    task_id = created["data"]["task_id"]
    assert again.status_code == 400 and again.json()["code"] == 1201
    assert sim.truth("kling", task_id) == "submitted"

    assert await sim.deliver_due() == 1  # "submitted" is a status change too
    clock.advance(5)
    assert await sim.deliver_due() == 1
    clock.advance(55)
    assert await sim.deliver_due() == 1
    assert await sim.deliver_due() == 0
    bodies = receiver.bodies("kling")
    assert [b["task_status"] for b in bodies] == ["submitted", "processing", "succeed"]
    assert all("code" not in b and b["task_id"] == task_id for b in bodies)  # no envelope
    assert bodies[-1]["task_info"]["external_task_id"] == "e-9"
    assert bodies[-1]["task_result"]["videos"][0]["url"].startswith("https://cdn.klingai.com/")
    assert {token for _, token, _ in receiver.received} == {"t"}
    assert [(c.status, c.response_status) for c in sim.callbacks_sent] == [
        ("submitted", 200),
        ("processing", 200),
        ("completed", 200),
    ]
    assert [r.kind for r in sim.requests] == ["create", "create"]


# -- CometAPI and gateway ---------------------------------------------------------------


async def test_cometapi_passthrough_bearer_and_errors(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("cometapi", "avatar/image2video", finish_after=30)
    clock.advance(30)
    path = f"/kling/v1/videos/avatar/image2video/{task.task_id}"
    async with client_for(sim, clock, "cometapi") as client:
        body = (await client.get(path)).json()
        assert body["code"] == 0 and body["data"]["task_status"] == "succeed"
        assert body["data"]["task_result"]["videos"][0]["url"] == task.video_url
        missing = await client.get("/kling/v1/videos/avatar/image2video/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "comet_api_error"
        denied = await client.get(path, headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    assert set(denied.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("rendering", "running", "done"),
    [
        ("taskdto", ("IN_PROGRESS", "30%"), ("SUCCESS", "100%")),
        ("simplified", "processing", "succeeded"),
        ("kling-native", "processing", "succeed"),
        ("openai", "in_progress", "completed"),
    ],
)
async def test_gateway_renderings(
    sim: Simulator, clock: FakeClock, rendering: str, running: Any, done: Any
) -> None:
    task = sim.create_task("gateway", rendering=rendering, processing_after=5, finish_after=60)
    path = f"/kling/v1/videos/text2video/{task.task_id}"
    async with client_for(sim, clock, "gateway") as client:
        clock.advance(5)
        mid = (await client.get(path)).json()
        clock.advance(55)
        end = (await client.get(path)).json()
    if rendering == "taskdto":
        assert (mid["data"]["status"], mid["data"]["progress"]) == running
        assert (end["data"]["status"], end["data"]["progress"]) == done
        assert end["code"] == "success" and end["data"]["fail_reason"] == task.video_url
        assert end["data"]["finish_time"] == int(task.finished_at.timestamp())
        assert mid["data"]["finish_time"] == 0
        inner = end["data"]["data"]
        assert inner["code"] == 0 and inner["data"]["task_status"] == "succeed"
    elif rendering == "simplified":
        assert mid["data"]["status"] == running and mid["data"]["url"] == ""
        assert end["data"]["status"] == done and end["data"]["url"] == task.video_url
        assert end["data"]["error"] is None and end["data"]["format"] == "mp4"
    elif rendering == "kling-native":
        assert task.task_id.startswith("task_")
        assert mid["data"]["task_status"] == running and end["data"]["task_status"] == done
        assert end["data"]["created_at"] == int(task.created_at.timestamp())  # seconds
        video = end["data"]["task_result"]["videos"][0]
        assert video["watermark_url"] and end["data"]["task_result"]["images"] is None
    else:
        assert "code" not in end and mid["status"] == running and end["status"] == done
        assert end["url"] == task.video_url and end["error"] == {"code": 0, "message": ""}
        assert end["metadata"]["duration"] == 5.1


async def test_gateway_failure_reason_and_unknown_task(sim: Simulator, clock: FakeClock) -> None:
    current = sim.create_task("gateway", outcome="failed", finish_after=1, error_message="nsfw")
    legacy = sim.create_task(
        "gateway", rendering="taskdto-legacy", outcome="failed", finish_after=1
    )
    clock.advance(1)
    async with client_for(sim, clock, "gateway") as client:
        get = client.get
        one = (await get(f"/kling/v1/videos/text2video/{current.task_id}")).json()["data"]
        two = (await get(f"/kling/v1/videos/text2video/{legacy.task_id}")).json()["data"]
        missing = await get("/kling/v1/videos/text2video/task_nope")
    assert (one["status"], one["fail_reason"]) == ("FAILURE", "nsfw")
    assert (two["status"], two["fail_reason"]) == ("FAILURE", "SUCCEED")
    assert two["data"]["data"]["task_status_msg"] == "Image pixel is invalid"
    assert missing.status_code == 400
    assert missing.json() == {"code": "task_not_exist", "message": "task_not_exist", "data": None}


# -- AceData ----------------------------------------------------------------------------


async def test_acedata_retrieve_record_shapes(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("acedata", processing_after=5, finish_after=60)
    retrieve = {"action": "retrieve", "id": task.task_id}
    async with client_for(sim, clock, "acedata") as client:
        fresh = (await client.post("/kling/tasks", json=retrieve)).json()
        clock.advance(5)
        running = (await client.post("/kling/tasks", json=retrieve)).json()
        clock.advance(55)
        done = (await client.post("/kling/tasks", json=retrieve)).json()
        unknown = await client.post("/kling/tasks", json={"action": "retrieve", "id": "nope"})
        bad = await client.post("/kling/tasks", json={"action": "delete"})
        denied = await client.post("/kling/tasks", json=retrieve, headers={"Authorization": "x"})
    assert fresh["id"] == task.task_id and fresh["type"] == "videos" and "response" not in fresh
    assert fresh["job_id"].startswith("Cj") and isinstance(fresh["created_at"], float)
    assert "success" not in running["response"] and "finished_at" not in running
    assert done["response"] == {
        "success": True,
        "video_id": task.video_id,
        "video_url": task.video_url,
        "duration": "5.1",
        "state": "succeed",
        "task_id": task.task_id,
    }
    assert done["finished_at"] == task.finished_at.timestamp()
    assert unknown.status_code == 200 and unknown.json() == {}
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    assert denied.status_code == 401 and denied.json()["success"] is False
    assert denied.json()["error"]["code"] == "invalid_token" and denied.json()["trace_id"]


async def test_acedata_batch_is_shuffled_and_omits_unknown_ids(
    sim: Simulator, clock: FakeClock
) -> None:
    ids = [sim.create_task("acedata").task_id for _ in range(20)]
    async with client_for(sim, clock, "acedata") as client:
        body = {"action": "retrieve_batch", "ids": [*ids, "unknown-1", "unknown-2"]}
        answer = (await client.post("/kling/tasks", json=body)).json()
    returned = [item["id"] for item in answer["items"]]
    assert answer["count"] == 20 and sorted(returned) == sorted(ids)
    assert returned != ids  # 20! orders: the seeded shuffle is not the identity
    [request] = sim.requests
    assert request.kind == "batch" and request.task_ids == (*ids, "unknown-1", "unknown-2")


async def test_acedata_create_and_flat_callbacks(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    async with client_for(sim, clock, "acedata") as client:
        created = await client.post(
            "/kling/videos", json={"action": "text2video", "callback_url": receiver.url("acedata")}
        )
    ok_id = created.json()["task_id"]
    failed = sim.create_task("acedata", callback_url=receiver.url("acedata"), outcome="failed")
    clock.advance(30)
    assert await sim.deliver_due() == 0  # AceData calls back only at the end
    clock.advance(30)
    assert await sim.deliver_due() == 2
    ok, bad = sorted(receiver.bodies("acedata"), key=lambda b: b["task_id"] != ok_id)
    assert ok["success"] is True and ok["state"] == "succeed" and ok["task_id"] == ok_id
    assert set(ok) == {
        "success",
        "video_id",
        "video_url",
        "duration",
        "state",
        "task_id",
        "trace_id",
    }
    assert bad == {
        "success": False,
        "task_id": failed.task_id,
        "trace_id": failed.trace_id,
        "error": {"code": "api_error", "message": "Image pixel is invalid"},
    }


# -- Kie --------------------------------------------------------------------------------


async def test_kie_jobs_record_info(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kie", processing_after=10, finish_after=60)
    async with client_for(sim, clock, "kie") as client:

        async def data() -> dict[str, Any]:
            body = (
                await client.get("/api/v1/jobs/recordInfo", params={"taskId": task.task_id})
            ).json()
            assert body["code"] == 200 and body["msg"] == "success"
            return body["data"]  # type: ignore[no-any-return]

        states = []
        for step in (0, 6, 4, 50):
            clock.advance(step)
            states.append((await data())["state"])
        done = await data()
        veo_path = await client.get("/api/v1/veo/record-info", params={"taskId": task.task_id})
        denied = await client.get("/api/v1/jobs/recordInfo", headers={"Authorization": "Bearer x"})
    assert states == ["waiting", "queuing", "generating", "success"]
    assert json.loads(done["resultJson"]) == {"resultUrls": [task.video_url]}
    assert done["model"] == "kling-2.6/text-to-video" and done["createTime"] < done["updateTime"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(done["param"])  # Kie's own example is not valid JSON either
    assert veo_path.status_code == 404 and veo_path.json()["code"] == 404  # a jobs task
    assert denied.status_code == 401
    assert denied.json()["msg"] == "You do not have access permissions"


async def test_kie_veo_record_info_and_callbacks(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    veo = sim.create_task("kie", "veo", callback_url=receiver.url("kie"), finish_after=60)
    job = sim.create_task("kie", "jobs", callback_url=receiver.url("kie"), outcome="failed")
    async with client_for(sim, clock, "kie") as client:
        params = {"taskId": veo.task_id}
        running = (await client.get("/api/v1/veo/record-info", params=params)).json()["data"]
        clock.advance(60)
        done = (await client.get("/api/v1/veo/record-info", params=params)).json()["data"]
    assert running["successFlag"] == 0 and running["response"] is None
    assert running["completeTime"] is None
    assert done["successFlag"] == 1 and done["response"]["resultUrls"] == [veo.video_url]
    assert done["createTime"] == veo.created_at.strftime("%Y-%m-%d %H:%M:%S")

    assert await sim.deliver_due() == 2
    by_id = {body["data"]["taskId"]: body for body in receiver.bodies("kie")}
    assert by_id[veo.task_id]["code"] == 200
    assert by_id[veo.task_id]["data"]["info"]["resultUrls"] == [veo.video_url]
    assert by_id[job.task_id]["code"] == 501
    assert by_id[job.task_id]["data"]["state"] == "fail"
    assert by_id[job.task_id]["data"]["failMsg"] == "Image pixel is invalid"


# -- callbacks --------------------------------------------------------------------------


async def test_kling_shaped_callbacks_for_cometapi_and_gateway(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    for provider in ("cometapi", "gateway"):
        sim.create_task(provider, callback_url=receiver.url(provider), processing_after=0)
    clock.advance(60)
    assert await sim.deliver_due() == 4  # born processing: "processing" and the terminal one
    for provider in ("cometapi", "gateway"):
        statuses = [b["task_status"] for b in receiver.bodies(provider)]
        assert statuses == ["processing", "succeed"]


async def test_unreachable_callback_url_is_recorded(sim: Simulator, clock: FakeClock) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    sim.create_task("acedata", callback_url=f"http://127.0.0.1:{port}/cb", finish_after=1)
    clock.advance(1)
    assert await sim.deliver_due() == 1
    [record] = sim.callbacks_sent
    assert record.response_status is None and record.error and "Connect" in record.error


async def test_background_delivery_wakes_on_the_clock(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    sim.start_background_delivery()  # nothing planned: it waits for a wake-up, not a tick
    sim.create_task("acedata", callback_url=receiver.url("acedata"), finish_after=60)
    clock.advance(60)  # FakeClock wakes the sleeper whose due time is reached
    async with asyncio.timeout(5):
        await receiver.arrived.wait()
    assert len(receiver.bodies("acedata")) == 1


# -- faults -----------------------------------------------------------------------------


async def test_drop_and_duplicate(sim: Simulator, clock: FakeClock, receiver: Receiver) -> None:
    sim.faults = Faults(providers={"kie": Faults(drop=1.0), "acedata": Faults(duplicate=1.0)})
    sim.create_task("kie", callback_url=receiver.url("kie"), finish_after=1)
    sim.create_task("acedata", callback_url=receiver.url("acedata"), finish_after=1)
    clock.advance(1)
    assert await sim.deliver_due() == 2
    assert receiver.bodies("kie") == []
    assert len(receiver.bodies("acedata")) == 2
    assert receiver.bodies("acedata")[0] == receiver.bodies("acedata")[1]
    flags = sorted((c.provider, c.dropped, c.duplicated) for c in sim.callbacks_sent)
    assert flags == [("acedata", False, False), ("acedata", False, True), ("kie", True, False)]


async def test_reorder_delivers_the_intermediate_callback_last(
    sim: Simulator, clock: FakeClock, receiver: Receiver
) -> None:
    sim.faults = Faults(reorder=1.0)
    sim.create_task(
        "kling", callback_url=receiver.url("kling"), processing_after=5, finish_after=60
    )
    await sim.deliver_due()
    clock.advance(5)
    assert await sim.deliver_due() == 0  # held back until after the terminal one
    clock.advance(55)
    assert await sim.deliver_due() == 2
    statuses = [b["task_status"] for b in receiver.bodies()]
    assert statuses == ["submitted", "succeed", "processing"]
    assert sim.callbacks_sent[-1].reordered


async def test_delay(sim: Simulator, clock: FakeClock, receiver: Receiver) -> None:
    sim.faults = Faults(delay=30)
    task = sim.create_task("acedata", callback_url=receiver.url("acedata"), finish_after=60)
    clock.advance(60)
    assert await sim.deliver_due() == 0
    clock.advance(30)
    assert await sim.deliver_due() == 1
    assert sim.callbacks_sent[0].due_at == task.finished_at + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("provider", "code_path", "code"),
    [
        ("kling", ("code",), 1302),
        ("cometapi", ("error", "code"), "rate_limit_exceeded"),
        ("gateway", ("code",), "rate_limit"),
        ("acedata", ("error", "code"), "too_many_requests"),
        ("kie", ("code",), 429),
    ],
)
async def test_rate_limit_is_429_with_retry_after(
    sim: Simulator, clock: FakeClock, provider: str, code_path: tuple[str, ...], code: Any
) -> None:
    sim.faults = Faults(rate_limit=1.0, retry_after=7)
    task = sim.create_task(provider)
    async with client_for(sim, clock, provider) as client:
        response = await query(client, provider, task.task_id)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    body = response.json()
    for key in code_path:
        body = body[key]
    assert body == code
    [request] = sim.requests
    assert (request.status, request.fault, request.task_ids) == (429, "rate_limit", (task.task_id,))


async def query(client: httpx.AsyncClient, provider: str, task_id: str) -> httpx.Response:
    """One single-task query in the provider's own way (default actions)."""
    if provider == "acedata":
        return await client.post("/kling/tasks", json={"action": "retrieve", "id": task_id})
    if provider == "kie":
        return await client.get("/api/v1/jobs/recordInfo", params={"taskId": task_id})
    prefix = "" if provider == "kling" else "/kling"
    return await client.get(f"{prefix}/v1/videos/text2video/{task_id}")


async def test_server_error_and_malformed(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kling")
    async with client_for(sim, clock, "kling") as client:
        sim.faults = Faults(server_error=1.0)
        failed = await query(client, "kling", task.task_id)
        sim.faults = Faults(malformed=1.0)
        garbled = await query(client, "kling", task.task_id)
        sim.faults = Faults()
        fine = await query(client, "kling", task.task_id)
    assert failed.status_code == 500 and failed.json()["code"] == 5000
    assert garbled.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbled.json()
    assert fine.json()["data"]["task_id"] == task.task_id
    assert [(r.status, r.fault) for r in sim.requests] == [
        (500, "server_error"),
        (200, "malformed"),
        (200, None),
    ]


async def test_hang_until_the_client_gives_up(sim: Simulator, clock: FakeClock) -> None:
    sim.faults = Faults(hang=1.0)
    task = sim.create_task("kie")
    async with client_for(sim, clock, "kie", timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await query(client, "kie", task.task_id)
    [request] = sim.requests
    assert (request.status, request.fault) == (0, "hang")


async def test_hang_is_released_on_shutdown(clock: FakeClock) -> None:
    sim = Simulator(clock=clock, faults=Faults(hang=1.0))
    arrived = asyncio.Event()
    record = sim.world.record

    def record_and_signal(request: RecordedRequest) -> None:
        record(request)
        arrived.set()

    sim.world.record = record_and_signal  # type: ignore[method-assign]
    async with httpx.AsyncClient() as client:
        async with sim.serve():
            task = sim.create_task("acedata")
            headers = {"Authorization": f"Bearer {sim.environ()['ACEDATA_API_TOKEN']}"}
            body = {"action": "retrieve", "id": task.task_id}
            pending = asyncio.create_task(
                client.post(f"{sim.base_url('acedata')}/kling/tasks", json=body, headers=headers)
            )
            async with asyncio.timeout(5):
                await arrived.wait()
        response = await pending
    assert response.status_code == 503


async def test_unknown_for_hides_new_tasks_in_each_providers_way(
    sim: Simulator, clock: FakeClock
) -> None:
    sim.faults = Faults(unknown_for=30)
    tasks = {name: sim.create_task(name) for name in ("kling", "gateway", "acedata", "kie")}
    clients = {name: client_for(sim, clock, name) for name in tasks}
    try:
        hidden = {name: await query(clients[name], name, t.task_id) for name, t in tasks.items()}
        listed = (await clients["kling"].get("/v1/videos/text2video")).json()["data"]
        batch = {"action": "retrieve_batch", "ids": [tasks["acedata"].task_id]}
        omitted = (await clients["acedata"].post("/kling/tasks", json=batch)).json()
        clock.advance(30)
        shown = {name: await query(clients[name], name, t.task_id) for name, t in tasks.items()}
        relisted = (await clients["kling"].get("/v1/videos/text2video")).json()["data"]
    finally:
        for client in clients.values():
            await client.aclose()
    assert hidden["kling"].status_code == 404 and hidden["kling"].json()["code"] == 1203
    assert hidden["gateway"].status_code == 400
    assert hidden["acedata"].json() == {}
    assert hidden["kie"].json()["code"] == 404
    assert listed == [] and omitted == {"items": [], "count": 0}
    assert all(response.status_code == 200 for response in shown.values())
    assert shown["acedata"].json()["id"] == tasks["acedata"].task_id
    assert [t["task_id"] for t in relisted] == [tasks["kling"].task_id]


def test_faults_validate_and_round_trip() -> None:
    faults = Faults(drop=0.1, providers={"kie": Faults(hang=1.0)})
    assert Faults.from_dict(faults.to_dict()) == faults
    assert faults.for_provider("kie").hang == 1.0 and faults.for_provider("kling").drop == 0.1
    with pytest.raises(ValueError, match="drop"):
        Faults(drop=1.5)
    with pytest.raises(ValueError, match="unknown fault names: nope"):
        Faults.from_dict({"nope": 1})


# -- requests log, control endpoints, environment ---------------------------------------


async def test_request_log_counts_calls(sim: Simulator, clock: FakeClock) -> None:
    task = sim.create_task("kie", "veo")
    async with client_for(sim, clock, "kie") as client:
        for _ in range(3):
            await client.get("/api/v1/veo/record-info", params={"taskId": task.task_id})
        await client.post("/api/v1/veo/generate", json={"prompt": "x"})
    assert [(r.kind, r.status, r.task_ids) for r in sim.requests] == [
        ("query", 200, (task.task_id,)),
        ("query", 200, (task.task_id,)),
        ("query", 200, (task.task_id,)),
        ("create", 200, ()),
    ]
    assert sim.requests[0].path == "/kie/api/v1/veo/record-info"
    assert sim.requests[0].query == {"taskId": task.task_id}
    assert sim.requests[0].at == clock.now()


async def test_control_endpoints(sim: Simulator, clock: FakeClock) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        one = await client.post(
            "/_sim/tasks", json={"provider": "kling", "outcome": "failed", "finish_after": 10}
        )
        many = await client.post("/_sim/tasks", json=[{"provider": "kie"}, {"provider": "acedata"}])
        bad = await client.post("/_sim/tasks", json={"provider": "kling", "colour": "red"})
        unknown_provider = await client.post("/_sim/tasks", json={"provider": "nope"})
        task_id = one.json()["task_id"]
        before = (await client.get(f"/_sim/tasks/kling/{task_id}")).json()
        clock.advance(10)
        after = (await client.get(f"/_sim/tasks/kling/{task_id}")).json()
        missing = await client.get("/_sim/tasks/kling/nope")
        put = await client.put("/_sim/faults", json={"drop": 0.5, "providers": {"kie": {}}})
        bad_faults = await client.put("/_sim/faults", json={"drop": 2})
        async with client_for(sim, clock, "kling") as kling:
            await kling.get(f"/v1/videos/text2video/{task_id}")
            await kling.get("/v1/videos/text2video")
        stats = (await client.get("/_sim/stats")).json()
        logged = (await client.get("/_sim/requests")).json()
        rest = (await client.get("/_sim/requests", params={"after": 1, "limit": 5})).json()
        bad_page = await client.get("/_sim/requests", params={"limit": 0})
    assert one.status_code == 201 and one.json()["final_status"] == "failed"
    assert [t["provider"] for t in many.json()] == ["kie", "acedata"]
    assert bad.status_code == 422 and "colour" in bad.json()["error"]["message"]
    assert unknown_provider.status_code == 422
    assert (before["status"], after["status"]) == ("submitted", "failed")
    assert missing.status_code == 404
    assert put.json()["drop"] == 0.5 and sim.faults.for_provider("kie").drop == 0.0
    assert bad_faults.status_code == 422 and sim.faults.drop == 0.5
    assert stats["requests"]["kling"] == {"query": 1, "list": 1}
    assert stats["tasks"] == 3 and stats["requests_total"] == 2
    assert [(r["kind"], r["task_ids"], r["status"]) for r in logged["requests"]] == [
        ("query", [task_id], 200),
        ("list", [], 200),
    ]
    assert logged["next"] == 2 and rest == {"requests": logged["requests"][1:], "next": 2}
    assert bad_page.status_code == 422


async def test_environ_points_at_the_simulator(sim: Simulator) -> None:
    env = sim.environ()
    for provider in ("kling", "cometapi", "gateway", "acedata", "kie"):
        assert env[f"{provider.upper()}_BASE_URL"] == f"{sim.url}/{provider}"
    assert {"KLING_ACCESS_KEY", "KLING_SECRET_KEY", "COMETAPI_KEY", "GATEWAY_API_KEY"} <= set(env)
    assert {"ACEDATA_API_TOKEN", "KIE_API_KEY"} <= set(env)
    assert sim.url.startswith("http://127.0.0.1:")


async def test_same_seed_same_ids(clock: FakeClock) -> None:
    first, second = Simulator(clock=clock, seed=3), Simulator(clock=clock, seed=3)
    for provider in ("kling", "gateway", "acedata", "kie"):
        assert first.create_task(provider).task_id == second.create_task(provider).task_id


async def test_serve_twice_is_refused(sim: Simulator) -> None:
    with pytest.raises(RuntimeError, match="already serving"):
        async with sim.serve():
            pass


async def test_runs_as_its_own_process(receiver: Receiver) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler.simulator",
        "--finish-after=0",
        '--faults={"duplicate": 1}',
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            started = json.loads(await process.stdout.readline())
            async with httpx.AsyncClient(base_url=started["url"]) as client:
                spec = {"provider": "kie", "callback_url": receiver.url("kie")}
                created = (await client.post("/_sim/tasks", json=spec)).json()
                while len(receiver.received) < 2:  # background delivery, on the system clock
                    receiver.arrived.clear()
                    await receiver.arrived.wait()
                stats = (await client.get("/_sim/stats")).json()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert started["environ"]["KIE_BASE_URL"] == started["url"] + "/kie"
    assert [body["data"]["taskId"] for body in receiver.bodies("kie")] == [created["task_id"]] * 2
    assert stats["tasks"] == 1 and stats["requests_total"] == 0  # control calls are not logged

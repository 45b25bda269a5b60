"""The simulator's HTTP face: each provider's endpoints under its own prefix, plus `/_sim`.

Every provider request goes through `_exchange`, which checks the credentials, applies the
request faults, lets the endpoint answer, records the request in `World.requests` (faulted
ones too) and encodes the JSON. Endpoints only parse their input and pick a shape from
`shapes.py`. Routes (the adapters' base URL is the prefix):

    /kling/v1/videos/{action}                 POST create, GET list (?pageNum=&pageSize=)
    /kling/v1/videos/{action}/{id}            GET query (id or external_task_id)
    /cometapi/kling/v1/videos/{action}[/{id}] the same, CometAPI's errors and Bearer key
    /gateway/kling/v1/videos/{action}[/{id}]  the same, rendered per the task's `rendering`
    /acedata/kling/videos                     POST create
    /acedata/kling/tasks                      POST retrieve | retrieve_batch
    /kie/api/v1/jobs/createTask, /kie/api/v1/jobs/recordInfo?taskId=
    /kie/api/v1/veo/generate, /kie/api/v1/veo/record-info?taskId=
    /_sim/tasks (POST), /_sim/tasks/{provider}/{task_id}, /_sim/stats, /_sim/requests,
    /_sim/faults (GET, PUT)

The control routes are not provider requests: they are neither recorded nor faulted.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reconciler.simulator import shapes
from reconciler.simulator.auth import check_bearer, check_kling_jwt
from reconciler.simulator.faults import Faults
from reconciler.simulator.world import (
    ACEDATA_ACTIONS,
    KLING_ACTIONS,
    PROVIDERS,
    RecordedRequest,
    SimTask,
    World,
)

JSON_TYPE = "application/json"


@dataclass(slots=True)
class Answer:
    status: int
    body: object
    headers: dict[str, str] | None = None


class BadRequest(Exception):
    """The request itself is wrong; carries the provider-shaped answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


def build_app(world: World, release: asyncio.Event) -> Starlette:
    """`release` is set when the simulator stops: it lets hung requests finish."""
    endpoints = _Endpoints(world, release)
    routes = [
        Route(
            "/kling/v1/videos/{rest:path}", endpoints.kling_family("kling"), methods=["GET", "POST"]
        ),
        Route(
            "/cometapi/kling/v1/videos/{rest:path}",
            endpoints.kling_family("cometapi"),
            methods=["GET", "POST"],
        ),
        Route(
            "/gateway/kling/v1/videos/{rest:path}",
            endpoints.kling_family("gateway"),
            methods=["GET", "POST"],
        ),
        Route("/acedata/kling/videos", endpoints.acedata_create, methods=["POST"]),
        Route("/acedata/kling/tasks", endpoints.acedata_tasks, methods=["POST"]),
        Route("/kie/api/v1/jobs/createTask", endpoints.kie_create("jobs"), methods=["POST"]),
        Route("/kie/api/v1/veo/generate", endpoints.kie_create("veo"), methods=["POST"]),
        Route("/kie/api/v1/jobs/recordInfo", endpoints.kie_query("jobs"), methods=["GET"]),
        Route("/kie/api/v1/veo/record-info", endpoints.kie_query("veo"), methods=["GET"]),
        Route("/_sim/tasks", endpoints.control_create, methods=["POST"]),
        Route("/_sim/tasks/{provider}/{task_id}", endpoints.control_task, methods=["GET"]),
        Route("/_sim/stats", endpoints.control_stats, methods=["GET"]),
        Route("/_sim/requests", endpoints.control_requests, methods=["GET"]),
        Route("/_sim/faults", endpoints.control_faults, methods=["GET", "PUT"]),
    ]
    return Starlette(routes=routes)


Endpoint = Callable[[Request], Any]


class _Endpoints:
    def __init__(self, world: World, release: asyncio.Event) -> None:
        self.world = world
        self.release = release

    # -- the common path of every provider request -------------------------------------

    async def _exchange(
        self,
        request: Request,
        provider: str,
        kind: str,
        task_ids: tuple[str, ...],
        answer: Callable[[], Answer],
        task: SimTask | None = None,
    ) -> Response:
        world = self.world
        now = world.clock.now()

        def record(status: int, fault: str | None = None) -> None:
            world.record(
                RecordedRequest(
                    provider=provider,
                    method=request.method,
                    path=request.url.path,
                    query=dict(request.query_params),
                    status=status,
                    at=now,
                    task_ids=task_ids,
                    kind=kind,
                    fault=fault,
                )
            )

        result = self._authenticate(request, provider)
        fault: str | None = None
        malformed = False
        if result is None and kind != "create":
            faults = world.faults.for_provider(provider)
            rng = world.request_rng
            if faults.hang and rng.random() < faults.hang:
                record(0, "hang")
                await self._hang(request)
                return Response(status_code=503)
            if faults.rate_limit and rng.random() < faults.rate_limit:
                fault = "rate_limit"
                result = _rate_limited(provider, task, faults.retry_after, self._request_id())
            elif faults.server_error and rng.random() < faults.server_error:
                fault = "server_error"
                result = _server_error(provider, task, self._request_id())
            elif faults.malformed and rng.random() < faults.malformed:
                malformed = True
        if result is None:
            result = answer()
        content = json.dumps(result.body, ensure_ascii=False).encode()
        if malformed and result.status < 300:
            fault = "malformed"
            content = content[: max(1, len(content) // 2)]  # a JSON prefix is never JSON
        record(result.status, fault)
        return Response(content, result.status, result.headers, media_type=JSON_TYPE)

    def _authenticate(self, request: Request, provider: str) -> Answer | None:
        header = request.headers.get("authorization")
        if provider == "kling":
            denied = check_kling_jwt(header, self.world.clock.now())
            if denied is None:
                return None
            return Answer(401, shapes.kling_error(*denied, self._request_id()))
        problem = check_bearer(provider, header)
        if problem is None:
            return None
        if provider == "acedata":
            code, status = ("no_token", 400) if problem == "missing" else ("invalid_token", 401)
            message = "token is required" if problem == "missing" else "token is invalid"
            return Answer(status, shapes.acedata_error(code, message, self._request_id()))
        if provider == "kie":
            return Answer(401, shapes.kie_error(401, "You do not have access permissions"))
        error_type = "comet_api_error" if provider == "cometapi" else "new_api_error"
        return Answer(401, shapes.openai_error("invalid token", "invalid_api_key", error_type))

    async def _hang(self, request: Request) -> None:
        """Answer nothing until the client gives up or the simulator stops: no timer."""

        async def client_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waiters = {asyncio.ensure_future(client_gone()), asyncio.ensure_future(self.release.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _request_id(self) -> str:
        return str(uuid.UUID(int=self.world.request_rng.getrandbits(128), version=4))

    def _visible(self, provider: str, task_id: str, action: str | None = None) -> SimTask | None:
        """The task as the provider's query sees it: unknown while `unknown_for` hides it,
        and only under its own action (a Kling task is not found under another action)."""
        task = self.world.find(provider, task_id)
        if task is None or not self.world.known(task, self.world.clock.now()):
            return None
        if action is not None and task.action != action:
            return None
        return task

    # -- Kling, CometAPI, gateway -------------------------------------------------------

    def kling_family(self, provider: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            rest = request.path_params["rest"].strip("/")
            if request.method == "POST":
                return await self._kling_create(request, provider, rest)
            if rest in KLING_ACTIONS or rest in self.world.actions(provider):
                return await self._kling_list(request, provider, rest)
            action, _, task_id = rest.rpartition("/")
            task = self._visible(provider, task_id, action)
            ids = (task.task_id if task else task_id,)
            return await self._exchange(
                request,
                provider,
                "query",
                ids,
                lambda: self._kling_query(provider, task, task_id),
                task,
            )

        return endpoint

    def _kling_query(self, provider: str, task: SimTask | None, task_id: str) -> Answer:
        request_id = self._request_id()
        if task is None:
            message = f"task {task_id} not found"
            if provider == "kling":
                return Answer(404, shapes.kling_error(1203, message, request_id))
            if provider == "cometapi":
                return Answer(
                    404, shapes.openai_error(message, "task_not_exist", "comet_api_error")
                )
            return Answer(400, shapes.gateway_error(None, "task_not_exist", "task_not_exist"))
        status = task.status_at(self.world.clock.now())
        if provider == "gateway":
            return Answer(200, shapes.gateway_query(task, status, request_id))
        return Answer(200, shapes.kling_envelope(shapes.kling_task(task, status), request_id))

    async def _kling_list(self, request: Request, provider: str, action: str) -> Response:
        def answer() -> Answer:
            request_id = self._request_id()
            if provider != "kling":
                message = "list is not supported"
                if provider == "cometapi":
                    return Answer(404, shapes.openai_error(message, "not_found", "comet_api_error"))
                return Answer(404, shapes.gateway_error(None, "not_found", message))
            try:
                page_num = int(request.query_params.get("pageNum", "1"))
                page_size = int(request.query_params.get("pageSize", "30"))
            except ValueError:
                page_num = page_size = 0
            if not (1 <= page_num <= 1000 and 1 <= page_size <= 500):
                message = "pageNum must be 1-1000 and pageSize 1-500"
                return Answer(400, shapes.kling_error(1201, message, request_id))
            now = self.world.clock.now()
            page = self.world.page(provider, action, page_num, page_size, now)
            data = [shapes.kling_task(task, task.status_at(now)) for task in page]
            return Answer(200, shapes.kling_envelope(data, request_id))

        return await self._exchange(request, provider, "list", (), answer)

    async def _kling_create(self, request: Request, provider: str, action: str) -> Response:
        body = await _json_object(request)

        def answer() -> Answer:
            request_id = self._request_id()
            if body is None or not action:
                return _bad_request(provider, "request body must be a JSON object", request_id)
            callback_url = body.get("callback_url")
            if provider == "gateway" and not callback_url:
                # new-api forwards metadata.callback_url onto the upstream request.
                metadata = body.get("metadata")
                callback_url = metadata.get("callback_url") if isinstance(metadata, dict) else None
            try:
                task = self.world.create_task(
                    provider,
                    action,
                    callback_url=_text(callback_url),
                    external_task_id=_text(body.get("external_task_id")),
                )
            except ValueError as exc:
                return _bad_request(provider, str(exc), request_id)
            if task.rendering == "openai":
                return Answer(200, shapes.gateway_query(task, "submitted", request_id))
            data = shapes.kling_task(task, "submitted", in_seconds=task.rendering == "kling-native")
            del data["task_result"], data["task_status_msg"]
            return Answer(200, shapes.kling_envelope(data, request_id))

        return await self._exchange(request, provider, "create", (), answer)

    # -- AceData ------------------------------------------------------------------------

    async def acedata_create(self, request: Request) -> Response:
        body = await _json_object(request)

        def answer() -> Answer:
            trace_id = self._request_id()
            if body is None:
                return _bad_request("acedata", "request body must be a JSON object", trace_id)
            action = body.get("action", "text2video")
            if action not in ACEDATA_ACTIONS:
                return _bad_request("acedata", f"unknown action {action!r}", trace_id)
            task = self.world.create_task(
                "acedata", action, callback_url=_text(body.get("callback_url"))
            )
            # Without callback_url the real API blocks until the video is done; the
            # simulator always answers at once, as with `async: true`.
            return Answer(200, {"task_id": task.task_id})

        return await self._exchange(request, "acedata", "create", (), answer)

    async def acedata_tasks(self, request: Request) -> Response:
        body = await _json_object(request) or {}
        action = body.get("action")
        if action == "retrieve":
            task_id = _text(body.get("id")) or ""
            return await self._exchange(
                request,
                "acedata",
                "query",
                (task_id,),
                lambda: self._acedata_retrieve(task_id),
                self._visible("acedata", task_id),
            )
        if action == "retrieve_batch":
            raw = body.get("ids")
            ids = (
                tuple(dict.fromkeys(i for i in raw if isinstance(i, str)))
                if isinstance(raw, list)
                else ()
            )
            return await self._exchange(
                request, "acedata", "batch", ids, lambda: self._acedata_batch(ids)
            )

        def bad() -> Answer:
            message = "action must be 'retrieve' with id or 'retrieve_batch' with ids"
            return _bad_request("acedata", message, self._request_id())

        return await self._exchange(request, "acedata", "query", (), bad)

    def _acedata_retrieve(self, task_id: str) -> Answer:
        task = self._visible("acedata", task_id)
        if task is None:
            return Answer(200, {})  # sic: AceData's not-found is a 200 with an empty object
        return Answer(200, shapes.acedata_record(task, task.status_at(self.world.clock.now())))

    def _acedata_batch(self, ids: tuple[str, ...]) -> Answer:
        now = self.world.clock.now()
        items = []
        for task_id in ids:
            task = self._visible("acedata", task_id)
            if task is not None:  # unknown ids are simply left out
                items.append(shapes.acedata_record(task, task.status_at(now)))
        self.world.request_rng.shuffle(items)  # the order is not the order asked for
        return Answer(200, {"items": items, "count": len(items)})

    # -- Kie ----------------------------------------------------------------------------

    def kie_create(self, action: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            body = await _json_object(request)

            def answer() -> Answer:
                if body is None:
                    return Answer(422, shapes.kie_error(422, "request body must be a JSON object"))
                callback_url = _text(body.get("callBackUrl"))
                task = self.world.create_task("kie", action, callback_url=callback_url)
                return Answer(
                    200, {"code": 200, "msg": "success", "data": {"taskId": task.task_id}}
                )

            return await self._exchange(request, "kie", "create", (), answer)

        return endpoint

    def kie_query(self, action: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            task_id = request.query_params.get("taskId", "")
            task = self._visible("kie", task_id, action)

            def answer() -> Answer:
                if not task_id:
                    return Answer(422, shapes.kie_error(422, "taskId is required"))
                if task is None:
                    return Answer(404, shapes.kie_error(404, f"task {task_id} not found"))
                now = self.world.clock.now()
                status = task.status_at(now)
                data = (
                    shapes.kie_veo(task, status)
                    if action == "veo"
                    else shapes.kie_job(task, status, now)
                )
                return Answer(200, {"code": 200, "msg": "success", "data": data})

            return await self._exchange(request, "kie", "query", (task_id,), answer, task)

        return endpoint

    # -- control ------------------------------------------------------------------------

    async def control_create(self, request: Request) -> Response:
        """Create one task (a JSON object) or many (a JSON array of objects)."""
        try:
            payload = await request.json()
        except ValueError:
            return _control_error(400, "body must be JSON")
        many = isinstance(payload, list)
        specs = payload if many else [payload]
        created = []
        for spec in specs:
            if not isinstance(spec, dict):
                return _control_error(422, "each task must be a JSON object")
            unknown = set(spec) - _CREATE_ARGS
            if unknown:
                return _control_error(422, f"unknown fields: {', '.join(sorted(unknown))}")
            try:
                task = self.world.create_task(**spec)
            except (ValueError, TypeError) as exc:
                return _control_error(422, str(exc))
            created.append(task.to_dict())
        return _json(201, created if many else created[0])

    async def control_task(self, request: Request) -> Response:
        provider, task_id = request.path_params["provider"], request.path_params["task_id"]
        task = self.world.find(provider, task_id)
        if task is None:
            return _control_error(404, f"no {provider} task {task_id!r}")
        body = task.to_dict()
        body["status"] = task.status_at(self.world.clock.now())
        return _json(200, body)

    async def control_stats(self, request: Request) -> Response:
        world = self.world
        by_provider: dict[str, dict[str, int]] = {name: {} for name in PROVIDERS}
        for (provider, kind), count in world.request_counts.items():
            by_provider[provider][kind] = count
        body = {
            "requests": by_provider,
            "requests_total": len(world.requests),
            "tasks": len(world.tasks),
            "callbacks": dict(world.callback_counts) | {"pending": world.pending_callbacks},
        }
        return _json(200, body)

    async def control_requests(self, request: Request) -> Response:
        """The provider requests recorded so far, oldest first, from index `after` (default
        0), at most `limit` (default 1000, at most 10000): when each came, what it asked
        about, how it was answered. `next` is the index to ask from next."""
        try:
            after = int(request.query_params.get("after", "0"))
            limit = int(request.query_params.get("limit", "1000"))
        except ValueError:
            return _control_error(422, "after and limit must be integers")
        if after < 0 or not 1 <= limit <= 10_000:
            return _control_error(422, "after must be >= 0 and limit within 1..10000")
        page = self.world.requests[after : after + limit]
        body = {
            "requests": [
                {
                    "provider": recorded.provider,
                    "kind": recorded.kind,
                    "status": recorded.status,
                    "at": recorded.at.isoformat(),
                    "task_ids": list(recorded.task_ids),
                    "fault": recorded.fault,
                }
                for recorded in page
            ],
            "next": after + len(page),
        }
        return _json(200, body)

    async def control_faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                payload = await request.json()
                if not isinstance(payload, dict):
                    raise ValueError("faults must be a JSON object")
                self.world.faults = Faults.from_dict(payload)
            except ValueError as exc:
                return _control_error(422, str(exc))
        return _json(200, self.world.faults.to_dict())


_CREATE_ARGS = frozenset(
    {
        "provider",
        "action",
        "callback_url",
        "outcome",
        "processing_after",
        "finish_after",
        "external_task_id",
        "rendering",
        "error_message",
    }
)


# -- provider-shaped errors ----------------------------------------------------------------


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(math.ceil(seconds))}  # HTTP wants whole seconds


# new-api's 429 text: "upstream load for the current group is saturated, try again later".
_GATEWAY_BUSY = "当前分组上游负载已饱和\uff0c请稍后再试"


def _rate_limited(
    provider: str, task: SimTask | None, retry_after: float, request_id: str
) -> Answer:
    headers = _retry_after(retry_after)
    body: Mapping[str, object]
    if provider == "kling":
        body = shapes.kling_error(1302, "Too many requests, please try again later", request_id)
    elif provider == "cometapi":
        body = shapes.openai_error("rate limit exceeded", "rate_limit_exceeded", "comet_api_error")
    elif provider == "gateway":
        body = shapes.gateway_error(task, "rate_limit", _GATEWAY_BUSY)
    elif provider == "acedata":
        body = shapes.acedata_error("too_many_requests", "too many requests", request_id)
    else:
        body = shapes.kie_error(429, "Rate limited, please try again later")
    return Answer(429, body, headers)


def _server_error(provider: str, task: SimTask | None, request_id: str) -> Answer:
    body: Mapping[str, object]
    if provider == "kling":
        body = shapes.kling_error(5000, "Server internal error", request_id)
    elif provider == "cometapi":
        body = shapes.openai_error("upstream error", "server_error", "comet_api_error")
    elif provider == "gateway":
        body = shapes.gateway_error(task, "server_error", "upstream error")
    elif provider == "acedata":
        body = shapes.acedata_error("api_error", "internal server error", request_id)
    else:
        body = shapes.kie_error(500, "Server error")
    return Answer(500, body)


def _bad_request(provider: str, message: str, request_id: str) -> Answer:
    if provider == "kling":
        return Answer(400, shapes.kling_error(1201, message, request_id))
    if provider == "acedata":
        return Answer(400, shapes.acedata_error("bad_request", message, request_id))
    error_type = "comet_api_error" if provider == "cometapi" else "new_api_error"
    return Answer(400, shapes.openai_error(message, "invalid_request", error_type))


# -- small request/response helpers ------------------------------------------------------


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _json(status: int, body: object) -> Response:
    return Response(json.dumps(body), status, media_type=JSON_TYPE)


def _control_error(status: int, message: str) -> Response:
    return _json(
        status, {"error": {"code": "invalid" if status != 404 else "not_found", "message": message}}
    )

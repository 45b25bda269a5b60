"""Task routes (SPEC §2 "Tasks"): register, list, read (optionally waiting for the end),
read a task's events, poll now."""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler import codec
from reconciler.api.errors import ApiError
from reconciler.api.events import MAX_LIMIT, int_param, splice, wait_param
from reconciler.model import Status, TaskRef
from reconciler.service import Service, UnknownTask

MAX_REGISTRATION_BYTES = 64 * 1024


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", message, field=field)


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_REGISTRATION_BYTES:
        raise ApiError(413, "payload_too_large", "the registration body is too large")
    try:
        data = codec.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object", field="body")
    return data


async def register(request: Request) -> Response:
    service: Service = request.app.state.service
    data = await _json_object(request)
    provider, task_id = data.get("provider"), data.get("task_id")
    if not isinstance(provider, str) or not provider:
        raise _invalid("provider", "provider is required and must be a string")
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)  # numeric Kling ids sent as JSON numbers
    if not isinstance(task_id, str) or not task_id:
        raise _invalid("task_id", "task_id is required and must be a string")
    action = data.get("action")
    if action is not None and (not isinstance(action, str) or not action or len(action) > 64):
        raise _invalid("action", "action must be a non-empty string of at most 64 characters")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "metadata must be a JSON object")
    deadline = data.get("deadline_seconds")
    if deadline is not None and (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not math.isfinite(deadline)
        or deadline <= 0
    ):
        raise _invalid("deadline_seconds", "deadline_seconds must be a positive number")
    task, created = await service.register(
        provider, task_id, action, metadata, float(deadline) if deadline else None
    )
    return JSONResponse(task.to_json(), status_code=201 if created else 200)


async def list_tasks(request: Request) -> Response:
    service: Service = request.app.state.service
    status = request.query_params.get("status") or None
    if status is not None and status not in set(Status):
        raise _invalid("status", f"status must be one of {', '.join(Status)}")
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    page = await service.list_tasks(
        status,
        request.query_params.get("provider") or None,
        limit,
        request.query_params.get("cursor") or None,
    )
    return JSONResponse(
        {"tasks": [task.to_json() for task in page.tasks], "next_cursor": page.next_cursor}
    )


def _ref(request: Request) -> TaskRef:
    return TaskRef(request.path_params["provider"], request.path_params["task_id"])


async def get_task(request: Request) -> Response:
    service: Service = request.app.state.service
    ref = _ref(request)
    task = await service.get_task(ref, wait_param(request))
    if task is None:
        raise UnknownTask(f"no task {ref}")
    return JSONResponse(task.to_json())


async def task_events(request: Request) -> Response:
    service: Service = request.app.state.service
    ref = _ref(request)
    rows = await service.events(0, MAX_LIMIT, ref.provider, ref.task_id)
    if not rows and await service.get_task(ref) is None:
        raise UnknownTask(f"no task {ref}")
    return splice(rows, rows[-1].seq if rows else 0)


async def poll_now(request: Request) -> Response:
    service: Service = request.app.state.service
    task = await service.poll_now(_ref(request))
    return JSONResponse(task.to_json())


routes = [
    Route("/tasks", register, methods=["POST"]),
    Route("/tasks", list_tasks, methods=["GET"]),
    Route("/tasks/{provider}/{task_id:path}/events", task_events, methods=["GET"]),
    Route("/tasks/{provider}/{task_id:path}/poll", poll_now, methods=["POST"]),
    Route("/tasks/{provider}/{task_id:path}", get_task, methods=["GET"]),
]

"""`GET /events`: the event log by cursor, with long-poll (SPEC §2 "The event log").

Stored events are JSON text; pages are spliced from it rather than decoded and re-encoded.
Long-poll waits on the in-process feed, never by polling the database.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reconciler.api.errors import ApiError
from reconciler.model import EventRow
from reconciler.service import Service

MAX_LIMIT = 1000
MAX_WAIT = 60.0


def splice(rows: Sequence[EventRow], last_seq: int) -> Response:
    body = '{"events":[' + ",".join(row.body for row in rows) + f'],"last_seq":{last_seq}}}'
    return Response(body.encode(), media_type="application/json")


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise ApiError(422, "invalid", f"{name} must be between {low} and {high}", field=name)
    return value


def wait_param(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, "invalid", "wait must be a number of seconds", field="wait") from None
    if not 0 <= value <= MAX_WAIT:
        raise ApiError(422, "invalid", f"wait must be between 0 and {MAX_WAIT:g}", field="wait")
    return value


async def list_events(request: Request) -> Response:
    service: Service = request.app.state.service
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    provider = request.query_params.get("provider") or None
    task_id = request.query_params.get("task_id") or None
    rows = await service.events(after, limit, provider, task_id, wait_param(request))
    return splice(rows, rows[-1].seq if rows else after)


routes = [Route("/events", list_events, methods=["GET"])]

"""`POST /callbacks/{provider}`: the path that must never lose a delivery (SPEC §2 Webhooks).

In order: unknown provider (404), callback token in constant time (401, nothing stored),
size cap while reading (413, nothing stored), provider signature over the exact bytes (401),
then the delivery is committed with its interpretation in one group-committed transaction,
and only then answered: 200 with the task, or 400 when it could not be read (the delivery
stays stored with its error for `reconciler replay`). Nothing is logged per request.
"""

from __future__ import annotations

import hmac
import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reconciler.api.errors import ApiError, error_response
from reconciler.model import Outcome
from reconciler.service import Service


async def receive_callback(request: Request) -> Response:
    service: Service = request.app.state.service
    provider = request.path_params["provider"]
    if service.provider(provider) is None:
        return error_response(404, "unknown_provider", f"there is no provider {provider!r}")
    expected = service.settings.callback_token
    if expected is not None:
        given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), expected.reveal().encode()):
            return error_response(401, "unauthorized", "the callback token is missing or wrong")
    body = await read_body(request, service.settings.max_body_bytes)
    service.verify(provider, request.headers, body)
    result = await service.ingest(provider, request.headers, body)
    if result.outcome is Outcome.REJECTED:
        assert result.error is not None
        return error_response(
            400, result.error.code, result.error.message, delivery_id=result.delivery_id
        )
    task = result.task_json
    if task is None:
        task = "null" if result.task is None else json.dumps(result.task.to_json())
    duplicate = "true" if result.duplicate else "false"
    answer = f'{{"delivery_id":{result.delivery_id},"duplicate":{duplicate},"task":{task}}}'
    return Response(answer.encode(), media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be larger than `limit`:
    from `Content-Length` before reading, or while counting a streamed body."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")


routes = [Route("/callbacks/{provider}", receive_callback, methods=["POST"])]

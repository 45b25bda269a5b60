"""The one place that turns errors into the SPEC's envelope:
`{"error": {"code": "<machine_word>", "message": "<human sentence>"}}`.

Handlers raise `ApiError` (or the service's own errors); the exception handlers installed by
`create_app` render them. Nothing here ever includes a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reconciler.errors import SignatureError, StoreError
from reconciler.service import CursorExpired, Invalid, UnknownTask

logger = logging.getLogger(__name__)

_WORDS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    body.update(extra)
    return JSONResponse(body, status_code=status)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, **exc.extra)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _WORDS.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message)


async def invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Invalid)
    return error_response(422, "invalid", str(exc), field=exc.field)


async def unknown_task(request: Request, exc: Exception) -> Response:
    return error_response(404, "task_not_found", str(exc))


async def cursor_expired(request: Request, exc: Exception) -> Response:
    # SPEC §2: `oldest_seq` sits inside `error`, beside the code and the message.
    assert isinstance(exc, CursorExpired)
    body = {"error": {"code": "cursor_expired", "message": str(exc), "oldest_seq": exc.oldest_seq}}
    return JSONResponse(body, status_code=410)


async def bad_signature(request: Request, exc: Exception) -> Response:
    return error_response(401, "bad_signature", str(exc))


async def store_unavailable(request: Request, exc: Exception) -> Response:
    # SPEC §4: a write the store cannot commit is never acknowledged; the sender (for a
    # webhook, the provider) tries again later. The driver's own text stays in the log: it
    # may quote the database's address.
    logger.error("the store refused %s %s: %s", request.method, request.url.path, exc)
    response = error_response(
        503, "store_unavailable", "the database cannot take this request now; try again later"
    )
    response.headers["retry-after"] = "5"
    return response


async def unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed to handle this request")


async def render_error(request: Request, exc: Exception) -> Response:
    """The response `HANDLERS` give for `exc`, its most specific class first: for an
    endpoint that runs ahead of Starlette's exception middleware (`callbacks`)."""
    for cls in type(exc).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            response: Response = await handler(request, exc)
            return response
    raise exc  # not an Exception: nothing to render


HANDLERS: dict[Any, Any] = {
    ApiError: api_error,
    HTTPException: http_error,
    Invalid: invalid,
    UnknownTask: unknown_task,
    CursorExpired: cursor_expired,
    SignatureError: bad_signature,
    StoreError: store_unavailable,
    Exception: unexpected,
}

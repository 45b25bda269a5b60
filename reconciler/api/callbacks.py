"""`POST /callbacks/{provider}`: the path that must never lose a delivery (SPEC §2 Webhooks).

In order: unknown provider (404), callback token in constant time (401, nothing stored),
size cap while reading (413, nothing stored), provider signature over the exact bytes (401),
then the delivery is committed with its interpretation in one group-committed transaction,
and only then answered: 200 with the task, or 400 when it could not be read (the delivery
stays stored with its error for `reconciler replay`). Nothing is logged per request.

This route is a plain ASGI endpoint that `App` calls before Starlette's middleware and
router: it is the one route under sustained load, and Starlette's request, response and
routing layers cost more CPU per webhook than everything else on the path but the store
(docs/benchmarks.md). Errors still leave in the same envelope as everywhere else.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from reconciler.api.errors import ApiError, render_error
from reconciler.model import Outcome
from reconciler.service import Service

PREFIX = "/callbacks/"
TEMPLATE = "/callbacks/{provider}"  # as the OpenAPI document names it
_JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The sender closed the connection before its body arrived: nothing to store or answer."""


def provider_in(path: str) -> str | None:
    """The `{provider}` of a `/callbacks/{provider}` path, or None for any other path."""
    if not path.startswith(PREFIX):
        return None
    provider = path[len(PREFIX) :]
    return provider if provider and "/" not in provider else None


async def receive_callback(
    service: Service, provider: str, scope: Scope, receive: Receive, send: Send
) -> None:
    try:
        body = await _handle(service, provider, scope, receive)
    except ClientGone:
        return
    except Exception as error:
        response = await render_error(Request(scope), error)
        await response(scope, receive, send)
        return
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _handle(service: Service, provider: str, scope: Scope, receive: Receive) -> bytes:
    """The 200 answer's body; any other answer is raised, and rendered by `render_error`."""
    if scope["method"] != "POST":
        raise ApiError(405, "method_not_allowed", "callbacks are sent with POST")
    if service.provider(provider) is None:
        raise ApiError(404, "unknown_provider", f"there is no provider {provider!r}")
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    expected = service.settings.callback_token
    if expected is not None:
        given = _query_param(scope["query_string"], "token") or ""
        if not hmac.compare_digest(given.encode(), expected.reveal().encode()):
            raise ApiError(401, "unauthorized", "the callback token is missing or wrong")
    body = await read_body(receive, headers.get("content-length"), service.settings.max_body_bytes)
    service.verify(provider, headers, body)
    result = await service.ingest(provider, headers, body)
    if result.outcome is Outcome.REJECTED:
        assert result.error is not None
        raise ApiError(400, result.error.code, result.error.message, delivery_id=result.delivery_id)
    task = result.task_json or "null"
    duplicate = "true" if result.duplicate else "false"
    answer = f'{{"delivery_id":{result.delivery_id},"duplicate":{duplicate},"task":{task}}}'
    return answer.encode()


def _query_param(query: bytes, name: str) -> str | None:
    """The last value of `name` in the query string, as Starlette's `query_params` gives."""
    found = None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            found = value
    return found


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be larger than `limit`:
    from `Content-Length` before reading, or while counting a streamed body."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")

"""The HTTP API: `create_app(service)` builds the whole route table (SPEC §2).

Handlers reach the service as `request.app.state.service` and never touch the store or an
adapter. Bearer auth (`RECONCILER_API_TOKEN`) is a small ASGI middleware that lets
`/callbacks/*`, `/healthz` and `/readyz` through; callbacks authenticate with their own token.
`/callbacks/{provider}` is served by `App` itself, ahead of the middleware and the router
(see `callbacks`); every other route is an ordinary Starlette route.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from reconciler.api import callbacks, dashboard, events, ops, stream, tasks
from reconciler.api.errors import HANDLERS, error_response
from reconciler.service import Service

OPEN_PATHS = ("/callbacks/", "/healthz", "/readyz")


class BearerAuth:
    """Require `Authorization: Bearer <token>` (or `?access_token=`, for the dashboard page
    and EventSource, which cannot set headers) on every route but the open ones."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(header, self.expected) or self._query_token_ok(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "unauthorized", "a valid bearer token is required")
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _query_token_ok(self, scope: Scope) -> bool:
        query: bytes = scope.get("query_string", b"")
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name == b"access_token":
                return hmac.compare_digest(unquote_to_bytes(value), self.token)
        return False


class App(Starlette):
    """The Starlette application, with the webhook route taken before its middleware."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            provider = callbacks.provider_in(scope["path"])
            if provider is not None:
                service: Service = self.state.service
                await callbacks.receive_callback(service, provider, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def routes() -> Sequence[BaseRoute]:
    return [
        *tasks.routes,
        *events.routes,
        *stream.routes,
        *ops.routes,
        *dashboard.routes,
    ]


def create_app(service: Service) -> App:
    app = App(routes=list(routes()), exception_handlers=HANDLERS)
    app.state.service = service
    token = service.settings.api_token
    if token is not None:
        app.add_middleware(BearerAuth, token=token.reveal())
    return app

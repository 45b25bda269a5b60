"""The dashboard (SPEC §2 "Operations": `GET /`) and the small JSON it reads besides the task
and event APIs (`GET /stats`).

The page is plain HTML, CSS and JavaScript shipped inside the package (`api/static/`), with no
build step and no external resources. The CSS and script are inlined into the page when it is
served: with `RECONCILER_API_TOKEN` set, the page is opened as `/?access_token=…`, and
sub-resources fetched by the browser would not carry the token. Inlining also lets a strict
Content-Security-Policy allow exactly these two blocks by hash.

This module renders no task data on the server: the page reads `/tasks`, `/stats` and
`/events/stream` like any other client.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from reconciler.service import Service


def _static(name: str) -> str:
    return resources.files("reconciler.api").joinpath("static", name).read_text("utf-8")


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_page() -> tuple[str, str]:
    """The page with its CSS and script inlined, and the Content-Security-Policy for it."""
    css, script = _static("dashboard.css"), _static("dashboard.js")
    page = (
        _static("dashboard.html")
        .replace("<!-- STYLE -->", f"<style>{css}</style>")
        .replace("<!-- SCRIPT -->", f"<script>{script}</script>")
    )
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_digest(script)}",
            f"style-src {_digest(css)}",
            "connect-src 'self'",
            # Previews of results hosted at the providers' CDNs.
            "img-src 'self' data: https: http:",
            "media-src https: http:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return page, policy


PAGE, POLICY = render_page()
HEADERS = {
    "content-security-policy": POLICY,
    # The page URL may carry ?access_token=: it must never reach a CDN in a Referer header.
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE, headers=HEADERS)


async def stats(request: Request) -> Response:
    service: Service = request.app.state.service
    overview = await service.overview()
    health = service.health
    return JSONResponse(
        {
            "providers": overview.settled,
            "lag_seconds": round(overview.lag_seconds, 3),
            "last_seq": overview.last_seq,
            "paused": dict(sorted(health.paused.items())),
            "breakers_open": sorted(health.breakers_open),
        }
    )


routes = [
    Route("/", page, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
]

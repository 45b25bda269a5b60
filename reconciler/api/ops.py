"""Operations routes (SPEC §2 "Operations"): `/healthz`, `/readyz`, `/metrics`,
`/openapi.json`.

`/healthz` says only that the process answers. `/readyz` asks the service why it should not
get traffic (database, loop, provider credentials) and answers 503 with those reasons in the
error envelope. `/metrics` refreshes the figures that live in the database (tasks by status,
how tasks were settled, lag) and the gauges mirroring the loop's health (read through
`service.health`, which the loop owns) just before rendering; counters are incremented
where things happen, not here. Nothing here reads a secret, so none can leak.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.api import openapi
from reconciler.api.errors import error_response
from reconciler.metrics import CONTENT_TYPE, Metrics
from reconciler.model import Status
from reconciler.service import SETTLED_BY, LoopHealth, Overview, Service

# Rendered once: the document is static for the life of the process.
OPENAPI = json.dumps(openapi.document(), separators=(",", ":")).encode()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    service: Service = request.app.state.service
    reasons = await service.readiness()
    if reasons:
        return error_response(503, "not_ready", "not ready: " + "; ".join(reasons), reasons=reasons)
    health = service.health
    return JSONResponse(
        {
            "status": "ready",
            "loop": "standby" if health.standby else "leading",
            "breakers_open": sorted(health.breakers_open),
        }
    )


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    overview = await service.overview()
    refresh(service.metrics, overview, service.health, list(service.providers))
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def refresh(metrics: Metrics, overview: Overview, health: LoopHealth, providers: list[str]) -> None:
    """Set the gauges that mirror state, zero included, so a series never lingers at a stale
    value after its last task moved on. No await in here: concurrent scrapes never see a
    half-refreshed registry."""
    metrics.tasks.clear()
    metrics.settled.clear()
    names = sorted({*providers, *overview.settled})
    for name in names:
        for status in Status:
            metrics.tasks.labels(name, status.value).set(
                overview.tasks.get((name, status.value), 0)
            )
        counts = overview.settled.get(name, {})
        for word in SETTLED_BY:
            if word != "open":  # open tasks are the non-terminal ones of reconciler_tasks
                metrics.settled.labels(name, word).set(counts.get(word, 0))
        metrics.breakers_open.labels(name).set(1 if name in health.breakers_open else 0)
        metrics.provider_paused.labels(name).set(1 if name in health.paused else 0)
    metrics.lag.set(overview.lag_seconds)


async def openapi_json(request: Request) -> Response:
    return Response(OPENAPI, media_type="application/json")


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]

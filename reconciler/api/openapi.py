"""The OpenAPI 3.1 description of the whole HTTP API (SPEC §2), served at `/openapi.json`.

Written by hand, next to the routes it describes, rather than generated from them: the
routes are plain Starlette functions, and the contract other programs rely on deserves to be
read and reviewed as one document. Enumerations come from the model so that they cannot
drift; `tests/api/test_openapi.py` checks that every route is described and that real
responses validate against these schemas.
"""

from __future__ import annotations

from typing import Any

from reconciler import __version__
from reconciler.codec import MAX_DEPTH
from reconciler.config import PROVIDER_NAMES
from reconciler.model import EventType, Source, Status
from reconciler.service import MAX_DEADLINE_SECONDS, MAX_TASK_ID_LENGTH, SETTLED_BY

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(type_: str, **more: Any) -> Schema:
    return {"type": [type_, "null"], **more}


TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

VIDEO: Schema = {
    "type": "object",
    "required": ["url", "cover_url", "duration", "id"],
    "additionalProperties": False,
    "properties": {
        "url": {"type": "string"},
        "cover_url": nullable("string"),
        "duration": nullable("number", description="Seconds."),
        "id": nullable("string"),
    },
}

TASK: Schema = {
    "type": "object",
    "description": "The current state of one tracked task.",
    "additionalProperties": False,
    "properties": {
        "provider": {"type": "string", "examples": ["kling"]},
        "task_id": {"type": "string", "examples": ["8422509036"]},
        "action": {"type": "string", "examples": ["text2video"]},
        "status": ref("Status"),
        "provider_status": nullable("string", description="The provider's own status word."),
        "progress": nullable("integer", minimum=0, maximum=100),
        "videos": {"type": "array", "items": ref("Video")},
        "error": nullable("string"),
        "metadata": {"type": "object", "description": "Caller's data, merged on registration."},
        "created_at": TIME,
        "updated_at": TIME,
        "completed_at": NULLABLE_TIME,
        "deadline_at": TIME,
        "source": ref("Source"),
        "callbacks": {"type": "integer", "minimum": 0},
        "polls": {"type": "integer", "minimum": 0},
        "next_poll_at": NULLABLE_TIME,
        "version": {"type": "integer", "minimum": 1},
        "registered": {
            "type": "boolean",
            "description": "False while the task is known only from a callback.",
        },
        "external_task_id": nullable("string"),
    },
}

EVENT: Schema = {
    "type": "object",
    "description": "One entry of the append-only event log.",
    "additionalProperties": False,
    "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "Global, strictly increasing."},
        "type": ref("EventType"),
        "provider": {"type": "string"},
        "task_id": {"type": "string"},
        "source": ref("Source"),
        "status": ref("Status"),
        "previous_status": {"anyOf": [ref("Status"), {"type": "null"}]},
        "delivery_id": nullable("integer"),
        "at": TIME,
        "task": ref("Task"),
    },
}

ERROR: Schema = {
    "type": "object",
    "description": "Every error. Some carry more members beside `error`: `field` (422), "
    "`delivery_id` (400 on a callback), `reasons` (503 from /readyz).",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z_]+$"},
                "message": {"type": "string"},
                "oldest_seq": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "With `cursor_expired` (410): the seq of the oldest kept "
                    "event (with none kept, the seq the next event gets).",
                },
            },
        },
        "field": {"type": "string"},
        "delivery_id": {"type": "integer"},
        "reasons": {"type": "array", "items": {"type": "string"}},
    },
}

# Every member of a task and an event is always present (null when unknown).
TASK["required"] = list(TASK["properties"])
EVENT["required"] = list(EVENT["properties"])

SCHEMAS: dict[str, Schema] = {
    "Status": {"type": "string", "enum": [s.value for s in Status]},
    "Source": {
        "type": "string",
        "enum": [s.value for s in Source],
        "description": "What last changed the task.",
    },
    "EventType": {"type": "string", "enum": [t.value for t in EventType]},
    "Video": VIDEO,
    "Task": TASK,
    "Event": EVENT,
    "Error": ERROR,
    "Registration": {
        "type": "object",
        "required": ["provider", "task_id"],
        "properties": {
            "provider": {"type": "string", "enum": list(PROVIDER_NAMES)},
            "task_id": {
                "anyOf": [
                    {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TASK_ID_LENGTH,
                        "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
                    },
                    # Numeric ids as JSON numbers; JSON text reads exactly within 64 bits.
                    {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
                ],
                "description": "The provider's task id: no control characters.",
            },
            "action": {"type": "string", "minLength": 1, "maxLength": 64},
            "metadata": {
                "type": "object",
                "description": f"Any JSON object nested at most {MAX_DEPTH} levels; merged "
                "into the task's metadata.",
            },
            "deadline_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_DEADLINE_SECONDS,
                "description": "Seconds after the task's creation before it expires (at most "
                "ten years).",
            },
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["tasks", "next_cursor"],
        "additionalProperties": False,
        "properties": {
            "tasks": {"type": "array", "items": ref("Task")},
            "next_cursor": nullable("string"),
        },
    },
    "EventPage": {
        "type": "object",
        "required": ["events", "last_seq"],
        "additionalProperties": False,
        "properties": {
            "events": {"type": "array", "items": ref("Event")},
            "last_seq": {
                "type": "integer",
                "minimum": 0,
                "description": "The cursor to pass as `after` next time.",
            },
        },
    },
    "CallbackResult": {
        "type": "object",
        "required": ["delivery_id", "duplicate", "task"],
        "additionalProperties": False,
        "properties": {
            "delivery_id": {"type": "integer"},
            "duplicate": {"type": "boolean"},
            "task": {"anyOf": [ref("Task"), {"type": "null"}]},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Ready": {
        "type": "object",
        "required": ["status", "loop", "breakers_open"],
        "additionalProperties": False,
        "properties": {
            "status": {"const": "ready"},
            "loop": {
                "enum": ["leading", "standby"],
                "description": "`leading`: this process runs the reconciler loop. `standby`: "
                "another replica on the same PostgreSQL database runs it; this one serves the "
                "API and webhooks and takes the loop over when that replica goes. Provider "
                "pauses and open breakers are known to the leading replica.",
            },
            "breakers_open": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Providers whose circuit breaker is open (not a readiness "
                "failure: the provider is down, not this service).",
            },
        },
    },
    "Stats": {
        "type": "object",
        "required": ["providers", "lag_seconds", "last_seq", "paused", "breakers_open"],
        "additionalProperties": False,
        "properties": {
            "providers": {
                "type": "object",
                "description": "Per provider: terminal tasks by what settled them "
                "(callback, poll, or the reconciler: failed/expired) and open tasks.",
                "additionalProperties": {
                    "type": "object",
                    "required": list(SETTLED_BY),
                    "additionalProperties": False,
                    "properties": {word: {"type": "integer", "minimum": 0} for word in SETTLED_BY},
                },
            },
            "lag_seconds": {"type": "number", "minimum": 0},
            "last_seq": {"type": "integer", "minimum": 0},
            "paused": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Providers paused for rejected credentials, with the reason.",
            },
            "breakers_open": {"type": "array", "items": {"type": "string"}},
        },
    },
}


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("Error")}}}


def ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    parameter = {"name": name, "in": "query", "required": False, "schema": schema,
                 "description": description}  # fmt: skip
    if schema.get("type") != "string":
        # A parameter given empty (`?limit=`, as a form sends it) is taken as not given.
        parameter["allowEmptyValue"] = True
    return parameter


def path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}  # fmt: skip


PROVIDER = path("provider", "Provider name: " + ", ".join(PROVIDER_NAMES) + ".")
TASK_ID = path("task_id", "The provider's task id (may contain `/`).")
WAIT = query(
    "wait",
    {"type": "number", "minimum": 0, "maximum": 60},
    "Seconds to wait for news before answering (long-poll).",
)
UNAUTHORIZED = error("`RECONCILER_API_TOKEN` is set and the request carries no valid token.")
CURSOR_EXPIRED = error(
    "`cursor_expired`: the cursor fell off the log. Retention (`RECONCILER_RETAIN_EVENTS`) "
    "pruned events after it that the reader has not seen: `after` is below `error.oldest_seq` "
    "minus one. Read again from `after=0` (the oldest kept event) or `oldest_seq - 1`. "
    "`after=0` never gets this answer."
)
INVALID = error("A parameter is invalid; `field` names it.")
OPEN: list[dict[str, list[str]]] = []  # no API token: callbacks and health checks

PATHS: dict[str, Any] = {
    "/callbacks/{provider}": {
        "post": {
            "tags": ["webhooks"],
            "summary": "Receive a provider webhook",
            "description": "Stored durably before the answer, whether or not it can be read.",
            "security": OPEN,
            "parameters": [
                PROVIDER,
                query(
                    "token",
                    {"type": "string"},
                    "`RECONCILER_CALLBACK_TOKEN`, required when set.",
                ),
            ],
            "requestBody": {
                "required": True,
                "description": "The provider's JSON, as it sends it; any Content-Type.",
                "content": {"*/*": {"schema": {}}},
            },
            "responses": {
                "200": ok("CallbackResult", "Stored and applied."),
                "400": error("Stored, but not readable (not JSON, no task id, unknown shape)."),
                "401": error("Missing or wrong callback token, or bad provider signature."),
                "404": error("Unknown provider."),
                "413": error("Body larger than `RECONCILER_MAX_BODY_BYTES`; nothing stored."),
            },
        }
    },
    "/tasks": {
        "post": {
            "tags": ["tasks"],
            "summary": "Register a task to track (idempotent; metadata merged)",
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": ref("Registration")}},
            },
            "responses": {
                "200": ok("Task", "Already tracked."),
                "201": ok("Task", "Newly tracked."),
                "400": error("The body is not JSON."),
                "401": UNAUTHORIZED,
                "413": error("The body is too large."),
                "422": INVALID,
            },
        },
        "get": {
            "tags": ["tasks"],
            "summary": "List tasks, newest first",
            "parameters": [
                query("status", ref("Status"), "Only tasks with this status."),
                query("provider", {"type": "string"}, "Only this provider's tasks."),
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "Page size.",
                ),
                query("cursor", {"type": "string"}, "`next_cursor` of the previous page."),
            ],
            "responses": {
                "200": ok("TaskPage", "A page of tasks."),
                "401": UNAUTHORIZED,
                "422": INVALID,
            },
        },
    },
    "/tasks/{provider}/{task_id}": {
        "get": {
            "tags": ["tasks"],
            "summary": "Read a task; with `wait`, as soon as it is terminal",
            "parameters": [PROVIDER, TASK_ID, WAIT],
            "responses": {
                "200": ok("Task", "The task (terminal, or as it is when the wait ends)."),
                "401": UNAUTHORIZED,
                "404": error("No such task."),
                "422": INVALID,
            },
        }
    },
    "/tasks/{provider}/{task_id}/events": {
        "get": {
            "tags": ["tasks"],
            "summary": "A task's events, oldest first",
            "parameters": [PROVIDER, TASK_ID],
            "responses": {
                "200": ok("EventPage", "The task's history."),
                "401": UNAUTHORIZED,
                "404": error("No such task."),
            },
        }
    },
    "/tasks/{provider}/{task_id}/poll": {
        "post": {
            "tags": ["tasks"],
            "summary": "Poll the provider for this task now",
            "parameters": [PROVIDER, TASK_ID],
            "responses": {
                "200": ok("Task", "The task after the poll (unchanged when terminal)."),
                "401": UNAUTHORIZED,
                "404": error("No such task."),
            },
        }
    },
    "/events": {
        "get": {
            "tags": ["events"],
            "summary": "Read the event log by cursor, optionally long-polling",
            "parameters": [
                query(
                    "after",
                    {"type": "integer", "minimum": 0, "default": 0},
                    "Return events with a greater `seq`.",
                ),
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "Page size.",
                ),
                query("provider", {"type": "string"}, "Only this provider's events."),
                query("task_id", {"type": "string"}, "Only this task's events."),
                WAIT,
            ],
            "responses": {
                "200": ok("EventPage", "Events in `seq` order (empty when the wait ended)."),
                "401": UNAUTHORIZED,
                "410": CURSOR_EXPIRED,
                "422": INVALID,
            },
        }
    },
    "/events/stream": {
        "get": {
            "tags": ["events"],
            "summary": "The event log as server-sent events",
            "description": "Each event is a frame `id: <seq>`, `event: <type>`, `data: <Event "
            "JSON>`. A comment `: ping` is sent when the stream is idle (every 15 s). "
            "Resume with the `Last-Event-ID` header (EventSource sends it by itself). A "
            "client that stops reading is disconnected and may resume the same way. A cursor "
            "that fell off the log gets 410 before any stream starts (and a stream that falls "
            "that far behind ends, so that its reconnection gets the 410). With "
            "`RECONCILER_API_TOKEN`, EventSource passes `?access_token=`.",
            "parameters": [
                query(
                    "after",
                    {"type": "integer", "minimum": 0, "default": 0},
                    "Start after this `seq` (`Last-Event-ID` wins when both are given).",
                ),
                query("provider", {"type": "string"}, "Only this provider's events."),
                query("task_id", {"type": "string"}, "Only this task's events."),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]*$"},
                    "description": "The last `seq` received; the stream resumes after it "
                    "(empty: as if not sent).",
                },
            ],
            "responses": {
                "200": {
                    "description": "An endless stream of events and heartbeats.",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-item-schema": ref("Event"),
                        }
                    },
                },
                "401": UNAUTHORIZED,
                "410": CURSOR_EXPIRED,
                "422": INVALID,
            },
        }
    },
    "/healthz": {
        "get": {
            "tags": ["operations"],
            "summary": "Liveness: the process answers",
            "security": OPEN,
            "responses": {"200": ok("Health", "Alive.")},
        }
    },
    "/readyz": {
        "get": {
            "tags": ["operations"],
            "summary": "Readiness: database reachable, migrated and able to commit (not out "
            "of disk space), loop running, provider credentials accepted",
            "security": OPEN,
            "responses": {
                "200": ok("Ready", "Ready for traffic."),
                "503": error("Not ready: code `not_ready`, the reasons in `reasons`."),
            },
        }
    },
    "/metrics": {
        "get": {
            "tags": ["operations"],
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format 0.0.4.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": UNAUTHORIZED,
            },
        }
    },
    "/stats": {
        "get": {
            "tags": ["operations"],
            "summary": "How tasks were settled per provider, reconciler lag, log head",
            "responses": {"200": ok("Stats", "Current figures."), "401": UNAUTHORIZED},
        }
    },
    "/openapi.json": {
        "get": {
            "tags": ["operations"],
            "summary": "This document",
            "responses": {
                "200": {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {}}}},
                "401": UNAUTHORIZED,
            },
        }
    },
    "/": {
        "get": {
            "tags": ["dashboard"],
            "summary": "The dashboard page (open with `?access_token=` when a token is set)",
            "responses": {
                "200": {
                    "description": "An HTML page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                "401": UNAUTHORIZED,
            },
        }
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Reconciler",
            "version": __version__,
            "description": "Webhook + polling reconciler for asynchronous AI video generation "
            "tasks, with a durable event log. Times are RFC 3339 UTC. Every error is "
            '`{"error": {"code", "message"}}`.',
        },
        "security": [{"bearer": []}, {"access_token": []}],
        "tags": [
            {"name": name} for name in ("webhooks", "tasks", "events", "operations", "dashboard")
        ],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`RECONCILER_API_TOKEN`, when set.",
                },
                "access_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "The same token, for pages and EventSource.",
                },
            },
        },
    }

"""AceData Cloud's Kling API (PROVIDERS.md §2): task records, flat callbacks, batch queries.

Owns the AceData shapes only: `POST {base}/kling/tasks` with `retrieve` (one id) or
`retrieve_batch` (many ids, answered as `{items, count}` in any order), the task record
`{id, job_id, request, response, created_at, finished_at, …}`, the flat callback (the
record's `response` object plus `task_id`/`trace_id`), and AceData's error envelope
`{error: {code, message}, trace_id}`. Sending, rate limits and retries belong to the loop.

Ids: AceData's `id`/`task_id` is its own UUID; Kling's id is the record's `job_id` and is
not used here (PROVIDERS §6.8). Records carry no top-level status: the state is
`response.success` + `response.state` (§2.2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import httpx

from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
    excerpt,
)
from reconciler.model import Observation, Status, Task, Video
from reconciler.providers.base import (
    PollFlow,
    PollResult,
    Provider,
    dig,
    number,
    read_answer,
    require_object,
    retry_after,
    status_error,
    text,
    timestamp,
)

# `response.state` carries Kling's own words through (PROVIDERS §6.2); AceData's MCP client
# also accepts the generic success words (§2.2, AceDataCloud/MCPs:kling/core/utils.py).
_STATES: Mapping[str, Status] = {
    "submitted": Status.SUBMITTED,
    "processing": Status.PROCESSING,
    "succeed": Status.COMPLETED,
    "succeeded": Status.COMPLETED,
    "success": Status.COMPLETED,
    "complete": Status.COMPLETED,
    "completed": Status.COMPLETED,
    "failed": Status.FAILED,
    "error": Status.FAILED,
    "cancelled": Status.FAILED,
    "canceled": Status.FAILED,
}

# Error codes of AceData's envelope (PROVIDERS §2.4). Balance (`used_up`), a disabled key and
# moderation blocks on the account (`forbidden`) are not fixed by retrying: they pause the
# provider like a bad token. `no_api` (HTTP 404) means the API is not enabled for this token
# or the base URL is wrong, which is a configuration problem, not an unknown task.
_AUTH_CODES = frozenset(
    {
        "no_token",
        "invalid_token",
        "token_expired",
        "token_mismatched",
        "used_up",
        "disabled",
        "forbidden",
        "no_api",
    }
)
_SERVER_CODES = frozenset({"api_error", "timeout"})
_BAD_REQUEST_CODES = frozenset({"bad_request", "api_not_implemented"})


class AceData(Provider):
    name = "acedata"
    # AceData asks clients to stay under 1 req/s (§2.4): one batch request answers many ids.
    batch_size: ClassVar[int] = 50

    def batch_key(self, task: Task) -> str:
        # Every AceData Kling action (videos, motion, lip-sync, …) shares one tasks API (§2.1).
        return "tasks"

    # --- polling -----------------------------------------------------------------------

    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        results: list[PollResult] = []
        for chunk in _chunks(tasks, self.batch_size):
            ids = [task.task_id for task in chunk]
            if len(ids) == 1:
                body: dict[str, Any] = {"action": "retrieve", "id": ids[0]}
            else:
                body = {"action": "retrieve_batch", "ids": ids}
            response = yield httpx.Request("POST", f"{self.base_url}/kling/tasks", json=body)
            answer = self._answer(response)
            if len(ids) == 1:
                results.append(self._single(ids[0], answer))
            else:
                results.extend(self._batch(ids, answer))
        return results

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        """The answer as an object, or the whole-exchange error it stands for."""
        body = read_answer(response, self)
        if not isinstance(body, dict):
            raise BadPayload(f"{self.name}: expected a JSON object, got {excerpt(response.text)}")
        return body

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        error = dig(body, "error")
        if response.status_code >= 400:
            return self._envelope_error(response, error, now)
        # A record never has a top-level `error`; only the error envelope does (§2.4), and
        # it means an error under HTTP 200 too.
        if isinstance(body, dict) and isinstance(error, dict) and not {"id", "items"} & body.keys():
            return self._envelope_error(response, error, now)
        return None

    def _envelope_error(
        self, response: httpx.Response, error: object, now: datetime
    ) -> ProviderError:
        """Classify on the body's `code` where there is one, on the HTTP status otherwise."""
        code = _word(error.get("code")) if isinstance(error, dict) else None
        detail = _word(error.get("message")) if isinstance(error, dict) else None
        message = (
            f"{self.name}: HTTP {response.status_code} {code or 'error'}: "
            f"{excerpt(detail or response.content)}"
        )
        if code == "too_many_requests":
            return RateLimited(message, retry_after=retry_after(response, now))
        if code in _AUTH_CODES:
            return AuthRejected(message)
        if code in _SERVER_CODES:
            return ServerError(message, delay=retry_after(response, now))
        if code in _BAD_REQUEST_CODES:
            return BadPayload(message)
        # No code we know: the HTTP status decides; a 2xx error envelope with an unknown
        # code is still no answer to read.
        return status_error(response, message, now) or BadPayload(message)

    def _single(self, task_id: str, answer: dict[str, Any]) -> PollResult:
        if not answer:  # `200 {}` is AceData's "no such task" (§2.2, §6.7)
            return PollResult(task_id, error=NotFound(f"{self.name}: no task {task_id!r}"))
        try:
            observation = _record(answer, self.name)
        except BadPayload as error:
            return PollResult(task_id, error=error)
        if observation.task_id != task_id:
            return PollResult(
                task_id,
                error=BadPayload(
                    f"{self.name}: asked for task {task_id!r}, got {observation.task_id!r}"
                ),
            )
        return PollResult(task_id, observation=observation)

    def _batch(self, ids: Sequence[str], answer: dict[str, Any]) -> list[PollResult]:
        items = answer.get("items")
        if items is None and not answer:
            items = []
        if not isinstance(items, list):
            raise BadPayload(f"{self.name}: batch answer has no `items` list")
        # Items come in any order and unknown ids are simply left out (§2.2): match by id.
        found: dict[str, PollResult] = {}
        for item in items:
            if not isinstance(item, dict):
                continue
            try:
                observation = _record(item, self.name)
            except BadPayload as error:
                item_id = _word(item.get("id"))
                if item_id is not None:
                    found.setdefault(item_id, PollResult(item_id, error=error))
                continue
            found.setdefault(observation.task_id, PollResult(observation.task_id, observation))
        return [
            found.get(task_id)
            or PollResult(task_id, error=NotFound(f"{self.name}: no task {task_id!r}"))
            for task_id in ids
        ]

    # --- callbacks ---------------------------------------------------------------------

    def parse_callback(self, payload: object) -> Observation:
        body = require_object(payload, self.name)
        if "response" in body or "request" in body:
            return _record(body, self.name)  # the wrapped form: a whole task record
        task_id = _task_id(body.get("task_id"), self.name) or _task_id(body.get("id"), self.name)
        if task_id is None:
            raise BadPayload(f"{self.name}: callback has no task_id")
        return _observe(task_id, body, body, self.name)


def _chunks(tasks: Sequence[Task], size: int) -> Iterator[Sequence[Task]]:
    for start in range(0, len(tasks), max(1, size)):
        yield tasks[start : start + size]


def _word(value: object) -> str | None:
    """A non-empty string, and only a string (error codes, messages, ids in error paths)."""
    return (value.strip() or None) if isinstance(value, str) else None


def _task_id(value: object, provider: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadPayload(f"{provider}: task id is a {type(value).__name__}, not a string")
    return text(value)


def _record(record: dict[str, Any], provider: str) -> Observation:
    """A task record (`retrieve`, a batch item, or a wrapped callback)."""
    response = record.get("response")
    if response is not None and not isinstance(response, dict):
        raise BadPayload(f"{provider}: record `response` is a {type(response).__name__}")
    response = response or {}
    task_id = _task_id(record.get("id"), provider) or _task_id(response.get("task_id"), provider)
    if task_id is None:
        raise BadPayload(f"{provider}: task record has no id")
    request = record.get("request")
    action = text(request.get("action")) if isinstance(request, dict) else None
    return _observe(task_id, response, record, provider, action=action)


def _observe(
    task_id: str,
    response: dict[str, Any],
    raw: dict[str, Any],
    provider: str,
    action: str | None = None,
) -> Observation:
    """Normalize AceData's business object (the record's `response`, or a flat callback)."""
    success = response.get("success")
    if success is not None and not isinstance(success, bool):
        raise BadPayload(f"{provider}: `success` is a {type(success).__name__}, not a boolean")
    state = text(response.get("state"))
    known = _STATES.get(state.lower()) if state else None

    status: Status | None
    if success is False or known is Status.FAILED:
        status = Status.FAILED
    elif success is True or known is Status.COMPLETED:
        status = Status.COMPLETED
    elif known is not None:
        status = known
    elif state is None:
        # No `success` yet means pending (§2.2, AceData's own test); the record has no finer
        # word for it, and a record with no `response` at all has at least been accepted.
        status = Status.PROCESSING
    else:
        status = None  # a word we do not know: never terminal, `provider_status` shows it

    error = response.get("error")
    message = None
    if isinstance(error, dict):
        message = text(error.get("message")) or text(error.get("code"))
    elif isinstance(error, str):
        message = text(error)

    videos: tuple[Video, ...] = ()
    url = response.get("video_url")
    if isinstance(url, str) and url.strip():
        # The record's top-level `duration` is the job's elapsed time, not the video's.
        videos = (
            Video(
                url=url.strip(),
                duration=number(response.get("duration")),
                id=text(response.get("video_id")),
            ),
        )

    return Observation(
        task_id=task_id,
        status=status,
        provider_status=state,
        videos=videos,
        error=message,
        provider_created_at=timestamp(raw.get("created_at")),
        provider_updated_at=timestamp(raw.get("finished_at")) or timestamp(raw.get("started_at")),
        action=action,
        raw=raw,
    )

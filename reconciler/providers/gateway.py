"""OpenAI-style relay gateways for Kling (new-api / one-api and their commercial forks).

One route, `GET /kling/v1/videos/{action}/{task_id}` with a Bearer key, answered in four
renderings (PROVIDERS.md §5, seed 001); this module tells them apart and reads each:

1. new-api's TaskDto `{code:"success", data:{task_id, status, progress, fail_reason, …,
   data: <Kling's own envelope>}}`;
2. the simplified `{code:"success", data:{status, url, format, error, metadata, task_id}}`;
3. a Kling-native re-render (Kling's envelope, gateway ids, timestamps in seconds);
4. OpenAI-video style with no envelope `{task_id, status, url, metadata, error}`.

Callbacks, when a caller made Kling call back through a gateway, carry Kling's own body and
the upstream id (§5.3); `parse_callback` accepts that and every rendering above. Reading
Kling's task object belongs to `kling_task.py`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from reconciler.errors import BadPayload, NotFound, ProviderError, excerpt
from reconciler.model import Observation, Status, Video
from reconciler.providers.base import (
    describe,
    dig,
    number,
    percent,
    require_object,
    text,
    timestamp,
)
from reconciler.providers.kling_task import (
    kling_error,
    observe_kling_task,
    parse_kling_payload,
    status_word,
    task_id_of,
)
from reconciler.providers.passthrough import KlingPassthrough

# All renderings' words on one table, compared lower-case: they do not collide.
# UNKNOWN is new-api's own "cannot tell", so it is no status (keep polling).
GATEWAY_STATUSES: dict[str, Status] = {
    # TaskDto (model/task.go)
    "not_start": Status.SUBMITTED,
    "submitted": Status.SUBMITTED,
    "queued": Status.SUBMITTED,
    "in_progress": Status.PROCESSING,
    "success": Status.COMPLETED,
    "failure": Status.FAILED,
    # simplified and OpenAI-video style
    "processing": Status.PROCESSING,
    "succeeded": Status.COMPLETED,
    "completed": Status.COMPLETED,
    "failed": Status.FAILED,
}

# new-api forks copy Kling's top-level message into fail_reason, which on a failed task is
# "SUCCEED" (PROVIDERS trap 1): that is no reason.
_NO_REASON = frozenset({"succeed", "success", "succeeded"})


def _gateway_status(word: str) -> Status | None:
    return GATEWAY_STATUSES.get(word.lower())


def _is_url(value: str | None) -> bool:
    return value is not None and value.lower().startswith(("http://", "https://"))


def _latest(*values: object) -> datetime | None:
    moments = [moment for moment in map(timestamp, values) if moment is not None]
    return max(moments) if moments else None


def observe_task_dto(dto: dict[str, Any], provider: str = "gateway") -> Observation:
    """new-api's TaskDto: the gateway's status, Kling's object in `data.data`."""
    word = status_word(dto.get("status"), provider)
    status = _gateway_status(word)
    inner = _kling_object(dto.get("data"))
    kling = _inner_observation(inner, provider)
    videos = kling.videos if kling else ()
    fail_reason = text(dto.get("fail_reason"))
    if not videos and status is Status.COMPLETED:
        # result_url in current builds; fail_reason holds the URL on success in all of them.
        url = text(dto.get("result_url"))
        url = url if _is_url(url) else (fail_reason if _is_url(fail_reason) else None)
        videos = (Video(url),) if url else ()
    error = None
    if status is Status.FAILED:
        error = kling.error if kling and kling.error else None
        if error is None and not _is_url(fail_reason) and fail_reason:
            error = None if fail_reason.lower() in _NO_REASON else fail_reason
    task_id = text(dto.get("task_id")) or (kling.task_id if kling else None)
    return Observation(
        task_id=task_id_of(task_id, provider),
        status=status,
        provider_status=word,
        # Synthetic ("30%" for anything running, "100%" for failures too): shown, never
        # used to decide completion.
        progress=percent(dto.get("progress")),
        videos=videos,
        error=error,
        provider_created_at=timestamp(dto.get("created_at")) or timestamp(dto.get("submit_time")),
        provider_updated_at=_latest(
            dto.get("updated_at"),
            dto.get("finish_time"),
            dto.get("start_time"),
            dto.get("submit_time"),
        ),
        external_task_id=kling.external_task_id if kling else None,
        raw=dto,
    )


def _kling_object(data: object) -> dict[str, Any] | None:
    """Kling's task object inside TaskDto.data: the stored envelope's `data`, or (in some
    builds) the task object itself."""
    if isinstance(data, dict):
        if "task_status" in data:
            return data
        inner = data.get("data")
        if isinstance(inner, dict) and "task_status" in inner:
            return inner
    return None


def _inner_observation(inner: dict[str, Any] | None, provider: str) -> Observation | None:
    if inner is None:
        return None
    try:
        return observe_kling_task(inner, provider)
    except BadPayload:
        return None  # a stored upstream body we cannot read still leaves the gateway's view


def observe_simplified(data: dict[str, Any], provider: str = "gateway") -> Observation:
    """`{status, url, format, error, metadata, task_id}`; the envelope says success even when
    the task failed, and `error` is read only when the status says failed."""
    word = status_word(data.get("status"), provider)
    status = _gateway_status(word)
    return Observation(
        task_id=task_id_of(data.get("task_id") or data.get("id"), provider),
        status=status,
        provider_status=word,
        progress=percent(data.get("progress")),
        videos=_flat_videos(data),
        error=_error_message(data) if status is Status.FAILED else None,
        provider_created_at=timestamp(data.get("created_at")),
        provider_updated_at=_latest(data.get("updated_at"), data.get("completed_at")),
        raw=data,
    )


def _flat_videos(data: dict[str, Any]) -> tuple[Video, ...]:
    url = text(data.get("url")) or text(data.get("video_url"))
    if url is None:
        return ()
    return (Video(url, None, number(dig(data, "metadata", "duration")), None),)


def _error_message(data: dict[str, Any]) -> str | None:
    error = data.get("error")
    if isinstance(error, dict):
        return text(error.get("message")) or text(error.get("code"))
    return text(error)


def parse_gateway_payload(payload: object, provider: str = "gateway") -> Observation:
    """Any rendering, detected in PROVIDERS §5.2's order, or a Kling-shaped callback."""
    body = require_object(payload, provider)
    data = body.get("data")
    if isinstance(data, dict) and "status" in data and "task_status" not in data:
        if any(key in data for key in _TASK_DTO_KEYS):
            return observe_task_dto(data, provider)
        return observe_simplified(data, provider)
    code = body.get("code")
    if isinstance(code, str) and not code.strip().isdigit():
        # A gateway envelope ("success", "task_not_exist", …) with no task in it.
        raise BadPayload(
            f"{provider}: no task status in the answer (code {code!r:.40}, "
            f"message {excerpt(str(body.get('message')), 80)!r})"
        )
    if "status" in body and "task_status" not in body and not _KLING_V2_KEYS & body.keys():
        return observe_simplified(body, provider)  # OpenAI-video style, no envelope
    # A Kling-native re-render, a Kling legacy callback or Kling's new-API object.
    return parse_kling_payload(body, provider)


_TASK_DTO_KEYS = ("data", "fail_reason", "progress", "submit_time", "finish_time")
_KLING_V2_KEYS = frozenset({"outputs", "create_time", "update_time", "external_id"})


class Gateway(KlingPassthrough):
    name = "gateway"

    def parse_callback(self, payload: object) -> Observation:
        return parse_gateway_payload(payload, self.name)

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        # A Kling-native re-render of an upstream error: Kling's code decides, since its
        # HTTP 429 also means "balance" or "allow-list" (PROVIDERS trap 6).
        error = kling_error(response, body, self.name, now)
        # Otherwise a 429 ("当前分组上游负载已饱和" and friends) says the gateway, not the
        # task, is busy: the status decides.
        if error is None and response.status_code != 429:
            codes = {text(dig(body, "code")), text(dig(body, "error", "code"))}
            if "task_not_exist" in codes:
                # new-api: HTTP 400, also for another user's task.
                error = NotFound(describe(response, self.name))
        return error or super().answer_error(response, body, now)

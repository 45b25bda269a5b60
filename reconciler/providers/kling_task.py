"""Kling's task API as three adapters read it: Kling itself, CometAPI, which passes Kling's
envelope through, and relay gateways, which nest Kling's task object in their own answer.

Owns where a task lives (its path), the task object of both API generations and its
`{code, message, data}` envelope, and what Kling's business codes mean as errors. What it
does not own: sending requests and the JWT (`kling.py`), each relay's own shapes
(`cometapi.py`, `gateway.py`), and what an observation does to a task (`state.py`).

Sources: PROVIDERS.md §1 (endpoints §1.2, task object §1.3, callbacks §1.5 and §1.9, errors
§1.6) and seed 000 (the extra URL locations it lists).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

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
from reconciler.model import Observation, Status, Video
from reconciler.providers.base import dig, number, require_object, retry_after, text, timestamp

# Legacy words, plus `succeeded` from the new API and Kling's own signature test vector
# (PROVIDERS §0, trap 2).
KLING_STATUSES: dict[str, Status] = {
    "submitted": Status.SUBMITTED,
    "processing": Status.PROCESSING,
    "succeed": Status.COMPLETED,
    "succeeded": Status.COMPLETED,
    "failed": Status.FAILED,
}

# Resource families of Kling's path space (`/v1/videos/…`, `/v1/images/…`, CometAPI's
# `audio`); an action that already starts with one of them is used as it is.
_FAMILIES = ("videos", "images", "audio")


def kling_path(action: str | None, default: str = "text2video") -> str:
    """The path segments for an action, quoted: `text2video` → `videos/text2video`,
    `avatar/image2video` → `videos/avatar/image2video`, `images/generations` unchanged."""
    segments = [part for part in (action or "").split("/") if part.strip() not in ("", ".", "..")]
    if not segments:
        segments = default.split("/")
    if segments[0] not in _FAMILIES:
        segments.insert(0, "videos")
    return "/".join(quote(part.strip(), safe="") for part in segments)


def quote_id(task_id: str) -> str:
    return quote(task_id, safe="")


# --- the task object ---------------------------------------------------------------------


def status_word(value: object, provider: str) -> str:
    """The provider's status word; a task object without one says nothing we can use."""
    word = text(value)
    if word is None or not isinstance(value, str):
        raise BadPayload(f"{provider}: no status word in the task object (got {value!r:.60})")
    return word


def task_id_of(value: object, provider: str, field: str = "task_id") -> str:
    if isinstance(value, dict | list):
        raise BadPayload(f"{provider}: {field} is not a string")
    found = text(value)
    if found is None:
        raise BadPayload(f"{provider}: the task object has no {field}")
    return found


def _video(entry: object) -> Video | None:
    if not isinstance(entry, dict):
        return None
    url = text(entry.get("url"))
    if url is None:
        return None
    # Kling's schema has no cover; seed 000 shows `cover_image_url`, so read it when present.
    cover = text(entry.get("cover_image_url")) or text(entry.get("cover_url"))
    return Video(url, cover, number(entry.get("duration")), text(entry.get("id")))


def _videos_from(entries: object) -> list[Video]:
    if not isinstance(entries, list):
        return []
    return [video for video in map(_video, entries) if video is not None]


def kling_videos(task: dict[str, Any]) -> tuple[Video, ...]:
    """Videos from `task_result.videos[]`, else from the other places seed 000 lists."""
    for entries in (
        dig(task, "task_result", "videos"),
        dig(task, "result", "videos"),
        dig(task, "videos"),
    ):
        videos = _videos_from(entries)
        if videos:
            return tuple(videos)
    for value in (
        dig(task, "task_result", "url"),
        dig(task, "result", "url"),
        dig(task, "video_url"),
        dig(task, "url"),
    ):
        if url := text(value):
            return (Video(url),)
    return ()


def observe_kling_task(task: dict[str, Any], provider: str = "kling") -> Observation:
    """One legacy task object (query `data`, list item or callback body)."""
    word = status_word(task.get("task_status"), provider)
    status = KLING_STATUSES.get(word.lower())
    # `message` is "SUCCEED" even on failure; the reason is only in task_status_msg
    # (PROVIDERS trap 1), and on success that field may say "success", which is no error.
    error = text(task.get("task_status_msg")) if status is Status.FAILED else None
    return Observation(
        task_id=task_id_of(task.get("task_id"), provider),
        status=status,
        provider_status=word,
        progress=None,  # Kling reports none
        videos=kling_videos(task),
        error=error,
        provider_created_at=timestamp(task.get("created_at")),
        provider_updated_at=timestamp(task.get("updated_at")),
        external_task_id=text(dig(task, "task_info", "external_task_id")),
        raw=task,
    )


def observe_kling_v2_task(task: dict[str, Any], provider: str = "kling") -> Observation:
    """One task object of Kling's new API (PROVIDERS §1.9): `id`, `status`, `outputs[]`."""
    word = status_word(task.get("status"), provider)
    status = KLING_STATUSES.get(word.lower())
    outputs = task.get("outputs")
    videos = [
        video
        for entry in (outputs if isinstance(outputs, list) else [])
        if dig(entry, "type") in (None, "video")
        for video in [_video(entry)]
        if video is not None
    ]
    return Observation(
        task_id=task_id_of(task.get("id"), provider, "id"),
        status=status,
        provider_status=word,
        videos=tuple(videos),
        error=text(task.get("message")) if status is Status.FAILED else None,
        provider_created_at=timestamp(task.get("create_time")),
        provider_updated_at=timestamp(task.get("update_time")),
        external_task_id=text(task.get("external_id")),
        raw=task,
    )


def _is_envelope(body: dict[str, Any]) -> bool:
    return "code" in body and "data" in body and "task_status" not in body


def parse_kling_task_object(obj: object, provider: str) -> Observation:
    """A bare task object of either API generation."""
    task = require_object(obj, provider)
    if "task_id" in task or "task_status" in task:
        return observe_kling_task(task, provider)
    if "id" in task and "status" in task:
        return observe_kling_v2_task(task, provider)
    raise BadPayload(f"{provider}: no task_id in the body (keys: {sorted(task)[:10]})")


def parse_kling_payload(payload: object, provider: str = "kling") -> Observation:
    """A Kling-shaped body: the bare task object (how Kling calls back), the query envelope
    `{code, message, data}`, or the new API's object or one-item `data` array."""
    body = require_object(payload, provider)
    if not _is_envelope(body):
        return parse_kling_task_object(body, provider)
    if text(body.get("code")) != "0" or isinstance(body.get("code"), bool):
        raise BadPayload(
            f"{provider}: the body reports error code {body.get('code')!r:.40}: "
            f"{excerpt(str(body.get('message')))}"
        )
    data = body.get("data")
    if isinstance(data, list):
        if len(data) != 1:
            raise BadPayload(f"{provider}: expected one task in data, got {len(data)}")
        data = data[0]
    return parse_kling_task_object(data, provider)


# --- errors ---------------------------------------------------------------------------------


def business_code(body: object) -> int | None:
    """Kling's non-zero business `code`, when the body carries one."""
    code = dig(body, "code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code or None
    if isinstance(code, str) and code.strip().isdecimal() and len(code) < 10:
        return int(code) or None
    return None


def kling_error(
    response: httpx.Response, body: object, provider: str, now: datetime
) -> ProviderError | None:
    """The error a Kling business code in `body` stands for (PROVIDERS §1.6); None when the
    body carries none. HTTP 429 means five different things there, so the code decides,
    never the HTTP status alone."""
    code = business_code(body)
    if code is None:
        return None
    message = f"{provider}: HTTP {response.status_code}, code {code}: {excerpt(response.content)}"
    if 1000 <= code <= 1004 or 1100 <= code <= 1103 or code == 1304:
        return AuthRejected(message)  # credentials, account, balance, permission, allow-list
    if code in (1302, 1303):
        return RateLimited(message, retry_after=retry_after(response, now))
    if 5000 <= code <= 5999:
        return ServerError(message, delay=retry_after(response, now))
    if code == 1203:
        return NotFound(message)
    if 1200 <= code <= 1202 or code in (1300, 1301):
        # An invalid request, or a content policy (odd on a query): nothing to retry.
        return BadPayload(message)
    # A code the table does not list: the HTTP status is all we have.
    if response.status_code == 429:
        return RateLimited(message, retry_after=retry_after(response, now))
    if response.status_code >= 500:
        return ServerError(message, delay=retry_after(response, now))
    if response.status_code in (401, 403):
        return AuthRejected(message)
    return BadPayload(message)

"""Kie.ai (PROVIDERS.md §4): the Veo 3.1 API and the Market (`jobs`) API, plus seed 002's shapes.

Kie has two unrelated task APIs, told apart by the task's `action`, never by guessing from a
body: `veo` → `GET /api/v1/veo/record-info?taskId=` (integer `successFlag`, URLs at
`data.response.resultUrls`), anything else (default `jobs`) → `GET /api/v1/jobs/recordInfo?taskId=`
(word `state`, URLs inside the JSON *string* `resultJson`). Callbacks come in three forms:
Veo's `{code, msg, data: {taskId, info: {resultUrls}}}` whose status is the envelope `code`,
the Market's copy of the query answer, and seed 002's wrapper shapes (`status` + `result.video_url`
and friends, §4.4), all read by one normalizer.

Owns: building query requests, classifying Kie's body `code` (which can say "error" under
HTTP 200), normalizing bodies, and verifying the optional HMAC signature. It does not send
anything: the reconciler loop does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from reconciler import codec
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
    SignatureError,
    excerpt,
)
from reconciler.model import Observation, Status, Task, Video
from reconciler.providers.base import (
    PollFlow,
    Provider,
    RawDelivery,
    dig,
    number,
    one_by_one,
    percent,
    read_answer,
    require_object,
    retry_after,
    text,
    timestamp,
)

VEO = "veo"
JOBS = "jobs"

# Veo's `successFlag` (§4.1): 3 is "created successfully but upstream generation failed".
_SUCCESS_FLAGS: Mapping[int, Status] = {
    0: Status.PROCESSING,
    1: Status.COMPLETED,
    2: Status.FAILED,
    3: Status.FAILED,
}

# The Market API's `state` (§4.2).
_JOB_STATES: Mapping[str, Status] = {
    "waiting": Status.SUBMITTED,
    "queuing": Status.SUBMITTED,
    "generating": Status.PROCESSING,
    "success": Status.COMPLETED,
    "fail": Status.FAILED,
}

# Seed 002's wrapper words (`status: "completed"` …), which no Kie page documents (§4.4).
_WRAPPER_STATES: Mapping[str, Status] = {
    "submitted": Status.SUBMITTED,
    "queued": Status.SUBMITTED,
    "pending": Status.SUBMITTED,
    "waiting": Status.SUBMITTED,
    "queuing": Status.SUBMITTED,
    "processing": Status.PROCESSING,
    "generating": Status.PROCESSING,
    "running": Status.PROCESSING,
    "in_progress": Status.PROCESSING,
    "completed": Status.COMPLETED,
    "succeeded": Status.COMPLETED,
    "succeed": Status.COMPLETED,
    "success": Status.COMPLETED,
    "failed": Status.FAILED,
    "fail": Status.FAILED,
    "error": Status.FAILED,
}

# Veo callback codes (§4.1): 200 success; these mean the task failed.
_CALLBACK_FAILURE_CODES = frozenset({400, 422, 500, 501})

# Body codes of Kie's envelope (§4.2 code list) that concern the whole account or exchange.
_AUTH_CODES = frozenset({401, 402, 433, 505})  # auth, credits, sub-key limit, feature off
_SERVER_CODES = frozenset({455, 500})  # maintenance, server error
_GENERATION_FAILED = 501

# Seed 002's other URL locations, in the order that seed lists them.
_WRAPPER_URL_PATHS: tuple[tuple[str, ...], ...] = (
    ("result", "video_url"),
    ("video_url",),
    ("data", "video_url"),
    ("result", "videoUrl"),
    ("result", "video"),
    ("url",),
)

# How far the signature timestamp may be from our clock (the usual webhook replay window).
SIGNATURE_TOLERANCE_SECONDS = 300.0


class Kie(Provider):
    name = "kie"
    default_action = JOBS

    # --- polling -----------------------------------------------------------------------

    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        # Kie has no batch query: one request per task (batch_size is 1).
        return (yield from one_by_one(tasks, self._request, self._observe_answer))

    def _request(self, task: Task) -> httpx.Request:
        if _is_veo(task.action):
            path = "/api/v1/veo/record-info"
        else:
            path = "/api/v1/jobs/recordInfo"
        return httpx.Request("GET", self.base_url + path, params={"taskId": task.task_id})

    def _observe_answer(self, task: Task, response: httpx.Response) -> Observation:
        """One task's answer; `NotFound` and `BadPayload` concern only this task."""
        body = read_answer(response, self)
        if not isinstance(body, dict):
            raise BadPayload(f"{self.name}: expected a JSON object: {excerpt(response.text)}")
        if _code(body.get("code")) == _GENERATION_FAILED:
            return _generation_failed(task, body, _message(body))
        if not _has_task(body):
            # `{"code": 200, "data": null}`, `data: {}` or `{}` know nothing of the task.
            raise NotFound(f"{self.name}: no task {task.task_id!r}")
        observation = _observe(body, self.name, hint=task.task_id, callback=False)
        if observation.task_id != task.task_id:
            raise BadPayload(
                f"{self.name}: asked for task {task.task_id!r}, got {observation.task_id!r}"
            )
        return observation

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        # Kie's body code is the real verdict, also under HTTP 200 (§4.2).
        code = _code(body.get("code")) if isinstance(body, dict) else None
        if code is None or code == 200 or not isinstance(body, dict):
            return super().answer_error(response, body, now)  # no code: the status decides
        if code == _GENERATION_FAILED:
            return None  # "generation failed" is the task's outcome, not a broken exchange
        message = f"{self.name}: code {code}: {excerpt(_message(body) or response.content)}"
        if code == 429:
            return RateLimited(message, retry_after=retry_after(response, now))
        if code in _AUTH_CODES:
            return AuthRejected(message)
        if code in _SERVER_CODES or code >= 500:
            return ServerError(message, delay=retry_after(response, now))
        if code == 404:
            return NotFound(message)
        # An unlisted body code (422, other 4xx): a failing HTTP status speaks first.
        return super().answer_error(response, body, now) or BadPayload(message)

    # --- callbacks ---------------------------------------------------------------------

    def parse_callback(self, payload: object) -> Observation:
        body = require_object(payload, self.name)
        return _observe(body, self.name, hint=None, callback=True)

    def verify(self, delivery: RawDelivery) -> None:
        """Check Kie's optional HMAC (§4.3) when `KIE_WEBHOOK_HMAC_KEY` is set.

        The signature is `base64(HMAC-SHA256(taskId + "." + timestamp, key))`: it covers the
        task id and the time, **not the body**, so it authenticates the sender but a replayed
        or altered body with the same task id still verifies. The timestamp window bounds
        the replay.
        """
        secret = self.settings.webhook_secret
        if secret is None:
            return
        headers = {name.lower(): value for name, value in delivery.headers.items()}
        stamp = headers.get("x-webhook-timestamp", "").strip()
        signature = headers.get("x-webhook-signature", "").strip()
        if not stamp or not signature:
            raise SignatureError(f"{self.name}: missing X-Webhook-Timestamp or X-Webhook-Signature")
        # Plain ASCII digits only: int() would also take "+1_700…" or other scripts' digits.
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            raise SignatureError(f"{self.name}: X-Webhook-Timestamp is not an integer")
        skew = abs(int(self.clock.now().timestamp()) - int(stamp))
        if skew > SIGNATURE_TOLERANCE_SECONDS:
            raise SignatureError(f"{self.name}: signature timestamp is {skew} s off")
        task_id = _signed_task_id(delivery.body)
        if task_id is None:
            raise SignatureError(f"{self.name}: no taskId in the body to check the signature")
        expected = sign(secret.reveal(), task_id, stamp)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SignatureError(f"{self.name}: bad X-Webhook-Signature")


def sign(key: str, task_id: str, stamp: str) -> str:
    """Kie's webhook signature (also what a test or a simulator sends)."""
    digest = hmac.new(key.encode(), f"{task_id}.{stamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _signed_task_id(body: bytes) -> str | None:
    try:
        payload = codec.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    # Kie's sample verifier reads `data.task_id`; its bodies say `data.taskId` (§4.3).
    for path in (("data", "taskId"), ("data", "task_id"), ("taskId",), ("task_id",)):
        value = dig(payload, *path)
        if isinstance(value, str | int) and not isinstance(value, bool) and text(value):
            return str(value).strip()
    return None


# --- normalizing -----------------------------------------------------------------------


def _is_veo(action: str | None) -> bool:
    return (action or "").strip().lower() == VEO


def _code(value: object) -> int | None:
    """An envelope `code` as an integer (`200`, `"200"`), or None."""
    result = number(value)
    if result is None or not result.is_integer() or isinstance(value, bool):
        return None
    return int(result)


def _message(body: Mapping[str, Any]) -> str | None:
    # One Market page says `message` instead of `msg` (§4.2).
    return text(body.get("msg")) or text(body.get("message"))


def _has_task(payload: Mapping[str, Any]) -> bool:
    data = payload.get("data")
    if data is not None and data != {}:
        return True
    keys = ("taskId", "task_id", "status", "state", "result", "video_url", "url")
    return any(payload.get(key) is not None for key in keys)


def _task_id(value: object, provider: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadPayload(f"{provider}: task id is a {type(value).__name__}, not a string")
    return text(value)


def _find_task_id(body: Mapping[str, Any], data: Mapping[str, Any], provider: str) -> str | None:
    for where, key in ((data, "taskId"), (data, "task_id"), (body, "taskId"), (body, "task_id")):
        found = _task_id(where.get(key), provider)
        if found is not None:
            return found
    return None


def _observe(
    body: dict[str, Any], provider: str, *, hint: str | None, callback: bool
) -> Observation:
    """Normalize a query answer or a callback body (both carry the envelope)."""
    data = body.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise BadPayload(f"{provider}: `data` is a {type(data).__name__}, not an object")

    task_id = _find_task_id(body, data, provider) or hint
    if task_id is None:
        raise BadPayload(f"{provider}: callback has no taskId")

    code = _code(body.get("code"))
    status, provider_status, action = _status(body, data, provider)
    if status is None and provider_status is None and callback and code is not None:
        # Veo callbacks carry no status field: the envelope code is the verdict (§4.1).
        provider_status = f"code {code}"
        if code == 200:
            status = Status.COMPLETED
        elif code in _CALLBACK_FAILURE_CODES:
            status = Status.FAILED
        action = action or VEO
    elif callback and code in _CALLBACK_FAILURE_CODES:
        status = Status.FAILED  # a failure code outranks whatever the task object says

    error = (
        text(data.get("failMsg"))
        or text(data.get("errorMessage"))
        or (text(body.get("error")) if isinstance(body.get("error"), str) else None)
    )
    if status is Status.FAILED and error is None:
        fail_code = text(data.get("failCode")) or text(data.get("errorCode"))
        msg = _message(body)
        if msg is not None and msg.lower() in ("success", "ok"):
            msg = None
        error = msg or (f"failCode {fail_code}" if fail_code else None)

    return Observation(
        task_id=task_id,
        status=status,
        provider_status=provider_status,
        progress=_progress(data.get("progress", body.get("progress"))),
        videos=tuple(Video(url=url) for url in _urls(body, data)),
        error=error,
        provider_created_at=timestamp(data.get("createTime")),
        provider_updated_at=timestamp(data.get("updateTime"))
        or timestamp(data.get("completeTime")),
        action=action,
        raw=body,
    )


def _status(
    body: Mapping[str, Any], data: Mapping[str, Any], provider: str
) -> tuple[Status | None, str | None, str | None]:
    """(status, provider's own word, API family) from the first status field present.

    Status comes from the status field only, never from URLs being there: Kie documents
    `state: "waiting"` next to a filled `resultJson` (§4.2, §6.3).
    """
    flag = data.get("successFlag")
    if flag is not None:
        value = _code(flag)
        if value is None:
            raise BadPayload(f"{provider}: successFlag {excerpt(str(flag))!r} is not an integer")
        return _SUCCESS_FLAGS.get(value), f"successFlag {value}", VEO
    state = data.get("state")
    if state is not None:
        if not isinstance(state, str):
            raise BadPayload(f"{provider}: state is a {type(state).__name__}, not a string")
        word = state.strip()
        return _JOB_STATES.get(word.lower()), word or None, JOBS
    action = VEO if isinstance(data.get("info"), dict) else None
    for where in (body, data):
        status = where.get("status")
        if status is None:
            continue
        if not isinstance(status, str):
            raise BadPayload(f"{provider}: status is a {type(status).__name__}, not a string")
        status = status.strip()
        return _WRAPPER_STATES.get(status.lower()), status or None, action
    return None, None, action


def _urls(body: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """Result URLs from the first location that has any (original `originUrls` ignored)."""
    candidates: list[object] = []
    for holder in (data.get("response"), data.get("info")):  # query, then Veo callback
        if isinstance(holder, dict):
            candidates += [holder.get("resultUrls"), holder.get("result_urls")]
    result_json = _result_json(data.get("resultJson"))
    candidates += [result_json.get("resultUrls"), result_json.get("result_urls")]
    candidates += [dig(body, *path) for path in _WRAPPER_URL_PATHS]
    for candidate in candidates:
        urls = _url_list(candidate)
        if urls:
            return urls
    return []


def _result_json(value: object) -> dict[str, Any]:
    """`resultJson` decoded on its own. Its sibling `param` is never parsed: Kie's published
    example holds an invalid escape there (§6.4). A bad `resultJson` means no URLs."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return {}
    try:
        decoded = codec.loads(value)
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _url_list(value: object) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    urls: list[str] = []
    for item in value:
        if isinstance(item, str) and item.strip() and item.strip() not in urls:
            urls.append(item.strip())
    return urls


def _progress(value: object) -> int | None:
    """Percent from Kie's "0.00"-"1.00" fractions (4o record-info, §4.1) or a plain percent."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return percent(value)
    amount = number(value)
    if amount is None:
        return None
    # An integer above 1 can only be a percent; a decimal up to 1 is Kie's fraction.
    return percent(amount, fraction=amount <= 1 and not isinstance(value, int))


def _generation_failed(task: Task, payload: dict[str, Any], detail: str | None) -> Observation:
    """A query answered with code 501 "generation failed" (§4.2)."""
    try:
        observation = _observe(payload, Kie.name, hint=task.task_id, callback=False)
    except BadPayload:
        observation = Observation(task_id=task.task_id, status=None, raw=payload)
    return Observation(
        task_id=task.task_id,
        status=Status.FAILED,
        provider_status=observation.provider_status or "code 501",
        progress=observation.progress,
        error=observation.error or detail or "generation failed",
        provider_created_at=observation.provider_created_at,
        provider_updated_at=observation.provider_updated_at,
        action=observation.action,
        raw=payload,
    )

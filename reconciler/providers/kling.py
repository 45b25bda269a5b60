"""Kling's official API (legacy generation, `/v1/videos/{action}`): the JWT, queries,
callbacks and their Standard Webhooks signature.

This module also owns the reading of Kling's task object, because two other adapters carry
it unchanged: CometAPI passes Kling's envelope through, and gateways nest it inside their
own answer. `observe_kling_task`, `parse_kling_payload`, `kling_error` and `kling_path` are
shared with them. What this module does not own: sending requests, rate limits and retries
(the reconciler loop), and what an observation does to a task (`state.py`).

Sources: PROVIDERS.md §1 (endpoints §1.2, task object §1.3, list §1.4, callbacks §1.5 and
§1.9, errors §1.6, JWT §1.8) and seed 000 (the "hybrid" direct-then-list strategy, and the
extra URL locations it lists).
"""

from __future__ import annotations

import hmac
import json
import logging
import warnings
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import jwt
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from reconciler.clock import Clock
from reconciler.config import ProviderSettings
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    ConfigError,
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
    PollResult,
    Provider,
    RawDelivery,
    check,
    dig,
    number,
    require_object,
    retry_after,
    text,
    timestamp,
)

logger = logging.getLogger(__name__)

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
    code: int, response: httpx.Response, provider: str, now: datetime | None = None
) -> ProviderError:
    """The error for a Kling business code (PROVIDERS §1.6). HTTP 429 means five different
    things there, so the code decides, never the HTTP status alone."""
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


def read_kling_answer(response: httpx.Response, provider: str, now: datetime | None) -> object:
    """The decoded body of a Kling-shaped answer, or the error it means."""
    try:
        body: object = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        if 400 <= response.status_code < 500:
            check(response, provider)  # no business code to say more: the status decides
        raise ServerError(
            f"{provider}: HTTP {response.status_code} answer is not JSON: "
            f"{excerpt(response.content)}",
            delay=retry_after(response, now),
        ) from None
    code = business_code(body)
    if code is not None:
        raise kling_error(code, response, provider, now)
    check(response, provider)
    return body


# --- auth -----------------------------------------------------------------------------------


class KlingJWTAuth(httpx.Auth):
    """Bearer JWT minted from the access key and secret key (PROVIDERS §1.1, §1.8).

    The token is cached and re-minted when less than `renew_seconds` of its 30 minutes
    remain; a 401 re-mints once and retries, which covers a token rejected as expired or
    not yet valid (codes 1003/1004) because of clock skew.
    """

    lifetime_seconds: ClassVar[int] = 1800
    renew_seconds: ClassVar[int] = 300

    def __init__(self, access_key: str, secret_key: str, clock: Clock) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock
        self._token: str | None = None
        self._expires: datetime | None = None

    def token(self, renew: bool = False) -> str:
        now = self._clock.now()
        if (
            renew
            or self._token is None
            or self._expires is None
            or self._expires - now < timedelta(seconds=self.renew_seconds)
        ):
            issued = int(now.timestamp())
            # Exactly iss/exp/nbf, as Kling's own sample: no iat.
            claims = {
                "iss": self._access_key,
                "exp": issued + self.lifetime_seconds,
                "nbf": issued - 5,
            }
            with warnings.catch_warnings():
                # PyJWT warns about HMAC keys under 32 bytes; the key is Kling's to choose.
                warnings.filterwarnings("ignore", "The HMAC key", UserWarning)
                self._token = jwt.encode(
                    claims, self._secret_key, algorithm="HS256", headers={"typ": "JWT"}
                )
            self._expires = now + timedelta(seconds=self.lifetime_seconds)
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self.token(renew=True)}"
            yield request

    def __repr__(self) -> str:
        return "KlingJWTAuth('**********')"


# --- the adapter ----------------------------------------------------------------------------


class Kling(Provider):
    name = "kling"
    # Several due tasks of one action are resolved by one list request.
    batch_size = 50
    # The list's maximum page (PROVIDERS §1.2): it is newest first, so a big page reaches
    # further back; one 500-item page is still one request.
    list_page_size: ClassVar[int] = 500
    webhook_tolerance: ClassVar[timedelta] = timedelta(minutes=5)

    def __init__(self, settings: ProviderSettings, clock: Clock | None = None) -> None:
        super().__init__(settings, clock)
        self._auth: KlingJWTAuth | None = None
        if settings.api_key is not None and settings.secret_key is not None:
            self._auth = KlingJWTAuth(
                settings.api_key.reveal(), settings.secret_key.reveal(), self.clock
            )
        self._webhook: Webhook | None = None
        if settings.webhook_secret is not None:
            try:
                self._webhook = Webhook(settings.webhook_secret.reveal())
            except (ValueError, EmptyWebhookSecretError, RuntimeError) as error:
                raise ConfigError(
                    "KLING_WEBHOOK_SECRET is not a Standard Webhooks secret (whsec_<base64>)."
                ) from error

    def auth(self) -> httpx.Auth | None:
        return self._auth

    # --- callbacks

    def verify(self, delivery: RawDelivery) -> None:
        """Standard Webhooks (PROVIDERS §1.9), checked only when a secret is configured.

        The package's `Webhook.verify` reads the wall clock for its ±5 min window; we check
        the window against our own clock and let the package compute the signature, then
        compare each offered `v1` signature in constant time.
        """
        if self._webhook is None:
            return
        headers = {key.lower(): value for key, value in delivery.headers.items()}
        msg_id = headers.get("webhook-id")
        msg_timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and msg_timestamp and signatures):
            raise SignatureError(
                "kling: missing webhook-id, webhook-timestamp or webhook-signature"
            )
        try:
            sent_at = datetime.fromtimestamp(float(msg_timestamp), UTC)
        except (ValueError, OverflowError, OSError):
            raise SignatureError("kling: webhook-timestamp is not a Unix time") from None
        if abs(self.clock.now() - sent_at) > self.webhook_tolerance:
            raise SignatureError("kling: webhook-timestamp is outside the 5 minute tolerance")
        try:
            body = delivery.body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError("kling: signed body is not UTF-8") from None
        expected = self._webhook.sign(msg_id, sent_at, body).partition(",")[2].encode()
        for offered in signatures.split():
            version, _, value = offered.partition(",")
            if version == "v1" and hmac.compare_digest(expected, value.encode()):
                return
        raise SignatureError("kling: no webhook-signature matches")

    def parse_callback(self, payload: object) -> Observation:
        return parse_kling_payload(payload, self.name)

    # --- polling

    def query_request(self, task: Task) -> httpx.Request:
        path = kling_path(task.action, self.default_action)
        return httpx.Request("GET", f"{self.base_url}/v1/{path}/{quote_id(task.task_id)}")

    def list_request(self, action: str) -> httpx.Request:
        path = kling_path(action, self.default_action)
        return httpx.Request(
            "GET",
            f"{self.base_url}/v1/{path}",
            params={"pageNum": 1, "pageSize": self.list_page_size},
        )

    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        if not tasks:
            return []
        if len(tasks) == 1:
            # Seed 000's hybrid: direct query first, the list only when it finds nothing.
            task = tasks[0]
            result = yield from self._query(task)
            if result is not None:
                return [result]
            listed = yield from self._list(task.action)
            found = _match(listed, task)
            if found is not None:
                return [PollResult(task.task_id, observation=found)]
            return [PollResult(task.task_id, error=self._not_found(task))]
        # Several tasks of one action: one list request answers the recent ones, then a
        # direct query for each task the list does not show.
        listed = yield from self._list(tasks[0].action)
        results: list[PollResult] = []
        for task in tasks:
            found = _match(listed, task)
            if found is not None:
                results.append(PollResult(task.task_id, observation=found))
                continue
            result = yield from self._query(task)
            results.append(result or PollResult(task.task_id, error=self._not_found(task)))
        return results

    def _not_found(self, task: Task) -> NotFound:
        return NotFound(f"{self.name}: task {task.task_id} not found by query nor on the list")

    def _query(self, task: Task) -> Generator[httpx.Request, httpx.Response, PollResult | None]:
        """The direct query: a result, or None when Kling does not know the id."""
        response = yield self.query_request(task)
        try:
            body = read_kling_answer(response, self.name, self.clock.now())
        except NotFound:
            return None
        except BadPayload as error:
            # Kling's answer for an unknown id is undocumented; 400 with 1201 is one
            # candidate (PROVIDERS trap 7), so let the list have a say.
            if response.status_code == 400 and business_code_of(response) == 1201:
                return None
            return PollResult(task.task_id, error=error)
        try:
            return PollResult(task.task_id, observation=parse_kling_payload(body, self.name))
        except BadPayload as error:
            return PollResult(task.task_id, error=error)

    def _list(self, action: str) -> Generator[httpx.Request, httpx.Response, list[Observation]]:
        response = yield self.list_request(action)
        try:
            body = read_kling_answer(response, self.name, self.clock.now())
        except NotFound:
            return []
        data = dig(body, "data")
        # The official list is `data: [...]`; seed 000 shows `data.list`.
        items = data if isinstance(data, list) else dig(data, "list")
        if not isinstance(items, list):
            raise BadPayload(f"{self.name}: the list answer has no task array")
        return list(_observe_items(items, self.name))


def business_code_of(response: httpx.Response) -> int | None:
    try:
        return business_code(json.loads(response.content))
    except (ValueError, UnicodeDecodeError):
        return None


def _observe_items(items: list[Any], provider: str) -> Iterator[Observation]:
    for item in items:
        try:
            yield parse_kling_task_object(item, provider)
        except BadPayload as error:
            # One odd item must not hide the others.
            logger.debug("%s: skipped a list item: %s", provider, error)


def _match(listed: list[Observation], task: Task) -> Observation | None:
    # The id we hold may be Kling's task_id or the caller's external_task_id (§1.2).
    wanted = {task.task_id, task.external_task_id} - {None}
    for observation in listed:
        if observation.task_id in wanted or observation.external_task_id in wanted:
            return observation
    return None

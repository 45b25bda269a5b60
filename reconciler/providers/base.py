"""The adapter interface every provider module implements, and the small tools they share.

Adapters are sans-I/O: `poll()` is a generator that yields `httpx.Request`s and receives
`httpx.Response`s (like `httpx.Auth.auth_flow`), and `parse_callback()` turns a decoded JSON
body into an `Observation`. The reconciler loop sends the requests, so rate limits, timeouts,
retries and metrics live in one place, and untrusted JSON never leaves `providers/`.

A poll flow returns one `PollResult` per task it was given: an observation, or a task-level
`ProviderError` (`NotFound`, `BadPayload`). An error that concerns the whole exchange
(rate limit, auth, 5xx, a body we cannot read) is raised out of the flow instead.

Every answer is classified by one function, `read_answer`: it decodes the body and asks the
adapter's two hooks what it means. `Provider.answer_error` reads a decoded answer (by
default the HTTP status decides, through `status_error`; an adapter whose body says more,
an error envelope or a business code, overrides it), and `Provider.not_json_error` reads one
that is not JSON (by default its status, else an unreadable answer to try again later).
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx

from reconciler import codec
from reconciler.clock import Clock, SystemClock
from reconciler.config import ProviderSettings
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
    excerpt,
)
from reconciler.model import Observation, Task


@dataclass(frozen=True, slots=True)
class PollResult:
    task_id: str
    observation: Observation | None = None
    error: ProviderError | None = None


PollFlow = Generator[httpx.Request, httpx.Response, list[PollResult]]


@dataclass(frozen=True, slots=True)
class RawDelivery:
    """A webhook request as received: what signature checks need."""

    headers: Mapping[str, str]  # lower-case names
    body: bytes


class Provider(abc.ABC):
    name: ClassVar[str]
    # > 1 where one request answers many ids (AceData retrieve_batch, Kling's list).
    batch_size: ClassVar[int] = 1
    default_action: ClassVar[str] = "text2video"

    def __init__(self, settings: ProviderSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()

    @property
    def base_url(self) -> str:
        if not self.settings.base_url:
            raise AuthRejected(f"{self.name}: no base URL configured")
        return self.settings.base_url

    def auth(self) -> httpx.Auth | None:
        """Bearer with the configured key by default; Kling mints a JWT."""
        key = self.settings.api_key
        return BearerAuth(key.reveal()) if key is not None else None

    def verify(self, delivery: RawDelivery) -> None:  # noqa: B027 - most providers sign nothing
        """Raise `SignatureError` when the provider signs callbacks and this one is wrong."""

    def batch_key(self, task: Task) -> Hashable:
        """Tasks with equal keys may share one batch request."""
        return task.action

    @abc.abstractmethod
    def parse_callback(self, payload: object) -> Observation:
        """Turn a decoded callback body into an observation; raise `BadPayload` if we can't."""

    @abc.abstractmethod
    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        """Query the provider about `tasks` (at most `batch_size`, equal `batch_key`)."""

    # --- the hooks of `read_answer`

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        """The error a decoded answer stands for, or None for an answer to read. The HTTP
        status decides here; an adapter whose body says more (an error envelope, a business
        code, also under HTTP 200) overrides this and falls back on it."""
        return status_error(response, describe(response, self.name), now)

    def not_json_error(self, response: httpx.Response, now: datetime) -> ProviderError:
        """The error an answer that is not JSON stands for: what its status means, else an
        unreadable answer (a proxy's HTML page, a cut-off body) to try again later."""
        error = status_error(response, describe(response, self.name), now)
        return error or unreadable(response, self.name, now)


def one_by_one(
    tasks: Sequence[Task],
    request_for: Callable[[Task], httpx.Request],
    observe: Callable[[Task, httpx.Response], Observation],
) -> PollFlow:
    """The poll flow of a provider with no batch query: one request per task. `observe`
    raises `NotFound`/`BadPayload` for that task, anything else for the whole exchange."""
    results: list[PollResult] = []
    for task in tasks:
        response = yield request_for(task)
        try:
            results.append(PollResult(task.task_id, observation=observe(task, response)))
        except (NotFound, BadPayload) as error:
            results.append(PollResult(task.task_id, error=error))
    return results


class BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "BearerAuth('**********')"


# --- classifying answers ---------------------------------------------------------------


def read_answer(response: httpx.Response, provider: Provider) -> object:
    """The decoded body of `provider`'s answer, or the `ProviderError` it stands for.

    The one place where an answer is classified (Kopf's `check_response()` is the model):
    a body that is not JSON goes to `provider.not_json_error`, a decoded one to
    `provider.answer_error`. Echoed bodies are cut short by `excerpt`.
    """
    now = provider.clock.now()
    try:
        body: object = codec.loads(response.content)
    except (ValueError, RecursionError) as undecodable:  # UnicodeDecodeError is a ValueError
        raise provider.not_json_error(response, now) from undecodable
    error = provider.answer_error(response, body, now)
    if error is not None:
        raise error
    return body


def status_error(response: httpx.Response, message: str, now: datetime) -> ProviderError | None:
    """What an HTTP status means by itself; None below 400."""
    status = response.status_code
    if status < 400:
        return None
    if status == 429:
        return RateLimited(message, retry_after=retry_after(response, now))
    if status in (401, 403):
        return AuthRejected(message)
    if status == 404:
        return NotFound(message)
    if status >= 500 or status in (408, 425):
        return ServerError(message, delay=retry_after(response, now))
    return BadPayload(message)


def unreadable(response: httpx.Response, provider: str, now: datetime) -> ServerError:
    """An answer that is not JSON, to try again later."""
    message = describe(response, provider, decoded=False)
    return ServerError(message, delay=retry_after(response, now))


def describe(response: httpx.Response, provider: str, *, decoded: bool = True) -> str:
    """An error message naming the status, whether the body is JSON, and its start."""
    what = "" if decoded else " answer is not JSON"
    return f"{provider}: HTTP {response.status_code}{what}: {excerpt(response.content)}"


def retry_after(response: httpx.Response, now: datetime) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- reading untrusted JSON ------------------------------------------------------------


def dig(data: object, *path: str | int) -> Any:
    """`data[p0][p1]…`, or None as soon as a step is missing or of the wrong type."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(data, list) or not -len(data) <= step < len(data):
                return None
        elif not isinstance(data, dict):
            return None
        data = data[step] if isinstance(step, int) else data.get(step)  # type: ignore[union-attr]
        if data is None:
            return None
    return data


def text(value: object) -> str | None:
    """A non-empty string, from a string or a number; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def number(value: object) -> float | None:
    """A finite number from a number or numeric string ("5.1", "5s" is not one)."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            result = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):  # "5s", or an integer too large for a float
        return None
    return result if math.isfinite(result) else None


_PERCENT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*%\s*$")


def percent(value: object, fraction: bool = False) -> int | None:
    """Progress as an integer percent, from 42, 42.5, "42", "42%", or with `fraction`
    from "0.42" (Kie's 0.00-1.00 scale). Clamped to 0-100."""
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match:
            value, fraction = match.group(1), False
    result = number(value)
    if result is None:
        return None
    if fraction:
        result *= 100
    return max(0, min(100, round(result)))


_NAIVE = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?$")


def timestamp(value: object) -> datetime | None:
    """A provider timestamp as aware UTC: epoch milliseconds, seconds or float seconds
    (told apart by magnitude), ISO 8601, or naive `YYYY-MM-DD HH:MM:SS` (read as UTC).
    Zero and garbage give None."""
    if value is None:  # most records lack most of their times
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if _NAIVE.match(stripped):
            try:
                return datetime.fromisoformat(stripped.replace(" ", "T")).replace(tzinfo=UTC)
            except ValueError:
                return None
        try:
            parsed = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        if parsed is not None:
            try:
                return parsed.astimezone(UTC)
            except OverflowError:  # its offset moves it past the first or last day there is
                return None
    seconds = number(value)
    if seconds is None or seconds <= 0:
        return None
    if seconds > 1e11:  # milliseconds: 1e11 s would be the year 5138
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def require_object(payload: object, provider: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise BadPayload(f"{provider}: expected a JSON object, got {type(payload).__name__}")
    return payload

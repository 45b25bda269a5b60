"""The one classifier of provider answers, `base.read_answer`, and its hooks: a table per rule.

The adapters' own rules (Kling's codes, the envelopes of CometAPI, AceData and Kie) are tested
with each adapter; here a plain adapter shows the rules every provider shares, and two small
adapters show how a hook changes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from reconciler.clock import FakeClock
from reconciler.config import ProviderSettings
from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    ProviderError,
    RateLimited,
    ServerError,
)
from reconciler.model import Observation, Status, Task
from reconciler.providers.base import (
    PollFlow,
    Provider,
    one_by_one,
    read_answer,
    require_object,
    unreadable,
)
from tests.providers.support import new_task, offline

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Plain(Provider):
    """An adapter with no rule of its own: every hook as `Provider` defines it. Its query
    answers `{"task_id", "status"}`."""

    name = "plain"

    def parse_callback(self, payload: object) -> Observation:
        body = require_object(payload, self.name)
        return Observation(task_id=str(body["task_id"]), status=Status(body["status"]))

    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        return (yield from one_by_one(tasks, self.query, self.observe))

    def query(self, task: Task) -> httpx.Request:
        return httpx.Request("GET", f"{self.base_url}/tasks/{task.task_id}")

    def observe(self, task: Task, response: httpx.Response) -> Observation:
        return self.parse_callback(read_answer(response, self))


class Enveloped(Plain):
    """A provider whose body says more than its status: `{"error": word}`, also under 200."""

    name = "enveloped"

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        word = body.get("error") if isinstance(body, dict) else None
        if word == "busy":
            return RateLimited("busy", retry_after=60.0)
        if word == "done":
            return None  # an outcome the flow reads, whatever the status
        return super().answer_error(response, body, now)


class Paged(Plain):
    """A provider whose pages that are not JSON are never more than a wrong path."""

    name = "paged"

    def not_json_error(self, response: httpx.Response, now: datetime) -> ProviderError:
        return unreadable(response, self.name, now)


def answer(
    status: int, body: object = None, *, content: bytes | None = None, **headers: str
) -> httpx.Response:
    """An answer with `body` as JSON, or with `content` as it is."""
    data = content if content is not None else json.dumps(body).encode()
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    return httpx.Response(status, content=data, headers=headers)


def read(response: httpx.Response, provider: type[Provider] = Plain) -> object:
    settings = ProviderSettings(name=provider.name, base_url="https://provider.test")
    return read_answer(response, provider(settings, clock=FakeClock(NOW)))


def raised(response: httpx.Response, provider: type[Provider] = Plain) -> ProviderError:
    with pytest.raises(ProviderError) as error:
        read(response, provider)
    return error.value


# --- a JSON answer: the HTTP status decides ----------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 203, 301, 302, 304, 399])
def test_a_json_answer_below_400_is_returned_decoded(status: int) -> None:
    assert read(answer(status, {"task": {"id": "t1"}})) == {"task": {"id": "t1"}}


@pytest.mark.parametrize("body", [None, [], [1, "two"], "text", 42, 4.5, True, {}])
def test_any_json_value_is_an_answer(body: object) -> None:
    """What the value means is the adapter's to say; the classifier only decodes it."""
    assert read(answer(200, body)) == body


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, BadPayload),
        (401, AuthRejected),
        (402, BadPayload),
        (403, AuthRejected),
        (404, NotFound),
        (405, BadPayload),
        (408, ServerError),
        (409, BadPayload),
        (422, BadPayload),
        (425, ServerError),
        (429, RateLimited),
        (451, BadPayload),
        (500, ServerError),
        (501, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (524, ServerError),
    ],
)
def test_a_failing_status_decides(status: int, expected: type[ProviderError]) -> None:
    error = raised(answer(status, {"message": "no"}))
    assert type(error) is expected
    assert str(error) == f'plain: HTTP {status}: {{"message": "no"}}'


# --- an answer that is not JSON ----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"<!doctype html><title>Login</title>",
        b"",
        b"not json",
        b'{"cut": ',
        b'{"message": "\xc3\x28"}',  # not UTF-8
        b"NaN NaN",
    ],
)
def test_a_page_that_is_not_json_is_tried_again_later(content: bytes) -> None:
    error = raised(answer(200, content=content))
    assert type(error) is ServerError
    assert str(error).startswith("plain: HTTP 200 answer is not JSON:")
    # The decoding failure is the cause, for the log's traceback.
    assert isinstance(error.__cause__, ValueError)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, ServerError),
        (301, ServerError),  # a redirect to a page: a wrong path or a proxy
        (401, AuthRejected),
        (403, AuthRejected),
        (404, NotFound),
        (400, BadPayload),
        (429, RateLimited),
        (502, ServerError),
    ],
)
def test_a_page_that_is_not_json_has_its_status_say_more(
    status: int, expected: type[ProviderError]
) -> None:
    assert type(raised(answer(status, content=b"<html>Bad Gateway</html>"))) is expected


# --- Retry-After --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),  # never a delay into the past
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),
        ("Sun, 01 Mar 2026 12:00:30", 30.0),  # a date without a zone is read as UTC
        ("soon", None),
        ("", None),
        ("inf", None),
        ("nan", None),
        ("1e400", None),  # beyond any float
        ("5s", None),
    ],
)
def test_retry_after_forms(value: str, seconds: float | None) -> None:
    limited = raised(answer(429, {}, retry_after=value))
    assert isinstance(limited, RateLimited)
    assert limited.retry_after == seconds
    assert limited.delay == seconds
    unavailable = raised(answer(503, {}, retry_after=value))
    assert isinstance(unavailable, ServerError)
    assert unavailable.delay == seconds


def test_retry_after_is_absent_without_the_header() -> None:
    limited = raised(answer(429, {}))
    assert isinstance(limited, RateLimited)
    assert limited.retry_after is None


def test_retry_after_is_honoured_on_a_page_that_is_not_json() -> None:
    unavailable = raised(answer(200, content=b"<html>", retry_after="20"))
    assert isinstance(unavailable, ServerError)
    assert unavailable.delay == 20.0


# --- huge and missing fields ---------------------------------------------------------------


def test_a_huge_body_is_cut_short_in_the_message() -> None:
    body = {"message": "x" * 1_000_000}
    message = str(raised(answer(500, body)))
    assert message.startswith('plain: HTTP 500: {"message": "xxx')
    assert message.endswith("…")
    assert len(message) < 250


def test_a_huge_page_is_cut_short_and_flattened_in_the_message() -> None:
    page = b"<html>\n  <body>\n" + b"<p>down</p>\n" * 100_000 + b"</html>"
    message = str(raised(answer(502, content=page)))
    assert message.startswith("plain: HTTP 502: <html> <body> <p>down</p> <p>down</p>")
    assert "\n" not in message
    assert len(message) < 250


def test_huge_numbers_are_decoded_not_refused() -> None:
    """An integer too large for a float is still JSON: it reads as the codec reads every body
    (callbacks too), as an infinite float, and what it means is the adapter's business."""
    assert read(answer(200, content=b'{"code": 1' + b"0" * 400 + b"}")) == {"code": float("inf")}


@pytest.mark.parametrize("status", [200, 404])
def test_an_answer_nested_too_deep_to_decode_is_not_json(status: int) -> None:
    """The decoder gives up with RecursionError, which is no answer we can read either; the
    loop would only log it as a failing adapter."""
    error = raised(answer(status, content=b"[" * 100_000 + b"]" * 100_000))
    assert type(error) is (ServerError if status == 200 else NotFound)
    assert isinstance(error.__cause__, RecursionError)


def test_a_failing_status_with_no_body_at_all() -> None:
    error = raised(answer(503, content=b""))
    assert type(error) is ServerError
    assert str(error) == "plain: HTTP 503: "


# --- the hooks ------------------------------------------------------------------------------


def test_a_body_can_say_more_than_a_success_status() -> None:
    limited = raised(answer(200, {"error": "busy"}), Enveloped)
    assert isinstance(limited, RateLimited)
    assert limited.retry_after == 60.0


def test_a_body_can_say_more_than_a_failing_status() -> None:
    assert type(raised(answer(401, {"error": "busy"}), Enveloped)) is RateLimited


def test_a_body_can_be_an_answer_under_a_failing_status() -> None:
    assert read(answer(500, {"error": "done"}), Enveloped) == {"error": "done"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"error": "other"}, NotFound),
        (404, {}, NotFound),  # no envelope field at all
        (503, [], ServerError),
        (429, {"error": None}, RateLimited),
    ],
)
def test_a_body_with_nothing_to_say_leaves_it_to_the_status(
    status: int, body: object, expected: type[ProviderError]
) -> None:
    assert type(raised(answer(status, body), Enveloped)) is expected


def test_the_envelope_hook_is_not_asked_about_pages() -> None:
    assert type(raised(answer(404, content=b"busy"), Enveloped)) is NotFound


@pytest.mark.parametrize("status", [200, 400, 404, 500])
def test_the_page_hook_decides_for_pages(status: int) -> None:
    error = raised(answer(status, content=b"<html>"), Paged)
    assert type(error) is ServerError
    assert str(error) == f"paged: HTTP {status} answer is not JSON: <html>"


def test_the_page_hook_is_not_asked_about_json() -> None:
    assert type(raised(answer(404, {}), Paged)) is NotFound


# --- in a poll flow -------------------------------------------------------------------------


def test_in_a_one_by_one_flow_task_errors_are_results_and_the_rest_is_raised() -> None:
    provider = Plain(ProviderSettings(name="plain", base_url="https://provider.test"))
    answers = {
        "/tasks/a": answer(200, {"task_id": "a", "status": "processing"}),
        "/tasks/b": answer(404, {"message": "no such task"}),
        "/tasks/c": answer(400, content=b"<html>Bad Request</html>"),
    }
    results = offline(
        provider.poll([new_task("plain", task_id, "text2video") for task_id in "abc"]),
        lambda request: answers[request.url.path],
    )
    assert [result.task_id for result in results] == ["a", "b", "c"]
    assert results[0].observation is not None
    assert results[0].observation.status is Status.PROCESSING
    assert isinstance(results[1].error, NotFound)
    assert isinstance(results[2].error, BadPayload)
    with pytest.raises(RateLimited):
        offline(provider.poll([new_task("plain", "a", "text2video")]), lambda _: answer(429, {}))


def test_an_answer_with_a_lone_surrogate_reads_as_the_replacement_character() -> None:
    """A string cut inside a UTF-16 pair must not make the poll's write fail later."""
    provider = Plain(ProviderSettings(name="plain", base_url="https://provider.test"))
    response = httpx.Response(200, content=b'{"code": 0, "msg": "cut \\ud83c here"}')
    assert read_answer(response, provider) == {"code": 0, "msg": "cut \ufffd here"}

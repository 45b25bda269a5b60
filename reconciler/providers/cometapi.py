"""CometAPI's Kling passthrough: one query per task, Kling's own envelope on success,
OpenAI-style errors otherwise.

This module owns only CometAPI's error envelope. The query path and poll flow are
`passthrough.py`'s, the Kling task object is read by `kling_task.py`. Sources: PROVIDERS.md
§3 and seed 003.

Paths: CometAPI's route is `/kling/v1/{family}/{action}/{task_id}` with family `videos`,
`images` or `audio`. A task's action is Kling's (`text2video`, `avatar/image2video`), so the
`videos` family is put in front, giving the documented four-segment path for avatar tasks;
an action that already names its family (`images/generations`, `audio/text-to-audio`) is used
as it is (`kling_task.kling_path`).
"""

from __future__ import annotations

from datetime import datetime

import httpx

from reconciler.errors import AuthRejected, BadPayload, NotFound, ProviderError, ServerError
from reconciler.model import Observation
from reconciler.providers.base import (
    describe,
    dig,
    retry_after,
    status_error,
    text,
    unreadable,
)
from reconciler.providers.kling_task import kling_error, parse_kling_payload
from reconciler.providers.passthrough import KlingPassthrough

# new-api's "task does not exist" word, which CometAPI (same lineage) is likely to share.
_NOT_FOUND_WORDS = ("task_not_exist", "task not exist", "task_not_found")


class CometAPI(KlingPassthrough):
    name = "cometapi"

    def parse_callback(self, payload: object) -> Observation:
        # CometAPI documents Kling's legacy callback body (PROVIDERS §3).
        return parse_kling_payload(payload, self.name)

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        message = describe(response, self.name)
        error = dig(body, "error")
        if isinstance(error, dict):
            code = (text(error.get("code")) or "").lower()
            words = (text(error.get("message")) or "").lower()
            if code == "invalid_request":
                # Documented as HTTP 500 yet permanent: a malformed request (trap 6).
                return BadPayload(message)
            if any(word in code or word in words for word in _NOT_FOUND_WORDS):
                return NotFound(message)
            # An error object on a 2xx answer is no task either.
            return self._status_error(response, message, now) or BadPayload(message)
        # A Kling error passed through keeps Kling's meaning.
        return kling_error(response, body, self.name, now) or self._status_error(
            response, message, now
        )

    def not_json_error(self, response: httpx.Response, now: datetime) -> ProviderError:
        # Wrong paths come back as a 301 or an HTML page, not a JSON 404 (PROVIDERS §3); a
        # gateway page in front of an outage looks the same. Try again later, unless the
        # status alone says more.
        error = None
        if response.status_code in (401, 402, 403, 429):
            error = self._status_error(response, describe(response, self.name), now)
        return error or unreadable(response, self.name, now)

    def _status_error(
        self, response: httpx.Response, message: str, now: datetime
    ) -> ProviderError | None:
        """The common status table, and two statuses that mean more at CometAPI."""
        status = response.status_code
        if status == 402:  # the balance
            return AuthRejected(message)
        if 300 <= status < 400:  # a redirect means a wrong path or a proxy page
            return ServerError(message, delay=retry_after(response, now))
        return status_error(response, message, now)

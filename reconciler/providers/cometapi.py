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

import json

import httpx

from reconciler.errors import (
    AuthRejected,
    BadPayload,
    NotFound,
    RateLimited,
    ServerError,
    excerpt,
)
from reconciler.model import Observation
from reconciler.providers.base import dig, retry_after, text
from reconciler.providers.kling_task import business_code, kling_error, parse_kling_payload
from reconciler.providers.passthrough import KlingPassthrough

# new-api's "task does not exist" word, which CometAPI (same lineage) is likely to share.
_NOT_FOUND_WORDS = ("task_not_exist", "task not exist", "task_not_found")


class CometAPI(KlingPassthrough):
    name = "cometapi"

    def parse_callback(self, payload: object) -> Observation:
        # CometAPI documents Kling's legacy callback body (PROVIDERS §3).
        return parse_kling_payload(payload, self.name)

    def read_answer(self, response: httpx.Response) -> object:
        """The decoded body, or the error it means."""
        status = response.status_code
        now = self.clock.now()
        summary = f"{self.name}: HTTP {status}: {excerpt(response.content)}"
        try:
            body: object = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            # Wrong paths come back as a 301 or an HTML page, not a JSON 404 (PROVIDERS §3);
            # a gateway page in front of an outage looks the same. Try again later, unless
            # the status alone says more.
            if status in (401, 402, 403, 429):
                self._raise_for_status(response, summary)
            raise ServerError(
                f"{self.name}: HTTP {status} answer is not JSON: {excerpt(response.content)}",
                delay=retry_after(response, now),
            ) from None
        error = dig(body, "error")
        if isinstance(error, dict):
            code = (text(error.get("code")) or "").lower()
            message = (text(error.get("message")) or "").lower()
            if code == "invalid_request":
                # Documented as HTTP 500 yet permanent: a malformed request (trap 6).
                raise BadPayload(summary)
            if any(word in code or word in message for word in _NOT_FOUND_WORDS):
                raise NotFound(summary)
            self._raise_for_status(response, summary)
            raise BadPayload(summary)  # an error object on a 2xx answer
        kling_code = business_code(body)
        if kling_code is not None:  # a Kling error passed through
            raise kling_error(kling_code, response, self.name, now)
        self._raise_for_status(response, summary)
        return body

    def _raise_for_status(self, response: httpx.Response, summary: str) -> None:
        status = response.status_code
        now = self.clock.now()
        if status == 429:
            raise RateLimited(summary, retry_after=retry_after(response, now))
        if status >= 500 or status in (408, 425) or 300 <= status < 400:
            # 500-504 and Cloudflare's 524; a redirect means a wrong path or a proxy page.
            raise ServerError(summary, delay=retry_after(response, now))
        if status in (401, 402, 403):
            raise AuthRejected(summary)
        if status == 404:
            raise NotFound(summary)
        if status >= 400:
            raise BadPayload(summary)

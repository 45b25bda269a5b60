"""Kling's official API (legacy generation, `/v1/videos/{action}`): the JWT, queries,
callbacks and their Standard Webhooks signature.

Reading Kling's task object, its envelope and its business codes belongs to `kling_task.py`,
which CometAPI and the gateway share. What this module does not own either: sending
requests, rate limits and retries (the reconciler loop), and what an observation does to a
task (`state.py`).

Sources: PROVIDERS.md §1 (endpoints §1.2, list §1.4, callbacks §1.9, JWT §1.8) and seed 000
(the "hybrid" direct-then-list strategy).
"""

from __future__ import annotations

import hmac
import logging
import warnings
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import httpx
import jwt
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from reconciler import codec
from reconciler.clock import Clock
from reconciler.config import ProviderSettings
from reconciler.errors import BadPayload, ConfigError, NotFound, ProviderError, SignatureError
from reconciler.model import Observation, Task
from reconciler.providers.base import (
    PollFlow,
    PollResult,
    Provider,
    RawDelivery,
    dig,
    read_answer,
)
from reconciler.providers.kling_task import (
    business_code,
    kling_error,
    kling_path,
    parse_kling_payload,
    parse_kling_task_object,
    quote_id,
)

logger = logging.getLogger(__name__)


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

    def answer_error(
        self, response: httpx.Response, body: object, now: datetime
    ) -> ProviderError | None:
        return kling_error(response, body, self.name, now) or super().answer_error(
            response, body, now
        )

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
            body = read_answer(response, self)
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
            body = read_answer(response, self)
        except NotFound:
            return []
        data = dig(body, "data")
        # The official list is `data: [...]`; seed 000 shows `data.list`.
        items = data if isinstance(data, list) else dig(data, "list")
        if not isinstance(items, list):
            raise BadPayload(f"{self.name}: the list answer has no task array")
        return list(_observe_items(items, self.name))


def business_code_of(response: httpx.Response) -> int | None:
    """The business code of an answer `read_answer` has already refused, if it has one."""
    try:
        return business_code(codec.loads(response.content))
    except (ValueError, RecursionError):
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

"""The exception tree of Reconciler.

    ReconcilerError
    ├── ConfigError                 bad configuration; the CLI prints one line and exits 2
    ├── StoreError                  the database refused or failed
    │   └── MigrationError          unknown, edited or failed migration
    ├── ProviderError               a provider exchange did not give an answer we can use
    │   ├── TemporaryError(delay)   try this task (or provider) again after `delay` seconds
    │   │   ├── RateLimited(retry_after)   429 meaning "slow down": the whole provider waits
    │   │   ├── ServerError         5xx, or an answer we cannot read
    │   │   └── Timeout             no answer in time
    │   └── PermanentError          retrying the same request will not help
    │       ├── AuthRejected        credentials, balance, allow-list: pause the provider
    │       ├── NotFound            the provider does not know the task (yet)
    │       └── BadPayload          a body we cannot turn into an observation
    └── SignatureError              a provider signature that does not verify

Messages never contain secrets: provider bodies echoed here are truncated by `excerpt`.

Each `ProviderError` class is also the one classification of a failed poll, read by
everyone who acts on one: `verdict` (what it says about the provider as a whole: the loop's
limits), `outcome` (its `reconciler_polls` label) and `delay` (when the provider said to try
again). Nobody else maps error classes to behaviour.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Verdict(enum.Enum):
    """What the end of one exchange with a provider says about that provider."""

    ANSWERED = "answered"  # it answered, if only "no such task": the provider works
    FAILED = "failed"  # 5xx, timeout, an answer we cannot read: backoff, and the breaker
    RATE_LIMITED = "rate_limited"  # 429: the whole provider waits
    REJECTED = "rejected"  # credentials, balance, allow-list: the provider is paused
    ABANDONED = "abandoned"  # no verdict: held back mid-way, or shutting down


class ReconcilerError(Exception):
    """Base of every error Reconciler raises on purpose."""


class ConfigError(ReconcilerError):
    pass


class StoreError(ReconcilerError):
    pass


class MigrationError(StoreError):
    pass


class ProviderError(ReconcilerError):
    verdict: ClassVar[Verdict] = Verdict.FAILED
    outcome: ClassVar[str] = "error"
    delay: float | None = None  # seconds the provider asked us to wait, when it said


class TemporaryError(ProviderError):
    outcome = "temporaryerror"

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class RateLimited(TemporaryError):
    verdict = Verdict.RATE_LIMITED
    outcome = "ratelimited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, delay=retry_after)
        self.retry_after = retry_after


class ServerError(TemporaryError):
    outcome = "servererror"


class Timeout(TemporaryError):
    outcome = "timeout"


class PermanentError(ProviderError):
    pass


class AuthRejected(PermanentError):
    verdict = Verdict.REJECTED
    outcome = "auth_rejected"


class NotFound(PermanentError):
    verdict = Verdict.ANSWERED
    outcome = "not_found"


class BadPayload(PermanentError):
    outcome = "malformed"


class SignatureError(ReconcilerError):
    pass


def excerpt(text: str | bytes, limit: int = 200) -> str:
    """A short, printable piece of a provider body for an error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"

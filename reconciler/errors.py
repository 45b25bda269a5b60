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
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base of every error Reconciler raises on purpose."""


class ConfigError(ReconcilerError):
    pass


class StoreError(ReconcilerError):
    pass


class MigrationError(StoreError):
    pass


class ProviderError(ReconcilerError):
    pass


class TemporaryError(ProviderError):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class RateLimited(TemporaryError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, delay=retry_after)
        self.retry_after = retry_after


class ServerError(TemporaryError):
    pass


class Timeout(TemporaryError):
    pass


class PermanentError(ProviderError):
    pass


class AuthRejected(PermanentError):
    pass


class NotFound(PermanentError):
    pass


class BadPayload(PermanentError):
    pass


class SignatureError(ReconcilerError):
    pass


def excerpt(text: str | bytes, limit: int = 200) -> str:
    """A short, printable piece of a provider body for an error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"

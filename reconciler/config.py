"""Settings: the whole configuration as frozen values, built from a mapping of strings.

`Settings.from_environ(environ)` is a pure function: the CLI passes `os.environ` (plus an
`--env-file`), tests pass a dict. Every bad value raises `ConfigError` with one line that
names the variable, e.g. `RECONCILER_PORT has value 'x': not an integer.`

Secrets are kept in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from reconciler.errors import ConfigError

PROVIDER_NAMES = ("kling", "cometapi", "gateway", "acedata", "kie")

DEFAULT_BASE_URLS = {
    "kling": "https://api.klingai.com",
    "cometapi": "https://api.cometapi.com",
    "gateway": None,
    "acedata": "https://api.acedata.cloud",
    "kie": "https://api.kie.ai",
}

# The variable holding each provider's API credential (Kling has two, see below).
CREDENTIAL_VARIABLES = {
    "cometapi": "COMETAPI_KEY",
    "gateway": "GATEWAY_API_KEY",
    "acedata": "ACEDATA_API_TOKEN",
    "kie": "KIE_API_KEY",
}

# A video usually takes a few minutes: the first poll is due when a callback would normally
# have arrived. Kie's own guidance polls sooner, AceData answers in 1-2 minutes.
DEFAULT_FIRST_POLL_AFTER = {
    "kling": 180.0,
    "cometapi": 180.0,
    "gateway": 180.0,
    "acedata": 120.0,
    "kie": 120.0,
}

# The longest duration any setting or registration may name: ten years. Longer ones are
# almost surely mistakes, and past a few thousand years a date can no longer hold them.
MAX_DURATION_SECONDS = 10 * 365 * 86400.0

# Requests per second per provider. Kling publishes no figure (PROVIDERS §1.6) and AceData
# asks for under 1 req/s; the SPEC default is 5 and each is overridable.
DEFAULT_RATE_LIMIT = 5.0

# Retention (SPEC §5): how long each kind of row is kept, in seconds; 0 keeps forever.
DAY = 86400.0
DEFAULT_RETAIN_EVENTS = 30 * DAY
DEFAULT_RETAIN_DELIVERIES = 30 * DAY
DEFAULT_RETAIN_TASKS = 90 * DAY
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}


class Secret:
    """A string that is never printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    base_url: str | None
    api_key: Secret | None = None  # Bearer key; for Kling, the access key
    secret_key: Secret | None = None  # Kling's secret key, signing the JWT
    webhook_secret: Secret | None = None  # KLING_WEBHOOK_SECRET / KIE_WEBHOOK_HMAC_KEY
    first_poll_after: float = 180.0
    poll_interval_max: float = 300.0
    deadline: float = 86400.0
    not_found_grace: float = 600.0
    rate_limit: float = DEFAULT_RATE_LIMIT
    concurrency: int = 4
    request_timeout: float = 30.0

    @property
    def configured(self) -> bool:
        """True when there is a base URL and the credentials to query the provider."""
        if not self.base_url:
            return False
        if self.name == "kling":
            return self.api_key is not None and self.secret_key is not None
        return self.api_key is not None


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "sqlite:///reconciler.db"
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: Secret | None = None
    callback_token: Secret | None = None
    public_url: str | None = None
    max_body_bytes: int = 1_048_576
    progress_event_interval: float = 5.0
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    # Seconds each kind of row is kept (SPEC §5 retention); 0 keeps forever.
    retain_events: float = DEFAULT_RETAIN_EVENTS
    retain_deliveries: float = DEFAULT_RETAIN_DELIVERIES
    retain_tasks: float = DEFAULT_RETAIN_TASKS

    def __repr__(self) -> str:
        # The database URL may carry a password: show it redacted, like every other secret.
        return (
            f"Settings(database_url={redact_url(self.database_url)!r}, host={self.host!r}, "
            f"port={self.port!r}, api_token={self.api_token!r}, "
            f"callback_token={self.callback_token!r}, "
            f"public_url={None if self.public_url is None else redact_url(self.public_url)!r}, "
            f"max_body_bytes={self.max_body_bytes!r}, "
            f"progress_event_interval={self.progress_event_interval!r}, "
            f"providers={dict(self.providers)!r}, retain_events={self.retain_events!r}, "
            f"retain_deliveries={self.retain_deliveries!r}, retain_tasks={self.retain_tasks!r})"
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        env = _Reader(environ)
        port = env.integer("RECONCILER_PORT", None, low=0, high=65535)
        if port is None:
            port = env.integer("PORT", 8080, low=0, high=65535)
        assert port is not None
        database_url = env.text("RECONCILER_DATABASE_URL", None) or "sqlite:///reconciler.db"
        _check_database_url(database_url)
        public_url = env.text("RECONCILER_PUBLIC_URL", None)
        if public_url is not None:
            _check_http_url("RECONCILER_PUBLIC_URL", public_url)
        return cls(
            database_url=database_url,
            host=env.text("RECONCILER_HOST", "127.0.0.1") or "127.0.0.1",
            port=port,
            api_token=env.secret("RECONCILER_API_TOKEN"),
            callback_token=env.secret("RECONCILER_CALLBACK_TOKEN"),
            public_url=public_url.rstrip("/") if public_url else None,
            max_body_bytes=env.integer("RECONCILER_MAX_BODY_BYTES", 1_048_576, low=1) or 1,
            progress_event_interval=env.seconds("RECONCILER_PROGRESS_EVENT_INTERVAL", 5.0),
            providers={name: _provider_settings(env, name) for name in PROVIDER_NAMES},
            retain_events=env.duration("RECONCILER_RETAIN_EVENTS", DEFAULT_RETAIN_EVENTS),
            retain_deliveries=env.duration(
                "RECONCILER_RETAIN_DELIVERIES", DEFAULT_RETAIN_DELIVERIES
            ),
            retain_tasks=env.duration("RECONCILER_RETAIN_TASKS", DEFAULT_RETAIN_TASKS),
        )


def _provider_settings(env: _Reader, name: str) -> ProviderSettings:
    prefix = name.upper()

    def tuned(key: str, default: float, low: float = 0.0) -> float:
        base = env.seconds(f"RECONCILER_{key}", default, low=low)
        return env.seconds(f"{prefix}_{key}", base, low=low)

    base_url = env.text(f"{prefix}_BASE_URL", DEFAULT_BASE_URLS[name])
    if base_url:
        _check_http_url(f"{prefix}_BASE_URL", base_url)
        base_url = base_url.rstrip("/")
    if name == "kling":
        api_key, secret_key = env.secret("KLING_ACCESS_KEY"), env.secret("KLING_SECRET_KEY")
        webhook_secret = env.secret("KLING_WEBHOOK_SECRET")
    else:
        api_key, secret_key = env.secret(CREDENTIAL_VARIABLES[name]), None
        webhook_secret = env.secret("KIE_WEBHOOK_HMAC_KEY") if name == "kie" else None
    concurrency = env.integer("RECONCILER_CONCURRENCY", 4, low=1)
    rate_limit = tuned("RATE_LIMIT", DEFAULT_RATE_LIMIT, low=0.001)
    return ProviderSettings(
        name=name,
        base_url=base_url,
        api_key=api_key,
        secret_key=secret_key,
        webhook_secret=webhook_secret,
        first_poll_after=tuned("FIRST_POLL_AFTER", DEFAULT_FIRST_POLL_AFTER[name]),
        poll_interval_max=tuned("POLL_INTERVAL_MAX", 300.0, low=0.001),
        deadline=tuned("DEADLINE", 86400.0, low=0.001),
        not_found_grace=tuned("NOT_FOUND_GRACE", 600.0),
        rate_limit=rate_limit,
        concurrency=env.integer(f"{prefix}_CONCURRENCY", concurrency, low=1) or 1,
        request_timeout=tuned("REQUEST_TIMEOUT", 30.0, low=0.001),
    )


class _Reader:
    """Typed reads of string variables, each failure one line naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None) -> str | None:
        value = self._raw(name)
        return default if value is None else value

    def secret(self, name: str) -> Secret | None:
        value = self._raw(name)
        return None if value is None else Secret(value)

    def _number(
        self,
        name: str,
        default: float | None,
        convert: Callable[[str], float],
        what: str,
        low: float | None,
        high: float | None,
    ) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            if "_" in raw:  # Python's literal syntax (1_000) is not a configuration value
                raise ValueError(raw)
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{name} has value {raw!r}: not {what}.") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name} has value {raw!r}: not {what}.")
        if low is not None and value < low:
            raise ConfigError(f"{name} has value {raw!r}: must be at least {low:g}.")
        if high is not None and value > high:
            raise ConfigError(f"{name} has value {raw!r}: must be at most {high:g}.")
        return value

    def integer(
        self, name: str, default: int | None, low: int | None = None, high: int | None = None
    ) -> int | None:
        value = self._number(name, default, _integer, "an integer", low, high)
        return None if value is None else int(value)

    def seconds(self, name: str, default: float, low: float = 0.0) -> float:
        value = self._number(name, default, float, "a number of seconds", low, MAX_DURATION_SECONDS)
        assert value is not None
        return value

    def duration(self, name: str, default: float) -> float:
        """A retention: a number and a unit (`30d`, `12h`, `90s`, `1.5m`), or `0` for
        "forever" (returned as 0.0); in seconds."""
        raw = self._raw(name)
        if raw is None:
            return default
        if raw == "0":
            return 0.0
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd])", raw)
        if match is None:
            raise ConfigError(
                f"{name} has value {raw!r}: not a duration (a number and a unit s, m, h or d, "
                "e.g. 30d; 0 keeps forever)."
            )
        seconds = float(match[1]) * DURATION_UNITS[match[2]]
        if seconds == 0:  # "keep nothing" is never meant: say how "forever" is written
            raise ConfigError(f"{name} has value {raw!r}: must be more than 0 (0 keeps forever).")
        if seconds > MAX_DURATION_SECONDS:
            days = MAX_DURATION_SECONDS / DAY
            raise ConfigError(f"{name} has value {raw!r}: must be at most {days:g}d (ten years).")
        return seconds


def _integer(raw: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", raw):
        raise ValueError(raw)
    return int(raw)


def _check_database_url(url: str) -> None:
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return
    if url.startswith(("postgresql://", "postgres://")):
        return
    raise ConfigError(
        f"RECONCILER_DATABASE_URL has value {redact_url(url)!r}: "
        "expected sqlite:///PATH or postgresql://…"
    )


def _check_http_url(name: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError:
        usable = False
    if not usable:
        raise ConfigError(f"{name} has value {redact_url(url)!r}: not an http(s) URL.")


def redact_url(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:  # unparseable: hide whatever sits between "://" and "@"
        return re.sub(r"(?<=://)[^@/]*@", "***@", url)
    if password:
        return url.replace(password, "***")
    return url


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a `.env`-style file: `NAME=value` lines, `#` comments, optional quotes."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--env-file {os.fspath(path)!r}: {error.strerror}.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"--env-file {os.fspath(path)!r}: not UTF-8 text (byte {error.start})."
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--env-file {os.fspath(path)!r} line {number}: expected NAME=value.")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values

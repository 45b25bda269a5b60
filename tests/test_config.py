"""Configuration (SPEC §5): defaults, precedence, per-provider overrides, one-line errors,
secrets kept out of reprs, and the `.env` file reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import (
    DEFAULT_BASE_URLS,
    PROVIDER_NAMES,
    Secret,
    Settings,
    read_env_file,
)
from reconciler.errors import ConfigError


def test_defaults_match_the_spec() -> None:
    settings = Settings.from_environ({})
    assert settings.database_url == "sqlite:///reconciler.db"
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.max_body_bytes == 1_048_576
    assert settings.api_token is None
    assert settings.callback_token is None
    assert settings.public_url is None
    assert settings.progress_event_interval == 5.0
    assert set(settings.providers) == set(PROVIDER_NAMES)
    for name, provider in settings.providers.items():
        assert provider.name == name
        assert provider.poll_interval_max == 300
        assert provider.deadline == 86400
        assert provider.not_found_grace == 600
        assert provider.rate_limit == 5
        assert provider.concurrency == 4
        assert provider.first_poll_after > 0
        assert provider.base_url == DEFAULT_BASE_URLS[name]
        assert provider.api_key is None
        assert not provider.configured
    assert settings == Settings.from_environ({name: "" for name in ("PORT", "RECONCILER_HOST")})


def test_default_base_urls() -> None:
    providers = Settings.from_environ({}).providers
    assert providers["kling"].base_url == "https://api.klingai.com"
    assert providers["cometapi"].base_url == "https://api.cometapi.com"
    assert providers["acedata"].base_url == "https://api.acedata.cloud"
    assert providers["kie"].base_url == "https://api.kie.ai"
    assert providers["gateway"].base_url is None


@pytest.mark.parametrize(
    ("environ", "port"),
    [
        ({"PORT": "5000"}, 5000),
        ({"RECONCILER_PORT": "6000"}, 6000),
        ({"PORT": "5000", "RECONCILER_PORT": "6000"}, 6000),
        ({"PORT": "5000", "RECONCILER_PORT": ""}, 5000),
        ({"PORT": "x", "RECONCILER_PORT": "6000"}, 6000),
        ({"RECONCILER_PORT": " 7000 "}, 7000),
        ({"RECONCILER_PORT": "0"}, 0),
    ],
)
def test_port_precedence(environ: dict[str, str], port: int) -> None:
    assert Settings.from_environ(environ).port == port


def test_top_level_values() -> None:
    settings = Settings.from_environ(
        {
            "RECONCILER_DATABASE_URL": "postgresql://db.internal/reconciler",
            "RECONCILER_HOST": "0.0.0.0",
            "RECONCILER_PUBLIC_URL": "https://hooks.example.com/",
            "RECONCILER_MAX_BODY_BYTES": "2048",
            "RECONCILER_PROGRESS_EVENT_INTERVAL": "0",
            "RECONCILER_API_TOKEN": "api-tok",
            "RECONCILER_CALLBACK_TOKEN": "cb-tok",
        }
    )
    assert settings.database_url == "postgresql://db.internal/reconciler"
    assert settings.host == "0.0.0.0"
    assert settings.public_url == "https://hooks.example.com"
    assert settings.max_body_bytes == 2048
    assert settings.progress_event_interval == 0
    assert settings.api_token is not None and settings.api_token.reveal() == "api-tok"
    assert settings.callback_token == Secret("cb-tok")


@pytest.mark.parametrize(
    "url", ["sqlite:///reconciler.db", "sqlite:////var/lib/r.db", "postgres://h/d"]
)
def test_good_database_urls(url: str) -> None:
    assert Settings.from_environ({"RECONCILER_DATABASE_URL": url}).database_url == url


def test_global_timing_applies_to_every_provider_and_each_can_override() -> None:
    settings = Settings.from_environ(
        {
            "RECONCILER_FIRST_POLL_AFTER": "60",
            "RECONCILER_POLL_INTERVAL_MAX": "120",
            "RECONCILER_DEADLINE": "3600",
            "RECONCILER_NOT_FOUND_GRACE": "30",
            "RECONCILER_RATE_LIMIT": "2.5",
            "RECONCILER_CONCURRENCY": "8",
            "KLING_FIRST_POLL_AFTER": "300",
            "ACEDATA_RATE_LIMIT": "0.5",
            "KIE_CONCURRENCY": "1",
            "GATEWAY_DEADLINE": "7200",
            "COMETAPI_NOT_FOUND_GRACE": "0",
            "KLING_POLL_INTERVAL_MAX": "30",
            "KIE_REQUEST_TIMEOUT": "5",
        }
    )
    p = settings.providers
    assert p["kling"].first_poll_after == 300
    assert p["acedata"].first_poll_after == 60
    assert p["acedata"].rate_limit == 0.5
    assert p["kling"].rate_limit == 2.5
    assert p["kie"].concurrency == 1
    assert p["kling"].concurrency == 8
    assert p["gateway"].deadline == 7200
    assert p["kie"].deadline == 3600
    assert p["cometapi"].not_found_grace == 0
    assert p["kie"].not_found_grace == 30
    assert p["kling"].poll_interval_max == 30
    assert p["kie"].poll_interval_max == 120
    assert p["kie"].request_timeout == 5
    assert p["kling"].request_timeout == 30


def test_provider_credentials_and_base_urls() -> None:
    settings = Settings.from_environ(
        {
            "KLING_ACCESS_KEY": "ak",
            "KLING_SECRET_KEY": "sk",
            "KLING_BASE_URL": "https://api-singapore.klingai.com/",
            "KLING_WEBHOOK_SECRET": "whsec",
            "COMETAPI_KEY": "c",
            "GATEWAY_API_KEY": "g",
            "GATEWAY_BASE_URL": "http://127.0.0.1:9000/relay",
            "ACEDATA_API_TOKEN": "a",
            "KIE_API_KEY": "k",
            "KIE_WEBHOOK_HMAC_KEY": "hmac",
        }
    )
    p = settings.providers
    assert p["kling"].base_url == "https://api-singapore.klingai.com"
    assert p["kling"].api_key == Secret("ak") and p["kling"].secret_key == Secret("sk")
    assert p["kling"].webhook_secret == Secret("whsec")
    assert p["gateway"].base_url == "http://127.0.0.1:9000/relay"
    assert p["kie"].webhook_secret == Secret("hmac")
    assert p["acedata"].webhook_secret is None
    assert all(provider.configured for provider in p.values())


def test_kling_needs_both_keys_and_gateway_needs_a_base_url() -> None:
    p = Settings.from_environ({"KLING_ACCESS_KEY": "ak", "GATEWAY_API_KEY": "g"}).providers
    assert not p["kling"].configured
    assert not p["gateway"].configured


BAD_VALUES = [
    ("RECONCILER_PORT", "x", "RECONCILER_PORT has value 'x': not an integer."),
    ("RECONCILER_PORT", "80.5", "RECONCILER_PORT has value '80.5': not an integer."),
    ("RECONCILER_PORT", "1_000", "RECONCILER_PORT has value '1_000': not an integer."),
    ("RECONCILER_PORT", "65536", "RECONCILER_PORT has value '65536': must be at most 65535."),
    ("RECONCILER_PORT", "-1", "RECONCILER_PORT has value '-1': must be at least 0."),
    ("PORT", "http", "PORT has value 'http': not an integer."),
    (
        "RECONCILER_MAX_BODY_BYTES",
        "0",
        "RECONCILER_MAX_BODY_BYTES has value '0': must be at least 1.",
    ),
    (
        "RECONCILER_MAX_BODY_BYTES",
        "1MB",
        "RECONCILER_MAX_BODY_BYTES has value '1MB': not an integer.",
    ),
    ("RECONCILER_CONCURRENCY", "0", "RECONCILER_CONCURRENCY has value '0': must be at least 1."),
    ("KIE_CONCURRENCY", "many", "KIE_CONCURRENCY has value 'many': not an integer."),
    ("RECONCILER_DEADLINE", "1d", "RECONCILER_DEADLINE has value '1d': not a number of seconds."),
    ("RECONCILER_DEADLINE", "0", "RECONCILER_DEADLINE has value '0': must be at least 0.001."),
    ("RECONCILER_DEADLINE", "nan", "RECONCILER_DEADLINE has value 'nan': not a number of seconds."),
    ("KLING_DEADLINE", "inf", "KLING_DEADLINE has value 'inf': not a number of seconds."),
    (
        "RECONCILER_FIRST_POLL_AFTER",
        "-5",
        "RECONCILER_FIRST_POLL_AFTER has value '-5': must be at least 0.",
    ),
    (
        "KLING_FIRST_POLL_AFTER",
        "soon",
        "KLING_FIRST_POLL_AFTER has value 'soon': not a number of seconds.",
    ),
    ("ACEDATA_RATE_LIMIT", "0", "ACEDATA_RATE_LIMIT has value '0': must be at least 0.001."),
    (
        "RECONCILER_RATE_LIMIT",
        "fast",
        "RECONCILER_RATE_LIMIT has value 'fast': not a number of seconds.",
    ),
    (
        "RECONCILER_POLL_INTERVAL_MAX",
        "0",
        "RECONCILER_POLL_INTERVAL_MAX has value '0': must be at least 0.001.",
    ),
    (
        "RECONCILER_NOT_FOUND_GRACE",
        "-1",
        "RECONCILER_NOT_FOUND_GRACE has value '-1': must be at least 0.",
    ),
    (
        "RECONCILER_PROGRESS_EVENT_INTERVAL",
        "x",
        "RECONCILER_PROGRESS_EVENT_INTERVAL has value 'x': not a number of seconds.",
    ),
    (
        "RECONCILER_DATABASE_URL",
        "mysql://h/d",
        "RECONCILER_DATABASE_URL has value 'mysql://h/d': expected sqlite:///PATH or postgresql://…",
    ),
    (
        "RECONCILER_DATABASE_URL",
        "sqlite:///",
        "RECONCILER_DATABASE_URL has value 'sqlite:///': expected sqlite:///PATH or postgresql://…",
    ),
    (
        "RECONCILER_DATABASE_URL",
        "reconciler.db",
        "RECONCILER_DATABASE_URL has value 'reconciler.db': expected sqlite:///PATH or postgresql://…",
    ),
    (
        "KLING_BASE_URL",
        "api.klingai.com",
        "KLING_BASE_URL has value 'api.klingai.com': not an http(s) URL.",
    ),
    (
        "KIE_BASE_URL",
        "ftp://api.kie.ai",
        "KIE_BASE_URL has value 'ftp://api.kie.ai': not an http(s) URL.",
    ),
    ("GATEWAY_BASE_URL", "http://", "GATEWAY_BASE_URL has value 'http://': not an http(s) URL."),
    (
        "GATEWAY_BASE_URL",
        "http://[::1",
        "GATEWAY_BASE_URL has value 'http://[::1': not an http(s) URL.",
    ),
    (
        "ACEDATA_BASE_URL",
        "http://host:99999",
        "ACEDATA_BASE_URL has value 'http://host:99999': not an http(s) URL.",
    ),
    (
        "COMETAPI_BASE_URL",
        "https://:443",
        "COMETAPI_BASE_URL has value 'https://:443': not an http(s) URL.",
    ),
    (
        "RECONCILER_PUBLIC_URL",
        "hooks.example.com",
        "RECONCILER_PUBLIC_URL has value 'hooks.example.com': not an http(s) URL.",
    ),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_value_is_one_line_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({name: value})
    text = str(caught.value)
    assert text == message
    assert "\n" not in text
    assert text.startswith(name + " ")
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("RECONCILER_DATABASE_URL", "mysql://user:hunter2@db/x"),
        ("RECONCILER_DATABASE_URL", "foo://user:hunter2@[db/x"),
        ("KLING_BASE_URL", "ftp://user:hunter2@host"),
        ("RECONCILER_PUBLIC_URL", "http://user:hunter2@[::1"),
    ],
)
def test_bad_url_errors_hide_passwords(name: str, url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({name: url})
    assert "hunter2" not in str(caught.value)
    assert str(caught.value).startswith(name + " has value ")


SECRETS = {
    "RECONCILER_API_TOKEN": "s3cret-api",
    "RECONCILER_CALLBACK_TOKEN": "s3cret-cb",
    "KLING_ACCESS_KEY": "s3cret-ak",
    "KLING_SECRET_KEY": "s3cret-sk",
    "KLING_WEBHOOK_SECRET": "s3cret-wh",
    "COMETAPI_KEY": "s3cret-comet",
    "GATEWAY_API_KEY": "s3cret-gw",
    "ACEDATA_API_TOKEN": "s3cret-ace",
    "KIE_API_KEY": "s3cret-kie",
    "KIE_WEBHOOK_HMAC_KEY": "s3cret-hmac",
}


def test_secrets_never_appear_in_repr_or_str() -> None:
    environ = {
        **SECRETS,
        "RECONCILER_DATABASE_URL": "postgresql://app:s3cret-db@db.internal:5432/r",
        "RECONCILER_PUBLIC_URL": "https://hook:s3cret-pub@hooks.example.com",
    }
    settings = Settings.from_environ(environ)
    for text in (repr(settings), str(settings), *map(repr, settings.providers.values())):
        assert "s3cret" not in text
    assert "db.internal" in repr(settings)  # still useful to read
    assert settings.database_url == environ["RECONCILER_DATABASE_URL"]  # and usable
    assert repr(Secret("x")) == str(Secret("x")) == "Secret('**********')"


def test_secret_compares_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert hash(Secret("a")) == hash(Secret("a"))


# --- read_env_file -----------------------------------------------------------------------


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "  SPACED  =  padded  \n"
        'DOUBLE="with spaces # not a comment"\n'
        "SINGLE='it''s'\n"
        "export EXPORTED=1\n"
        "EMPTY=\n"
        "EQUALS=a=b=c\n"
        'LONE="\n'
        "   # indented comment\n"
        "HASH=abc#def\n",
        encoding="utf-8",
    )
    assert read_env_file(path) == {
        "PLAIN": "value",
        "SPACED": "padded",
        "DOUBLE": "with spaces # not a comment",
        "SINGLE": "it''s",
        "EXPORTED": "1",
        "EMPTY": "",
        "EQUALS": "a=b=c",
        "LONE": '"',
        "HASH": "abc#def",
    }


def test_env_file_values_feed_settings(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text('export RECONCILER_PORT="9090"\nKIE_API_KEY=k\n', encoding="utf-8")
    settings = Settings.from_environ(read_env_file(path))
    assert settings.port == 9090
    assert settings.providers["kie"].configured


@pytest.mark.parametrize(
    ("content", "line"), [("GOOD=1\nno equals sign\n", 2), ("=value\n", 1), ("export\n", 1)]
)
def test_env_file_bad_line(tmp_path: Path, content: str, line: int) -> None:
    path = tmp_path / "bad.env"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value) == f"--env-file {str(path)!r} line {line}: expected NAME=value."


def test_env_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.env"
    with pytest.raises(ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value) == f"--env-file {str(path)!r}: No such file or directory."


def test_env_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.env"
    path.write_bytes(b"NAME=caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value) == f"--env-file {str(path)!r}: not UTF-8 text (byte 8)."
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name", ["RECONCILER_DEADLINE", "KLING_FIRST_POLL_AFTER", "RECONCILER_POLL_INTERVAL_MAX"]
)
def test_a_duration_beyond_ten_years_is_refused_at_start_up(name: str) -> None:
    """A date cannot hold `now + 1e300 s`: every registration would fail later instead."""
    with pytest.raises(ConfigError, match=rf"^{name} has value '1e300': must be at most "):
        Settings.from_environ({name: "1e300"})
    assert Settings.from_environ({name: str(10 * 365 * 86400)}) is not None


# --- retention (SPEC §5) ---------------------------------------------------------------------


def test_retention_defaults_match_the_spec() -> None:
    settings = Settings.from_environ({})
    assert settings.retain_events == 30 * 86400
    assert settings.retain_deliveries == 30 * 86400
    assert settings.retain_tasks == 90 * 86400


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30d", 30 * 86400.0),
        ("12h", 12 * 3600.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1.5h", 5400.0),
        (" 7d ", 7 * 86400.0),
        ("0", 0.0),  # keeps forever
        ("", 30 * 86400.0),  # empty: the default
        ("3650d", 3650 * 86400.0),  # ten years, the longest duration of any setting
    ],
)
def test_retention_durations(value: str, seconds: float) -> None:
    settings = Settings.from_environ({"RECONCILER_RETAIN_EVENTS": value})
    assert settings.retain_events == seconds
    assert settings.retain_deliveries == settings.retain_tasks / 3 == 30 * 86400


def test_each_retention_is_read_from_its_own_variable() -> None:
    settings = Settings.from_environ(
        {
            "RECONCILER_RETAIN_EVENTS": "1d",
            "RECONCILER_RETAIN_DELIVERIES": "2h",
            "RECONCILER_RETAIN_TASKS": "0",
        }
    )
    assert (settings.retain_events, settings.retain_deliveries, settings.retain_tasks) == (
        86400.0,
        7200.0,
        0.0,
    )


SHAPE = "not a duration (a number and a unit s, m, h or d, e.g. 30d; 0 keeps forever)."


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("RECONCILER_RETAIN_EVENTS", "x", SHAPE),
        ("RECONCILER_RETAIN_EVENTS", "30", SHAPE),  # a unit is required
        ("RECONCILER_RETAIN_DELIVERIES", "-1d", SHAPE),
        ("RECONCILER_RETAIN_TASKS", "3w", SHAPE),
        ("RECONCILER_RETAIN_TASKS", "30D", SHAPE),
        ("RECONCILER_RETAIN_TASKS", "1e3s", SHAPE),
        ("RECONCILER_RETAIN_TASKS", "1 d", SHAPE),
        ("RECONCILER_RETAIN_EVENTS", "0d", "must be more than 0 (0 keeps forever)."),
        ("RECONCILER_RETAIN_EVENTS", "3651d", "must be at most 3650d (ten years)."),
    ],
)
def test_bad_retention_is_one_line_naming_the_variable(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({name: value})
    assert str(caught.value) == f"{name} has value {value!r}: {why}"
    assert "\n" not in str(caught.value)

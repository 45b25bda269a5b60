"""The vocabulary's own rules: how times are written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from reconciler.model import iso, parse_iso

moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


def test_times_have_a_fixed_six_digit_fraction() -> None:
    whole = datetime(2026, 12, 5, 23, 48, 58, tzinfo=UTC)
    assert iso(whole) == "2026-12-05T23:48:58.000000Z"
    assert iso(whole.replace(microsecond=416_000)) == "2026-12-05T23:48:58.416000Z"
    assert iso(whole.replace(microsecond=416_123)) == "2026-12-05T23:48:58.416123Z"
    east = whole.astimezone(timezone(timedelta(hours=8)))
    assert iso(east) == "2026-12-05T23:48:58.000000Z"
    assert iso(None) is None


@given(moments, moments)
def test_as_text_times_sort_in_time_order(a: datetime, b: datetime) -> None:
    assert (iso(a) < iso(b)) == (a < b)  # type: ignore[operator]


@given(moments)
def test_times_read_back_exactly(moment: datetime) -> None:
    assert parse_iso(iso(moment)) == moment

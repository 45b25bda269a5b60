"""Pure poll timing (SPEC §3): first poll, backoff with jitter and cap, deadline, not-found
grace, result-missing limit, provider-given delays."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import schedule
from reconciler.config import ProviderSettings
from reconciler.model import Source, Status, Task, TaskRef
from reconciler.schedule import (
    BACKOFF_BASE_SECONDS,
    JITTER,
    RESULT_MISSING_RETRY_SECONDS,
    Timing,
    backoff,
)
from reconciler.state import new_task

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMING = Timing(
    first_poll_after=180.0, poll_interval_max=300.0, deadline=3600.0, not_found_grace=600.0
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def task(status: Status = Status.PROCESSING, deadline: float = 3600.0, **changes: Any) -> Task:
    return new_task(TaskRef("kling", "t1"), "text2video", T0, deadline, Source.REGISTER).replace(
        status=status, **changes
    )


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


class MaxJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


class MinJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def test_timing_of_provider_settings() -> None:
    provider = ProviderSettings(
        "kie",
        "https://api.kie.ai",
        first_poll_after=1,
        poll_interval_max=2,
        deadline=3,
        not_found_grace=4,
    )
    timing = Timing.of(provider)
    assert timing == Timing(1, 2, 3, 4)
    assert timing.result_missing_limit == 4


# --- first poll --------------------------------------------------------------------------


def test_first_poll_is_due_when_the_callback_should_have_come() -> None:
    assert schedule.first_poll(task(Status.SUBMITTED), at(10), TIMING) == at(190)


def test_first_poll_never_past_the_deadline() -> None:
    assert schedule.first_poll(task(deadline=100), at(10), TIMING) == at(100)


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.EXPIRED])
def test_terminal_tasks_are_never_polled(status: Status) -> None:
    done = task(status, polls=3)
    assert schedule.first_poll(done, at(10), TIMING) is None
    assert schedule.after_poll(done, at(10), TIMING, random.Random(1)) is None
    assert not schedule.past_deadline(done, at(10_000))


# --- backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(0, 15), (1, 15), (2, 30), (3, 60), (4, 120), (5, 240), (6, 300), (7, 300), (10_000, 300)],
)
def test_backoff_doubles_up_to_the_cap(attempt: int, seconds: float) -> None:
    assert backoff(attempt, TIMING, NoJitter()) == seconds


def test_backoff_cap_below_the_base() -> None:
    small = Timing(1, 5, 3600, 600)
    assert backoff(1, small, MaxJitter()) == 5
    assert backoff(1, small, MinJitter()) == pytest.approx(5 * (1 - JITTER))


def test_backoff_extremes_of_jitter() -> None:
    assert backoff(1, TIMING, MaxJitter()) == pytest.approx(15 * (1 + JITTER))
    assert backoff(1, TIMING, MinJitter()) == pytest.approx(15 * (1 - JITTER))
    assert backoff(9, TIMING, MaxJitter()) == 300  # jitter never lifts it over the cap
    assert backoff(9, TIMING, MinJitter()) == pytest.approx(300 * (1 - JITTER))


def test_backoff_is_deterministic_for_a_seed() -> None:
    first = [backoff(n, TIMING, random.Random(42)) for n in range(1, 10)]
    again = [backoff(n, TIMING, random.Random(42)) for n in range(1, 10)]
    assert first == again


def test_jitter_spreads_tasks_apart() -> None:
    rng = random.Random(7)
    values = {round(backoff(2, TIMING, rng), 6) for _ in range(50)}
    assert len(values) > 40


def test_one_draw_gives_one_exchange_one_jitter() -> None:
    """The tasks one exchange polled fall due together again; another exchange draws anew."""
    rng = random.Random(3)
    one, other = schedule.OneDraw(rng), schedule.OneDraw(rng)
    seconds = {backoff(1, TIMING, one) for _ in range(5)}
    assert len(seconds) == 1
    [first] = seconds
    assert 15 * (1 - JITTER) <= first <= 15 * (1 + JITTER)
    assert backoff(1, TIMING, other) != first
    assert backoff(2, TIMING, one) == pytest.approx(2 * first)  # the same draw, scaled


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(-3, 80),
    cap=st.floats(0.001, 10_000),
    seed=st.integers(0, 2**32),
)
def test_property_backoff_within_jitter_bounds_and_cap(attempt: int, cap: float, seed: int) -> None:
    timing = Timing(180, cap, 86400, 600)
    nominal = min(cap, BACKOFF_BASE_SECONDS * 2.0 ** min(max(attempt - 1, 0), 30))
    seconds = backoff(attempt, timing, random.Random(seed))
    assert nominal * (1 - JITTER) - 1e-9 <= seconds <= min(cap, nominal * (1 + JITTER)) + 1e-9
    assert seconds > 0


# --- after a poll ------------------------------------------------------------------------


@pytest.mark.parametrize(("polls", "seconds"), [(0, 15), (1, 15), (2, 30), (3, 60), (8, 300)])
def test_after_poll_backs_off_on_the_number_of_polls(polls: int, seconds: float) -> None:
    assert schedule.after_poll(task(polls=polls), at(100), TIMING, NoJitter()) == at(100 + seconds)


def test_after_poll_retries_soon_when_the_result_is_missing() -> None:
    waiting = task(polls=9, result_missing_since=at(50))
    expected = at(100 + RESULT_MISSING_RETRY_SECONDS)
    assert schedule.after_poll(waiting, at(100), TIMING, NoJitter()) == expected


def test_after_poll_result_missing_stays_within_the_backoff_cap() -> None:
    """A cap below the fixed retry wins: with a 2-s cap the next look is 2 s away, not at a
    deadline 8 s later."""
    tight = Timing(first_poll_after=1.0, poll_interval_max=2.0, deadline=9.0, not_found_grace=600.0)
    waiting = task(deadline=9, polls=1, result_missing_since=at(1))
    assert schedule.after_poll(waiting, at(1), tight, NoJitter()) == at(3)


@pytest.mark.parametrize(
    ("now", "until", "due"),
    [
        (10, 50, 50),  # before the deadline: at `until`
        (10, 150, 100),  # but never past the deadline, where the last look happens
        (100, 103, 103),  # at the deadline: the last look waits for the provider's pace
        (120, 121, 121),
    ],
)
def test_handed_back(now: float, until: float, due: float) -> None:
    assert schedule.handed_back(task(deadline=100), at(now), at(until)) == at(due)


@settings(max_examples=200, deadline=None)
@given(
    now=st.floats(0, 5000),
    polls=st.integers(0, 40),
    failures=st.integers(0, 40),
    deadline=st.floats(1, 4000),
    delay=st.one_of(st.none(), st.floats(0, 10_000)),
    seed=st.integers(0, 2**16),
)
def test_property_never_past_the_deadline(
    now: float, polls: int, failures: int, deadline: float, delay: float | None, seed: int
) -> None:
    running = task(deadline=deadline, polls=polls, poll_failures=failures)
    rng = random.Random(seed)
    moment = at(now)
    planned = [
        schedule.first_poll(running, moment, TIMING),
        schedule.after_poll(running, moment, TIMING, rng),
        schedule.after_poll(running.replace(result_missing_since=T0), moment, TIMING, rng),
        schedule.after_error(running, moment, TIMING, rng, delay),
        schedule.after_not_found(running, moment, TIMING, rng),
    ]
    for when in planned:
        assert when is not None
        assert when <= running.deadline_at
        assert when <= moment + timedelta(seconds=max(TIMING.first_poll_after, 10_000))


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 1.5, 60.0, 900.0])
def test_after_error_honours_the_providers_delay(delay: float) -> None:
    # Even past the backoff cap: a 429's Retry-After is the provider's word.
    when = schedule.after_error(task(poll_failures=5), at(100), TIMING, MaxJitter(), delay)
    assert when == at(100 + delay)


def test_after_error_without_delay_backs_off_on_consecutive_failures() -> None:
    for failures, seconds in [(0, 15), (1, 30), (2, 60), (3, 120), (9, 300)]:
        errored = task(poll_failures=failures)
        assert schedule.after_error(errored, at(100), TIMING, NoJitter(), None) == at(100 + seconds)


def test_after_error_delay_stops_at_the_deadline() -> None:
    assert schedule.after_error(task(deadline=200), at(100), TIMING, NoJitter(), 500) == at(200)


# --- not found ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "expired"), [(0, False), (599.999, False), (600, True), (10_000, True)]
)
def test_not_found_expires_after_the_grace(elapsed: float, expired: bool) -> None:
    assert schedule.not_found_expired(task(), at(elapsed), TIMING) is expired


def test_after_not_found_retries_with_backoff_inside_the_grace() -> None:
    unknown = task(poll_failures=0)
    assert schedule.after_not_found(unknown, at(10), TIMING, NoJitter()) == at(25)
    assert schedule.after_not_found(
        unknown.replace(poll_failures=2), at(10), TIMING, NoJitter()
    ) == at(70)


def test_after_not_found_lands_exactly_on_the_end_of_the_grace() -> None:
    unknown = task(poll_failures=8)  # backoff 300 s would overshoot
    assert schedule.after_not_found(unknown, at(500), TIMING, NoJitter()) == at(600)
    assert schedule.not_found_expired(unknown, at(600), TIMING)


def test_after_not_found_past_the_grace_is_due_now() -> None:
    assert schedule.after_not_found(task(), at(700), TIMING, NoJitter()) == at(700)


@settings(max_examples=200, deadline=None)
@given(
    grace=st.floats(0.01, 5000),
    fraction=st.floats(0, 0.999),
    failures=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_property_after_not_found_no_later_than_the_grace_end(
    grace: float, fraction: float, failures: int, seed: int
) -> None:
    timing = Timing(180, 300, 86400, grace)
    unknown = task(deadline=86400, poll_failures=failures)
    now = at(grace * fraction)
    assert not schedule.not_found_expired(unknown, now, timing)
    when = schedule.after_not_found(unknown, now, timing, random.Random(seed))
    assert now <= when <= at(grace)


# --- result missing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "now", "expired"),
    [
        (None, 10_000, False),
        (100, 100, False),
        (100, 699.9, False),
        (100, 700, True),
        (100, 5000, True),
    ],
)
def test_result_missing_limit(since: float | None, now: float, expired: bool) -> None:
    waiting = task(result_missing_since=None if since is None else at(since))
    assert schedule.result_missing_expired(waiting, at(now), TIMING) is expired


# --- deadline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "past"), [(0, False), (3599.999, False), (3600, True), (9999, True)]
)
def test_past_deadline(now: float, past: bool) -> None:
    assert schedule.past_deadline(task(), at(now)) is past

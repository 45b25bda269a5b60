"""Unit tests of the per-provider limits: all driven by explicit `now` values, no I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.errors import Verdict
from reconciler.limits import (
    RECHECK_SECONDS,
    Breaker,
    BreakerState,
    Permit,
    ProviderLimits,
    TokenBucket,
    after,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- TokenBucket -----------------------------------------------------------------------


def test_bucket_spaces_requests_by_its_rate() -> None:
    bucket = TokenBucket(rate=5)
    assert bucket.take(at(0)) == 0.0
    assert bucket.take(at(0)) == pytest.approx(0.2)
    assert bucket.take(at(0.1)) == pytest.approx(0.1)
    assert bucket.take(at(0.2)) == 0.0


def test_bucket_refills_only_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    for _ in range(3):
        assert bucket.take(at(0)) == 0.0
    assert bucket.take(at(0)) > 0
    assert bucket.tokens(at(100)) == 3  # an idle hour does not bank a thousand requests


@pytest.mark.parametrize("rate", [0.5, 1, 3, 5, 7.5, 50])
def test_greedy_sender_never_exceeds_the_rate_in_any_window(rate: float) -> None:
    """Whoever sends as soon as the bucket lets them sees at most `rate` requests in any
    one-second window (rounded up), and waiting exactly the answer is always enough."""
    bucket = TokenBucket(rate)
    now, sent = at(0), []
    while now < at(5):
        wait = bucket.take(now)
        if wait == 0:
            sent.append(now)
        else:
            now = after(now, wait)
            assert bucket.take(now) == 0.0, "the token was not there at the promised time"
            sent.append(now)
    per_window = math.ceil(rate)
    for i, start in enumerate(sent):
        in_window = [t for t in sent[i:] if t < start + timedelta(seconds=1)]
        assert len(in_window) <= per_window


def test_bucket_ready_at_projects_a_paced_queue() -> None:
    bucket = TokenBucket(rate=4)
    assert bucket.ready_at(at(0)) == at(0)
    bucket.take(at(0))
    assert bucket.ready_at(at(0)) == at(0.25)
    assert bucket.ready_at(at(0), count=3) == at(0.75)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(1, burst=0.5)


def test_after_rounds_up_to_the_microsecond() -> None:
    assert after(at(0), 1 / 3) == at(0) + timedelta(microseconds=333334)
    assert after(at(0), -5) == at(0)


# --- Breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = Breaker(threshold=3, cooldown_seconds=10)
    breaker.record_failure(at(0))
    breaker.record_failure(at(0))
    breaker.record_success(at(0))  # a success in between resets the count
    breaker.record_failure(at(1))
    breaker.record_failure(at(1))
    assert breaker.allows(at(1))
    breaker.record_failure(at(2))
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(at(5))
    assert breaker.blocks(at(5)) == at(12)


def test_half_open_breaker_grants_a_single_probe() -> None:
    breaker = Breaker(threshold=1, cooldown_seconds=10)
    breaker.record_failure(at(0))
    assert breaker.state_at(at(10)) is BreakerState.HALF_OPEN
    assert breaker.blocks(at(10)) is None
    assert breaker.allows(at(10))  # the probe
    assert breaker.probing
    assert not breaker.allows(at(10))  # nobody else while it is out
    assert breaker.blocks(at(11)) is None  # the probe itself may carry on
    breaker.record_success(at(12))
    assert breaker.state is BreakerState.CLOSED and not breaker.probing
    assert breaker.allows(at(12))


def test_failed_probe_reopens_for_longer() -> None:
    breaker = Breaker(threshold=1, cooldown_seconds=10, max_cooldown_seconds=30)
    breaker.record_failure(at(0))
    assert breaker.allows(at(10))
    breaker.record_failure(at(11), probe=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.open_until == at(31)
    assert breaker.allows(at(31))
    breaker.record_failure(at(31), probe=True)
    assert breaker.open_until == at(61)  # capped at 30 s


def test_probe_without_verdict_lets_another_probe_go() -> None:
    breaker = Breaker(threshold=1, cooldown_seconds=10)
    breaker.record_failure(at(0))
    assert breaker.allows(at(10))
    breaker.release()
    assert breaker.allows(at(10))


def test_late_failures_do_not_extend_an_open_breaker() -> None:
    breaker = Breaker(threshold=1, cooldown_seconds=10)
    breaker.record_failure(at(0))
    breaker.record_failure(at(5))
    assert breaker.open_until == at(10)


def test_a_late_failure_is_not_the_probes() -> None:
    """An exchange started before the breaker opened that fails while the probe is out (a
    request that hung to its timeout) reopened it for twice the cool-down."""
    breaker = Breaker(threshold=1, cooldown_seconds=30)
    breaker.record_failure(at(0))
    assert breaker.allows(at(30))  # the probe goes
    breaker.record_failure(at(31))  # the hung one gives up
    assert breaker.state is BreakerState.HALF_OPEN and breaker.probing
    breaker.record_success(at(32))  # the probe's answer
    assert breaker.state is BreakerState.CLOSED and breaker.cooldown == 30


# --- ProviderLimits --------------------------------------------------------------------


def limits(**kwargs: float) -> ProviderLimits:
    options = {"rate": 2.0, "concurrency": 2, **kwargs}
    return ProviderLimits(
        "acedata",
        options["rate"],
        int(options["concurrency"]),
        pause_seconds=300,
        breaker=Breaker(threshold=2, cooldown_seconds=30),
    )


def started(lim: ProviderLimits, now: datetime) -> Permit:
    permit = lim.start(now)
    assert permit is not None, "the exchange could not start"
    return permit


def test_start_takes_a_token_and_a_slot() -> None:
    lim = limits()
    assert lim.ready_at(at(0)) is None
    assert lim.start(at(0)) == Permit(probe=False)
    assert lim.ready_at(at(0)) == at(0.5)
    assert lim.start(at(0)) is None
    permit = started(lim, at(0.5))
    assert not lim.has_room()
    assert lim.start(at(5)) is None  # both slots taken
    lim.finish(at(6), permit, Verdict.ANSWERED)
    assert lim.in_flight == 1 and lim.has_room()
    assert lim.start(at(6)) is not None


def test_retry_after_holds_the_whole_provider() -> None:
    lim = limits()
    permit = started(lim, at(0))
    until = lim.finish(at(1), permit, Verdict.RATE_LIMITED, retry_after=10)
    assert until == at(11)
    assert lim.held_until(at(5)) == at(11)
    assert lim.stopped_until(at(5)) == at(11)
    assert lim.ready_at(at(5)) == at(11)
    assert lim.start(at(10.9)) is None
    assert lim.slot_at(at(5), 0) == at(11)
    assert lim.slot_at(at(5), 2) == at(12)  # the queue behind it is paced at the rate
    assert lim.start(at(11)) is not None


def test_rate_limits_without_retry_after_back_off_exponentially() -> None:
    lim = limits()
    assert lim.finish(at(0), started(lim, at(0)), Verdict.RATE_LIMITED) == at(1)
    assert lim.finish(at(1), started(lim, at(1)), Verdict.RATE_LIMITED) == at(3)
    lim.finish(at(3), started(lim, at(3)), Verdict.ANSWERED)
    assert lim.finish(at(4), started(lim, at(4)), Verdict.RATE_LIMITED) == at(5)


def test_rejected_credentials_pause_then_probe() -> None:
    lim = limits()
    permit = started(lim, at(0))
    until = lim.finish(at(0), permit, Verdict.REJECTED, reason="acedata: HTTP 401 invalid_token")
    assert until == at(300)
    assert lim.paused == "acedata: HTTP 401 invalid_token"
    assert lim.ready_at(at(100)) == at(300)
    probe = started(lim, at(300))
    assert probe.probe
    assert lim.start(at(301)) is None  # others wait for its verdict
    assert lim.probing and lim.held_until(at(301)) is None and lim.ready_at(at(301)) is None
    lim.finish(at(302), probe, Verdict.REJECTED, reason="still bad")
    assert lim.paused == "still bad"
    probe = started(lim, at(602))
    lim.finish(at(603), probe, Verdict.ANSWERED)
    assert lim.paused is None
    assert lim.ready_at(at(603)) is None


def test_failures_open_the_breaker_and_a_probe_closes_it() -> None:
    lim = limits()
    for second in (0, 1):
        lim.finish(at(second), started(lim, at(second)), Verdict.FAILED)
    assert lim.breaker.state is BreakerState.OPEN
    assert lim.ready_at(at(2)) == at(31)
    assert lim.stopped_until(at(2)) == at(31)
    probe = started(lim, at(31))
    assert probe.probe
    assert lim.start(at(40)) is None
    lim.finish(at(41), probe, Verdict.ANSWERED)
    assert lim.breaker.state is BreakerState.CLOSED


def test_a_probe_in_flight_is_not_a_hold() -> None:
    """The batches a probe holds back are paced from now, as if it had answered: handed back
    behind a probe's timeout, they waited 30 s more after the cool-down had ended."""
    lim = limits()
    for second in (0, 1):
        lim.finish(at(second), started(lim, at(second)), Verdict.FAILED)
    started(lim, at(31))
    assert lim.probing
    assert lim.held_until(at(31)) is None and lim.ready_at(at(31.5)) is None
    assert lim.slot_at(at(31), 0) == at(31.5)  # one token after the probe's


def test_abandoned_exchange_frees_its_slot_and_probe() -> None:
    lim = limits()
    for second in (0, 1):
        lim.finish(at(second), started(lim, at(second)), Verdict.FAILED)
    probe = started(lim, at(31))
    assert lim.finish(at(31), probe, Verdict.ABANDONED) is None
    assert lim.in_flight == 0
    assert lim.start(at(32)) is not None  # another probe may go


def test_take_turn_waits_for_tokens_within_an_exchange() -> None:
    lim = limits(rate=4)
    assert lim.start(at(0)) is not None
    assert lim.take_turn(at(0)) == at(0.25)
    assert lim.take_turn(at(0.25)) is None


def test_a_long_hold_is_looked_at_again_within_a_minute() -> None:
    """A hold lives in memory: the tasks it meets come back within `RECHECK_SECONDS`, so a
    restart that forgot it finds none planned behind it for longer."""
    lim = limits()
    lim.finish(at(0), started(lim, at(0)), Verdict.RATE_LIMITED, retry_after=3600)
    assert lim.held_until(at(1)) == at(3600)
    assert lim.resume_at(at(1)) == at(1 + RECHECK_SECONDS)
    assert lim.slot_at(at(1), 1) == at(1 + RECHECK_SECONDS + 0.5)
    assert lim.resume_at(at(3590)) == at(3600)
    assert lim.resume_at(at(3600)) == at(3600)  # not held: now

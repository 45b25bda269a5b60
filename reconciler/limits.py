"""Per-provider limits on talking to a provider: rate, concurrency, Retry-After, circuit
breaker and the pause after rejected credentials (SPEC §3 "Limits").

Everything here is driven by the `now` its caller passes in and never sleeps: each object
answers "may I send now, and if not, from when". The reconciler loop does the waiting
(through `Clock.sleep_until`, so a `FakeClock` test controls it) and the sending. What this
module does not own: which tasks are due (the store), what a failure does to a task's
schedule (`service`/`schedule`), and HTTP.

- `TokenBucket`: `rate` requests per second with at most `burst` at once. The default burst
  of 1 spaces requests by `1/rate`, so a provider never sees more than `rate` requests in
  any one-second window: a bucket that refills to `rate` after an idle spell would allow
  nearly twice `rate` in one window, which is what earns a 429.
- `Breaker`: closed → open after `threshold` consecutive failed exchanges → half-open when
  the cool-down ends, where one probe decides: success closes it, failure reopens it with
  a doubled cool-down.
- `ProviderLimits`: one provider's bucket, concurrency, Retry-After block, breaker and auth
  pause, combined into `ready_at(now)` and `start(now)` / `finish(now, permit, verdict)`
  around each batch exchange. A pause is probed once a minute.

Holds live here, in memory, and nowhere else: not in the tasks' schedules. A restart starts
every provider fresh, and its first exchange is the probe.
"""

from __future__ import annotations

import asyncio
import enum
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from reconciler.config import ProviderSettings
from reconciler.errors import Verdict

# A 429 without Retry-After blocks the provider this long, doubling while they keep coming.
RATE_LIMIT_BACKOFF_SECONDS = 1.0
RATE_LIMIT_BACKOFF_MAX_SECONDS = 60.0
# Rejected credentials: one probe a minute notices access that came back (a fixed key, a
# topped-up balance) soon, and costs the provider one request a minute meanwhile.
PAUSE_SECONDS = 60.0
# Holds (Retry-After, an open breaker, a pause) are the provider's state, in memory here:
# the tasks they meet are handed back due when the hold ends, but never further ahead than
# this, so a restart (which forgets every hold) finds no task planned behind one for longer.
RECHECK_SECONDS = 60.0
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_SECONDS = 30.0
BREAKER_COOLDOWN_MAX_SECONDS = 600.0
# Floating-point slack when counting tokens, so that a clock set exactly to `ready_at`
# finds the token there.
_EPSILON = 1e-9


def after(now: datetime, seconds: float) -> datetime:
    """`now + seconds`, rounded *up* to the microsecond a datetime can hold: a wait rounded
    down would wake a hair early, find nothing ready and ask to wait again (a busy loop)."""
    return now + timedelta(microseconds=math.ceil(max(0.0, seconds) * 1e6))


class TokenBucket:
    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: datetime | None = None

    def tokens(self, now: datetime) -> float:
        """Tokens available at `now` (not before the last take: time never runs back)."""
        if self._at is None or now <= self._at:
            return self._tokens
        elapsed = (now - self._at).total_seconds()
        return min(self.burst, self._tokens + elapsed * self.rate)

    def ready_at(self, now: datetime, count: int = 1) -> datetime:
        """When the `count`-th next token will be there if nobody else takes one: the n-th
        send of a queue paced at `rate` (beyond `burst`, a projection, not a promise)."""
        missing = count - self.tokens(now)
        if missing <= _EPSILON:
            return now
        return after(now, missing / self.rate)

    def take(self, now: datetime) -> float:
        """Take a token: 0.0 when one was there, else the seconds to wait (nothing taken)."""
        tokens = self.tokens(now)
        if tokens + _EPSILON < 1.0:
            return (self.ready_at(now) - now).total_seconds()
        self._tokens = max(0.0, tokens - 1.0)
        if self._at is None or now > self._at:
            self._at = now
        return 0.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    def __init__(
        self,
        threshold: int = BREAKER_THRESHOLD,
        cooldown_seconds: float = BREAKER_COOLDOWN_SECONDS,
        max_cooldown_seconds: float = BREAKER_COOLDOWN_MAX_SECONDS,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown_seconds
        self.max_cooldown = max_cooldown_seconds
        self.failures = 0  # consecutive, while closed
        self.cooldown = cooldown_seconds
        self.open_until: datetime | None = None
        self._state = BreakerState.CLOSED
        self._probing = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def state_at(self, now: datetime) -> BreakerState:
        if self._state is BreakerState.OPEN and self.open_until and now >= self.open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now: datetime) -> bool:
        """May an exchange start now? In half-open this grants the single probe, so call it
        only when the exchange will really start, and report its end."""
        state = self.state_at(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probing = True
        return True

    @property
    def probing(self) -> bool:
        """The half-open breaker's single probe is out."""
        return self._probing

    def blocks(self, now: datetime) -> datetime | None:
        """Until when the breaker holds the provider: only while open. Its probe in flight
        is no hold with an end time: the probe's verdict ends it (see `probing`)."""
        return self.open_until if self.state_at(now) is BreakerState.OPEN else None

    def record_success(self, now: datetime | None = None) -> None:
        # Any answer, the probe's or a late one, shows the provider works again.
        self._state = BreakerState.CLOSED
        self._probing = False
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.open_until = None

    def record_failure(self, now: datetime, *, probe: bool = False) -> None:
        """A failed exchange; `probe` when it was the half-open breaker's probe."""
        if probe and self._state is BreakerState.HALF_OPEN:
            # The probe failed: the provider is still broken, wait longer before the next.
            self.cooldown = min(self.max_cooldown, self.cooldown * 2)
            self._open(now)
            return
        if self._state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(now)
        # Open or half-open: a late failure of an exchange started before it opened says
        # nothing new, and must not pass for the probe's (that reopened it for twice the
        # cool-down while the probe itself was still out).

    def release(self) -> None:
        """The probe ended without a verdict (rate limited, abandoned): allow another."""
        self._probing = False

    def _open(self, now: datetime) -> None:
        self._state = BreakerState.OPEN
        self._probing = False
        self.failures = 0
        self.open_until = after(now, self.cooldown)


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to run one batch exchange, handed back to `finish`. `probe`: this exchange is
    the one that decides an open breaker or a credentials pause."""

    probe: bool = False


class ProviderLimits:
    """One provider's limits. `start(now)` before a batch exchange (None: not now, see
    `ready_at`), `finish(now, permit, verdict)` after it, and before each further request
    within it `stopped_until(now)` (give up) and `take_turn(now)` (wait for a token)."""

    def __init__(
        self,
        name: str,
        rate: float,
        concurrency: int,
        *,
        burst: float = 1.0,
        pause_seconds: float = PAUSE_SECONDS,
        breaker: Breaker | None = None,
    ) -> None:
        self.name = name
        self.bucket = TokenBucket(rate, burst)
        self.concurrency = concurrency
        # Requests in flight; held only around the HTTP exchange itself.
        self.semaphore = asyncio.Semaphore(concurrency)
        self.in_flight = 0  # batch exchanges started and not finished
        self.breaker = breaker or Breaker()
        self.pause_seconds = pause_seconds
        self.blocked_until: datetime | None = None  # Retry-After, for the whole provider
        self.rate_limited_streak = 0
        self.paused: str | None = None  # why, while credentials are rejected
        self.paused_until: datetime | None = None
        self._pause_probing = False

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> ProviderLimits:
        return cls(settings.name, settings.rate_limit, settings.concurrency)

    # --- questions -----------------------------------------------------------------------

    def held_until(self, now: datetime) -> datetime | None:
        """Until when nothing at all may be sent: Retry-After, an open breaker, a pause
        before its next probe. A probe in flight is not a hold: see `probing`."""
        times = [
            until
            for until in (
                self.blocked_until,
                self.paused_until if self.paused is not None else None,
                self.breaker.blocks(now),
            )
            if until is not None and now < until
        ]
        return max(times) if times else None

    @property
    def probing(self) -> bool:
        """A probe is out (after an open breaker or a pause): nothing else starts until its
        verdict, which may come any moment, so it is waited for, not timed."""
        return self.breaker.probing or self._pause_probing

    def ready_at(self, now: datetime) -> datetime | None:
        """None when a batch may start now as far as time goes (room and a probe in flight
        permitting: both end with an exchange, not at a time); else the earliest it might."""
        held = self.held_until(now)
        token = self.bucket.ready_at(held or now)
        if held is None and token <= now:
            return None
        return max(token, held or now)

    def has_room(self) -> bool:
        return self.in_flight < self.concurrency

    def resume_at(self, now: datetime) -> datetime:
        """When to try this provider again: the end of its hold, at most `RECHECK_SECONDS`
        away (a longer hold is looked at again then, and found still standing)."""
        held = self.held_until(now)
        return now if held is None else min(held, after(now, RECHECK_SECONDS))

    def slot_at(self, now: datetime, position: int) -> datetime:
        """When the batch `position` places back in this provider's queue (0: next) may
        start: paced at `rate` from `resume_at` (with a probe out, from now: a probe usually
        answers within the second), and never before `position + 1` tokens from now, so
        that a provider whose exchanges are all in flight is not asked again at once."""
        paced = self.bucket.ready_at(self.resume_at(now), position + 1)
        return max(paced, after(now, (position + 1) / self.bucket.rate))

    # --- one batch exchange --------------------------------------------------------------

    def start(self, now: datetime) -> Permit | None:
        """Begin a batch exchange now if allowed: takes a token and, after an open breaker
        or a pause, makes this exchange the probe."""
        if self.ready_at(now) is not None or self.probing or not self.has_room():
            return None
        half_open = self.breaker.state_at(now) is BreakerState.HALF_OPEN
        if not self.breaker.allows(now):
            return None
        probe = half_open
        if self.paused is not None:
            self._pause_probing = probe = True
        self.bucket.take(now)
        self.in_flight += 1
        return Permit(probe)

    def stopped_until(self, now: datetime) -> datetime | None:
        """Until when an exchange already under way must send nothing more (Retry-After,
        pause, open breaker); None when it may carry on. A half-open breaker does not stop
        the probe that is under way."""
        return self.held_until(now)

    def take_turn(self, now: datetime) -> datetime | None:
        """A token for a further request of an exchange under way: None when taken, else
        when to try again."""
        wait = self.bucket.take(now)
        return None if wait <= 0 else after(now, wait)

    def finish(
        self,
        now: datetime,
        permit: Permit,
        verdict: Verdict,
        *,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> datetime | None:
        """Record how an exchange ended. Returns until when the provider is now held
        (Retry-After or pause), for handing the exchange's tasks back to that time."""
        self.in_flight = max(0, self.in_flight - 1)
        if permit.probe:
            self._pause_probing = False
        if verdict is Verdict.ANSWERED:
            self.breaker.record_success(now)
            self.rate_limited_streak = 0
            self.paused = self.paused_until = None
            return None
        if verdict is Verdict.FAILED:
            self.breaker.record_failure(now, probe=permit.probe)
            return None
        if permit.probe:
            self.breaker.release()
        if verdict is Verdict.RATE_LIMITED:
            if retry_after is None:
                retry_after = min(
                    RATE_LIMIT_BACKOFF_MAX_SECONDS,
                    RATE_LIMIT_BACKOFF_SECONDS * 2.0**self.rate_limited_streak,
                )
            self.rate_limited_streak += 1
            until = after(now, retry_after)
            self.blocked_until = max(until, self.blocked_until or until)
            return self.blocked_until
        if verdict is Verdict.REJECTED:
            self.paused = reason or "credentials rejected"
            self.paused_until = after(now, self.pause_seconds)
            return self.paused_until
        return None  # ABANDONED

"""Clocks: `sleep_until` returns at its time or when woken, and never waits for real time
in these tests (a `FakeClock` is advanced; a `SystemClock` is woken)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.clock import Clock, FakeClock, SystemClock

START = datetime(2026, 1, 1, tzinfo=UTC)
BACKSTOP = 5.0  # seconds; only reached when a test is broken


class WatchedEvent(asyncio.Event):
    """An Event that tells when someone starts waiting on it: the sleeper is then parked."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def wait(self) -> bool:
        self.waiting.set()
        return await super().wait()


async def parked(clock: Clock, when: datetime | None, wake: WatchedEvent) -> asyncio.Task[None]:
    sleeper = asyncio.create_task(clock.sleep_until(when, wake))
    async with asyncio.timeout(BACKSTOP):
        await wake.waiting.wait()
    assert not sleeper.done()
    return sleeper


async def finished(sleeper: asyncio.Task[None]) -> None:
    async with asyncio.timeout(BACKSTOP):
        await sleeper


# --- FakeClock ---------------------------------------------------------------------------


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(START)
    assert clock.now() == START
    clock.advance(90)
    assert clock.now() == START + timedelta(seconds=90)
    clock.set(START + timedelta(hours=1))
    assert clock.now() == START + timedelta(hours=1)
    with pytest.raises(ValueError, match="never goes back"):
        clock.set(START)
    assert FakeClock().now().tzinfo is not None


@pytest.mark.parametrize("offset", [-10, 0])
async def test_fake_sleep_until_a_past_time_returns_at_once(offset: float) -> None:
    clock = FakeClock(START)
    async with asyncio.timeout(BACKSTOP):
        await clock.sleep_until(START + timedelta(seconds=offset), asyncio.Event())


async def test_fake_sleep_until_returns_at_once_when_already_woken() -> None:
    clock = FakeClock(START)
    wake = asyncio.Event()
    wake.set()
    async with asyncio.timeout(BACKSTOP):
        await clock.sleep_until(None, wake)
        await clock.sleep_until(START + timedelta(days=1), wake)


@pytest.mark.parametrize("step", [60, 61, 3600])
async def test_fake_sleep_until_returns_when_advanced_to_or_past_its_time(step: float) -> None:
    clock = FakeClock(START)
    sleeper = await parked(clock, START + timedelta(seconds=60), WatchedEvent())
    clock.advance(step)
    await finished(sleeper)


async def test_fake_sleep_until_waits_for_its_own_time() -> None:
    clock = FakeClock(START)
    late = await parked(clock, START + timedelta(seconds=10), WatchedEvent())
    early = await parked(clock, START + timedelta(seconds=5), WatchedEvent())
    clock.advance(5)
    await finished(early)
    assert not late.done()
    clock.advance(5)
    await finished(late)


async def test_fake_sleep_until_returns_when_woken() -> None:
    clock = FakeClock(START)
    wake = WatchedEvent()
    sleeper = await parked(clock, START + timedelta(days=1), wake)
    wake.set()
    await finished(sleeper)
    assert clock.now() == START


async def test_fake_sleep_forever_until_woken() -> None:
    clock = FakeClock(START)
    wake = WatchedEvent()
    sleeper = await parked(clock, None, wake)
    clock.advance(10**9)
    assert not sleeper.done()
    wake.set()
    await finished(sleeper)


async def test_fake_sleep_until_cancelled_leaves_nothing_behind() -> None:
    clock = FakeClock(START)
    sleeper = await parked(clock, START + timedelta(seconds=5), WatchedEvent())
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finished(sleeper)
    clock.advance(10)  # no parked event left to set
    again = await parked(clock, START + timedelta(seconds=20), WatchedEvent())
    clock.advance(10)
    await finished(again)


# --- SystemClock -------------------------------------------------------------------------


def test_system_clock_is_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)


@pytest.mark.parametrize("offset", [-3600, -1, 0])
async def test_system_sleep_until_a_past_time_returns_at_once(offset: float) -> None:
    clock = SystemClock()
    async with asyncio.timeout(BACKSTOP):
        await clock.sleep_until(clock.now() + timedelta(seconds=offset), asyncio.Event())


@pytest.mark.parametrize("hours", [None, 1, 24])
async def test_system_sleep_until_returns_when_woken(hours: float | None) -> None:
    clock = SystemClock()
    when = None if hours is None else clock.now() + timedelta(hours=hours)
    wake = WatchedEvent()
    sleeper = await parked(clock, when, wake)
    wake.set()
    await finished(sleeper)


async def test_system_sleep_until_returns_at_once_when_already_woken() -> None:
    clock = SystemClock()
    wake = asyncio.Event()
    wake.set()
    async with asyncio.timeout(BACKSTOP):
        await clock.sleep_until(clock.now() + timedelta(hours=1), wake)

"""One clock for every process: same settings, same "now"; a manual clock for deterministic tests."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from core.clock import ManualClock, ScaledClock, SystemClock, clock_from_settings
from tests.fixtures.services import build_settings

IST = ZoneInfo("Asia/Kolkata")


def test_two_scaled_clocks_with_the_same_anchor_agree() -> None:
    start = datetime(2024, 6, 3, 9, 20, tzinfo=IST)
    anchor = time.time() - 5.0
    first, second = ScaledClock(start, anchor, speed=60), ScaledClock(start, anchor, speed=60)
    difference = abs((first.now() - second.now()).total_seconds())
    # Two reads a few microseconds apart, at 60x: far under a second of clock time.
    assert difference < 0.5
    # 5 real seconds at 60x is 5 clock minutes past the start.
    assert timedelta(minutes=5) <= first.now() - start < timedelta(minutes=5, seconds=5)


def test_scaled_clock_converts_clock_time_to_real_waiting_time() -> None:
    start = datetime(2024, 6, 3, 9, 20, tzinfo=IST)
    clock = ScaledClock(start, time.time(), speed=10)
    assert clock.seconds_until(start + timedelta(minutes=1)) == pytest.approx(6.0, abs=0.1)


def test_scaled_clock_refuses_naive_start() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ScaledClock(datetime(2024, 6, 3, 9, 20))  # noqa: DTZ001 - the point of the test


def test_clock_from_settings_reads_naive_start_as_exchange_time() -> None:
    anchor = time.time()
    settings = build_settings(clock_start="2024-06-03T09:20:00", clock_anchor=anchor, clock_speed=1.0)
    clock = clock_from_settings(settings)
    assert isinstance(clock, ScaledClock)
    assert clock.start == datetime(2024, 6, 3, 9, 20, tzinfo=IST)
    # Another process with the same settings agrees on now.
    other = clock_from_settings(settings)
    assert abs((clock.now() - other.now()).total_seconds()) < 0.5


def test_clock_from_settings_without_start_is_the_real_clock() -> None:
    clock = clock_from_settings(build_settings())
    assert isinstance(clock, SystemClock)
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1


async def test_manual_clock_sleep_until_wakes_only_when_advanced_past() -> None:
    clock = ManualClock(datetime(2024, 6, 3, 9, 29, tzinfo=IST))
    target = datetime(2024, 6, 3, 9, 30, tzinfo=IST)
    sleeper = asyncio.create_task(clock.sleep_until(target))
    clock.advance(30)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(30)
    await asyncio.wait_for(sleeper, 1)
    assert clock.now() == target


async def test_manual_clock_sleep_until_the_past_returns_at_once() -> None:
    clock = ManualClock(datetime(2024, 6, 3, 9, 31, tzinfo=IST))
    await asyncio.wait_for(clock.sleep_until(datetime(2024, 6, 3, 9, 30, tzinfo=IST)), 1)

"""One clock for every component: nothing in the project calls `datetime.now()` directly.

Production uses the real clock. Tests and demos use a shifted and optionally sped-up clock that every
process derives from the same three settings (start, anchor, speed), so the API, the workers, the
scheduler and the simulator all agree on "now" without talking to each other.
"""

from __future__ import annotations

import asyncio
import time as _time
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from core.settings import Settings, get_settings


class Clock(Protocol):
    def now(self) -> datetime:
        """Timezone-aware current instant (UTC)."""
        ...

    def seconds_until(self, when: datetime) -> float:
        """Real seconds to wait until the clock reads `when` (negative if already past)."""
        ...

    async def sleep_until(self, when: datetime) -> None: ...


class _ClockBase:
    speed: float = 1.0

    def now(self) -> datetime:  # pragma: no cover - overridden
        raise NotImplementedError

    def seconds_until(self, when: datetime) -> float:
        return (when - self.now()).total_seconds() / self.speed

    async def sleep_until(self, when: datetime) -> None:
        # Re-check after waking: a sped-up or manually advanced clock may have moved further.
        while (delay := self.seconds_until(when)) > 0:  # noqa: ASYNC110 - time itself is what we wait for
            await asyncio.sleep(min(delay, 1.0))


class SystemClock(_ClockBase):
    def now(self) -> datetime:
        return datetime.now(UTC)


class ScaledClock(_ClockBase):
    """Reads `start` at real unix time `anchor`, and advances `speed` clock-seconds per real second."""

    def __init__(self, start: datetime, anchor: float | None = None, speed: float = 1.0) -> None:
        if start.tzinfo is None:
            raise ValueError("ScaledClock start must be timezone-aware")
        self.start = start.astimezone(UTC)
        self.anchor = _time.time() if anchor is None else anchor
        self.speed = speed

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(_time.time() - self.anchor) * self.speed)


class ManualClock(_ClockBase):
    """A clock that only moves when told to; for unit tests."""

    def __init__(self, start: datetime) -> None:
        self._now = start.astimezone(UTC)
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self.set(self._now + timedelta(seconds=seconds))

    def set(self, when: datetime) -> None:
        self._now = when.astimezone(UTC)
        self._moved.set()
        self._moved = asyncio.Event()

    async def sleep_until(self, when: datetime) -> None:
        while self._now < when:
            await self._moved.wait()


def clock_from_settings(settings: Settings) -> Clock:
    if settings.clock_start is None:
        return SystemClock()
    start = datetime.fromisoformat(settings.clock_start)
    if start.tzinfo is None:
        start = start.replace(tzinfo=ZoneInfo(settings.market_timezone))
    return ScaledClock(start, settings.clock_anchor, settings.clock_speed)


_clock: Clock | None = None


def get_clock() -> Clock:
    global _clock
    if _clock is None:
        _clock = clock_from_settings(get_settings())
    return _clock


def set_clock(clock: Clock | None) -> None:
    """Install a clock for this process (tests); None goes back to the one the settings describe."""
    global _clock
    _clock = clock

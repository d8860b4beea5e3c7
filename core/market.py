"""Exchange time: the market's timezone, its hours and its trading days (NSE holiday calendar)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

from core.settings import Settings


@lru_cache(maxsize=64)
def _nse_holidays(year: int) -> holidays.HolidayBase:
    # The `holidays` package keeps the NSE (XNSE) trading-holiday list up to date each year.
    return holidays.financial_holidays("XNSE", years=year)


class MarketCalendar:
    def __init__(self, settings: Settings) -> None:
        self.tz = ZoneInfo(settings.market_timezone)
        self.open = settings.market_open
        self.close = settings.market_close

    def is_trading_day(self, day: date) -> bool:
        return day.weekday() < 5 and day not in _nse_holidays(day.year)

    def next_trading_day(self, day: date) -> date:
        """`day` itself if it trades, else the next one that does."""
        while not self.is_trading_day(day):
            day += timedelta(days=1)
        return day

    def local(self, instant: datetime) -> datetime:
        return instant.astimezone(self.tz)

    def trading_day_of(self, instant: datetime) -> date:
        return self.local(instant).date()

    def at(self, day: date, clock_time: time) -> datetime:
        """The instant at which the exchange clock reads `clock_time` on `day`."""
        return datetime.combine(day, clock_time, tzinfo=self.tz)

    def within_hours(self, clock_time: time) -> bool:
        return self.open <= clock_time <= self.close

    def is_open(self, instant: datetime) -> bool:
        local = self.local(instant)
        return self.is_trading_day(local.date()) and self.within_hours(local.time())

"""The exchange calendar: NSE trading days (weekends and holidays) and cash-market hours."""

from __future__ import annotations

from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from core.market import MarketCalendar
from tests.fixtures.services import build_settings

IST = ZoneInfo("Asia/Kolkata")


@pytest.fixture
def calendar() -> MarketCalendar:
    return MarketCalendar(build_settings())


def test_nse_holiday_is_not_a_trading_day(calendar: MarketCalendar) -> None:
    republic_day = date(2024, 1, 26)  # a Friday, an NSE holiday
    assert republic_day.weekday() == 4
    assert not calendar.is_trading_day(republic_day)


def test_weekend_is_not_a_trading_day(calendar: MarketCalendar) -> None:
    assert not calendar.is_trading_day(date(2024, 1, 27))  # Saturday
    assert not calendar.is_trading_day(date(2024, 1, 28))  # Sunday
    assert calendar.is_trading_day(date(2024, 1, 29))  # Monday


def test_next_trading_day_skips_holiday_and_weekend(calendar: MarketCalendar) -> None:
    assert calendar.next_trading_day(date(2024, 1, 26)) == date(2024, 1, 29)
    assert calendar.next_trading_day(date(2024, 1, 29)) == date(2024, 1, 29)


@pytest.mark.parametrize(
    ("clock_time", "open_"),
    [(time(9, 14, 59), False), (time(9, 15), True), (time(12, 0), True), (time(15, 30), True),
     (time(15, 30, 1), False)],
)  # fmt: skip
def test_market_hours_on_a_trading_day(calendar: MarketCalendar, clock_time: time, open_: bool) -> None:
    assert calendar.is_open(datetime.combine(date(2024, 1, 29), clock_time, tzinfo=IST)) is open_


def test_market_closed_all_day_on_a_holiday(calendar: MarketCalendar) -> None:
    assert not calendar.is_open(datetime(2024, 1, 26, 11, 0, tzinfo=IST))


def test_instants_are_read_in_exchange_time(calendar: MarketCalendar) -> None:
    # 04:00 UTC is 09:30 IST: open. The UTC date and the exchange date can differ near midnight.
    assert calendar.is_open(datetime(2024, 1, 29, 4, 0, tzinfo=ZoneInfo("UTC")))
    assert calendar.trading_day_of(datetime(2024, 1, 28, 19, 0, tzinfo=ZoneInfo("UTC"))) == date(2024, 1, 29)

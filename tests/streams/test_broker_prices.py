"""Last prices asked of the broker: instruments asked for while a lookup runs go out together in the next."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from core.clock import ManualClock
from streams.broker_prices import BrokerPrices
from streams.worker import WorkerServices
from tests.fixtures.services import build_settings


class SlowQuotes:
    """Stands in for the broker's quote call (the worker passes `Recovery.last_prices`, which calls Kite's ltp
    against the simulator); each call waits until the test lets it answer."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answer = asyncio.Event()
        self.fail = False

    async def __call__(self, instruments: list[str]) -> dict[str, float]:
        self.calls.append(instruments)
        await self.answer.wait()
        if self.fail:
            raise RuntimeError("broker down")
        return {instrument: 100.0 + n for n, instrument in enumerate(instruments)}


async def settled(prices: BrokerPrices) -> None:
    assert prices._task is not None
    await prices._task


async def test_instruments_asked_for_during_a_lookup_share_the_next_one() -> None:
    quotes, found = SlowQuotes(), {}
    prices = BrokerPrices(quotes, found.setdefault)

    prices.ask("NSE:INFY")
    prices.ask("NSE:INFY")  # asked twice before the lookup starts: once in it
    await asyncio.sleep(0.01)
    for instrument in ("NSE:TCS", "NSE:SBIN", "NSE:TCS", "NSE:INFY"):  # INFY is being looked up: not again
        prices.ask(instrument)
    quotes.answer.set()
    await settled(prices)

    assert quotes.calls == [["NSE:INFY"], ["NSE:SBIN", "NSE:TCS"]]
    assert found == {"NSE:INFY": 100.0, "NSE:SBIN": 100.0, "NSE:TCS": 101.0}


async def test_a_failed_lookup_is_logged_and_the_instrument_can_be_asked_for_again(caplog) -> None:
    quotes, found = SlowQuotes(), {}
    prices = BrokerPrices(quotes, found.setdefault)
    quotes.fail = True
    quotes.answer.set()

    prices.ask("NSE:INFY")
    await settled(prices)
    assert found == {}
    assert "no last prices from the broker for 1 instrument(s)" in caplog.text

    quotes.fail = False
    prices.ask("NSE:INFY")
    await settled(prices)
    assert found == {"NSE:INFY": 100.0}
    assert quotes.calls == [["NSE:INFY"], ["NSE:INFY"]]


async def test_an_answer_asked_before_a_tick_came_does_not_replace_its_price() -> None:
    """The broker's answer may be older than a tick read while it was under way: a stale 2,000 taken for the
    latest price after a tick at 2,030 raised a trailing stop to 2,020 would exit at once."""
    clock = ManualClock(datetime(2025, 1, 15, 4, 30, tzinfo=UTC))
    services = WorkerServices(build_settings(), clock)
    quotes = SlowQuotes()
    services.broker_prices = BrokerPrices(quotes, services.broker_price)
    services.ask_broker_price("NSE:INFY")  # answered 100.0
    services.ask_broker_price("NSE:TCS")  # answered 101.0
    await asyncio.sleep(0.01)
    clock.advance(0.1)
    services.latest["NSE:INFY"], services.latest_seen["NSE:INFY"] = 2030.0, clock.now().isoformat()  # a tick
    quotes.answer.set()
    await settled(services.broker_prices)
    assert services.latest == {"NSE:INFY": 2030.0, "NSE:TCS": 101.0}
    assert services.seen_at("NSE:TCS") == clock.now().timestamp()

"""SchedulerCore on a manual clock: BUY/SELL fire at their exchange-time instants, once, on the right day."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from core.clock import ManualClock, ScaledClock
from schemas.events import Action, TimeEvent
from streams.scheduler import SchedulerCore
from tests.fixtures.services import build_settings

IST = ZoneInfo("Asia/Kolkata")
DAY = date(2025, 1, 15)  # a Wednesday, NSE open


def ist(hour: int, minute: int, second: float = 0, day: date = DAY) -> datetime:
    whole = int(second)
    micro = round((second - whole) * 1_000_000)
    return datetime(day.year, day.month, day.day, hour, minute, whole, micro, tzinfo=IST)


def spec(
    *,
    buy: str = "09:30:00",
    sell: str = "15:00:00",
    day: date = DAY,
    run: int = 1,
    user_id: int = 100,
    instrument: str = "NSE:INFY",
    quantity: int = 5,
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "instrument": instrument,
        "quantity": quantity,
        "buy_time": buy,
        "sell_time": sell,
        "run": run,
        "trading_day": day.isoformat(),
    }


class Published:
    def __init__(self) -> None:
        self.events: list[TimeEvent] = []
        self.arrived = asyncio.Event()

    async def __call__(self, event: TimeEvent) -> None:
        self.events.append(event)
        self.arrived.set()

    def take(self) -> list[tuple[int, Action]]:
        out: list[tuple[int, Action]] = [(e.strategy_id, e.action) for e in self.events]
        self.events.clear()
        self.arrived.clear()
        return out


def make_core(clock: ManualClock | ScaledClock, publish: Any, **settings: object) -> SchedulerCore:
    # Exact instants unless a test is about the BUY's lead (test_a_buy_is_handed_over_its_lead_early).
    settings.setdefault("buy_lead_seconds", 0)
    return SchedulerCore(build_settings(**settings), clock, publish)


async def test_jobs_fire_at_their_exchange_time_instant() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    core.register(1, spec(buy="09:30:00", sell="15:00:00"))

    clock.set(ist(9, 29, 59.999))
    assert await core.fire_due() == 0
    clock.set(ist(9, 30))
    assert await core.fire_due() == 1
    [buy] = published.events
    assert (buy.strategy_id, buy.action, buy.run, buy.user_id) == (1, Action.BUY, 1, 100)
    assert buy.due_at == datetime(2025, 1, 15, 4, 0, tzinfo=UTC)  # 09:30 IST is 04:00 UTC
    assert buy.fired_at == clock.now()
    assert (buy.instrument, buy.quantity, buy.trading_day) == ("NSE:INFY", 5, DAY)
    published.take()

    assert await core.fire_due() == 0  # fired once
    clock.set(ist(14, 59, 59))
    assert await core.fire_due() == 0
    clock.set(ist(15, 0, 0.5))
    assert await core.fire_due() == 1
    [sell] = published.events
    assert sell.action is Action.SELL
    assert sell.due_at == datetime(2025, 1, 15, 9, 30, tzinfo=UTC)
    assert len(core.book) == 0
    assert 1 not in core.specs  # a strategy whose SELL went out is done


async def test_a_buy_is_handed_over_its_lead_early_with_its_own_due_time_and_a_sell_is_not() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published, buy_lead_seconds=5)
    core.register(1, spec(buy="09:30:00", sell="15:00:00"))

    assert core.book.next_due() == ist(9, 29, 55)
    clock.set(ist(9, 29, 54.999))
    assert await core.fire_due() == 0
    clock.set(ist(9, 29, 55))
    assert await core.fire_due() == 1
    [buy] = published.events
    # The engine holds the order until `due_at`: the event says when the BUY is due, not when it was handed over.
    assert (buy.action, buy.due_at, buy.fired_at) == (Action.BUY, ist(9, 30), ist(9, 29, 55))
    published.take()

    clock.set(ist(14, 59, 59.999))
    assert await core.fire_due() == 0
    clock.set(ist(15, 0))
    assert await core.fire_due() == 1
    [sell] = published.events
    assert (sell.action, sell.due_at) == (Action.SELL, ist(15, 0))


async def test_jobs_wait_for_their_own_trading_day() -> None:
    clock = ManualClock(ist(8, 0))
    published = Published()
    core = make_core(clock, published)
    tomorrow = DAY + timedelta(days=1)
    core.register(1, spec(day=tomorrow))
    clock.set(ist(9, 30))
    assert await core.fire_due() == 0
    clock.set(ist(15, 0))
    assert await core.fire_due() == 0
    clock.set(ist(9, 30, day=tomorrow))
    assert await core.fire_due() == 1
    assert published.take() == [(1, Action.BUY)]
    assert core.book.next_due() == ist(15, 0, day=tomorrow)


async def test_a_cancelled_strategy_fires_nothing() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    core.register(1, spec())
    core.register(2, spec())
    core.cancel(1)
    assert core.book.jobs_of(1) == []
    clock.set(ist(9, 30))
    assert await core.fire_due() == 1
    clock.set(ist(15, 0))
    assert await core.fire_due() == 1
    assert published.take() == [(2, Action.BUY), (2, Action.SELL)]


async def test_cancel_after_the_buy_stops_the_sell() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    core.register(1, spec())
    clock.set(ist(9, 30))
    assert await core.fire_due() == 1
    core.cancel(1)
    clock.set(ist(15, 0))
    assert await core.fire_due() == 0
    assert published.take() == [(1, Action.BUY)]


async def test_missed_jobs_fire_at_once_with_their_original_due_time() -> None:
    # The scheduler comes up after both were due. It fires both: the execution engine judges the BUY's
    # lateness against `missed_buy_grace_seconds` from `due_at`, and a missed SELL must always go out.
    clock = ManualClock(ist(15, 10))
    published = Published()
    core = make_core(clock, published, missed_buy_grace_seconds=60)
    core.register(1, spec(buy="09:30:00", sell="15:00:00"))
    assert await core.fire_due() == 2
    buy, sell = published.events
    assert (buy.action, buy.due_at, buy.fired_at) == (Action.BUY, ist(9, 30), ist(15, 10))
    assert (sell.action, sell.due_at, sell.fired_at) == (Action.SELL, ist(15, 0), ist(15, 10))
    assert len(core.book) == 0
    assert await core.fire_due() == 0


async def test_ten_thousand_jobs_due_in_one_second_go_out_in_one_call_concurrently() -> None:
    clock = ManualClock(ist(9, 0))
    n = 10_000
    started = 0
    all_started = asyncio.Event()
    sent: list[TimeEvent] = []

    async def publish(event: TimeEvent) -> None:
        # Every publish waits until all of them are in flight: a one-by-one publisher would never finish.
        nonlocal started
        started += 1
        if started == n:
            all_started.set()
        await all_started.wait()
        sent.append(event)

    core = make_core(clock, publish)
    for sid in range(1, n + 1):
        core.register(sid, spec(buy="09:30:00"))
    clock.set(ist(9, 30, 0.999))
    assert await asyncio.wait_for(core.fire_due(), 10) == n
    assert len(sent) == n
    assert {e.strategy_id for e in sent} == set(range(1, n + 1))
    assert {e.action for e in sent} == {Action.BUY}
    assert len(core.book) == n  # their SELLs remain
    assert await core.fire_due() == 0


async def test_re_registering_replaces_the_strategys_jobs() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    core.register(1, spec(buy="09:30:00", sell="15:00:00", run=1))
    core.register(1, spec(buy="10:00:00", sell="14:00:00", run=2))
    assert len(core.book) == 2
    clock.set(ist(9, 45))
    assert await core.fire_due() == 0  # the old BUY time is gone
    clock.set(ist(10, 0))
    assert await core.fire_due() == 1
    clock.set(ist(14, 0))
    assert await core.fire_due() == 1
    assert [(e.action, e.run) for e in published.events] == [(Action.BUY, 2), (Action.SELL, 2)]
    clock.set(ist(15, 30))
    assert await core.fire_due() == 0  # nor does the old SELL fire


async def test_clear_forgets_all_jobs() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    core.register(1, spec())
    core.clear()
    clock.set(ist(15, 30))
    assert await core.fire_due() == 0
    assert core.book.next_due() is None


async def test_a_failed_publish_does_not_lose_the_sell() -> None:
    clock = ManualClock(ist(9, 0))
    failing = True
    sent: list[TimeEvent] = []

    async def publish(event: TimeEvent) -> None:
        if failing:
            raise ConnectionError("Kafka is down")
        sent.append(event)

    core = make_core(clock, publish)
    core.register(1, spec(buy="09:30:00", sell="15:00:00"))
    clock.set(ist(15, 0))
    assert await core.fire_due() == 0  # Kafka down: nothing published, nothing lost
    assert core.last_pass_failed
    failing = False
    assert await core.fire_due() == 2  # the next look at the book, Kafka back
    assert sorted((e.strategy_id, e.action) for e in sent) == [(1, Action.BUY), (1, Action.SELL)]


# ------------------------------------------------------------------------------------------------- run()


async def test_run_fires_when_the_manual_clock_reaches_the_job_and_wakes_on_register() -> None:
    clock = ManualClock(ist(9, 0))
    published = Published()
    core = make_core(clock, published)
    refreshes = 0

    def refresh() -> None:
        nonlocal refreshes
        refreshes += 1

    runner = asyncio.create_task(core.run(refresh))
    try:
        await asyncio.sleep(0)
        assert refreshes >= 1  # refresh runs before the (empty) book is read
        core.register(1, spec(buy="09:30:00"))  # wakes the idle loop
        clock.set(ist(9, 30))
        core.wakeup.set()
        await asyncio.wait_for(published.arrived.wait(), 5)
        assert published.take() == [(1, Action.BUY)]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_run_fires_on_a_scaled_clock_without_being_poked() -> None:
    # 60 clock-seconds per real second: the BUY 6 clock-seconds away is ~0.1 s of real time.
    clock = ScaledClock(ist(9, 29, 54), speed=60)
    published = Published()
    core = make_core(clock, published)
    runner = asyncio.create_task(core.run())
    try:
        core.register(1, spec(buy="09:30:00", sell="09:30:12"))
        await asyncio.wait_for(published.arrived.wait(), 5)
        [buy] = published.events
        assert buy.action is Action.BUY
        assert buy.fired_at >= buy.due_at
        assert buy.fired_at - buy.due_at < timedelta(seconds=60)  # generous: within the grace, not skipped
        published.take()
        await asyncio.wait_for(published.arrived.wait(), 5)
        assert published.take() == [(1, Action.SELL)]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

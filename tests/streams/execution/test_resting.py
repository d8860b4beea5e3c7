"""Orders the broker leaves resting: the execution engine against the Kite simulator through the official client
(real database and Redis; only Kafka is left out, its events recorded). Judged by the simulator's audit and book.

The simulator's `fast_move_slippage` makes a market order sweep the book as far again as the last price step
moved: after a crash the protected exit rests OPEN beyond its band, as Kite's traders report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.broker import KiteBroker
from connectors.kite_sim import RunningSimulator
from connectors.orders import KiteOrderGateway, OrderGateway
from core.clock import ManualClock
from core.market import MarketCalendar
from manager.run_specs import initial_runtime, spec_for
from manager.strategy_manager import StrategyManager
from schemas.events import Action, NotificationKind, OrderStatus
from storage.db import session_factory
from storage.models import OrderLogKind
from storage.runtime import LTP_KEY, RuntimeStore
from streams.execution import Executor
from streams.execution.resting import limit_for_exit
from tests.fixtures.services import build_settings
from tests.fixtures.simulator import SimAccount
from tests.streams.execution.engine_bench import (
    BUY_AT,
    DAY,
    IST,
    Engine,
    RecordingPublisher,
    create_running_strategy,
    sqlite_only,
)

BUDGET = 2


async def engine_on_simulator(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, account: SimAccount
) -> Engine:
    settings = build_settings(
        kite_api_root=simulator.rest_root, exit_chase_modifications=BUDGET, exit_chase_interval_seconds=0.05,
        buy_rest_seconds=0.5, broker_timeout_seconds=2.0,
    )  # fmt: skip
    clock = ManualClock(BUY_AT)
    sessions = session_factory(db_engine)
    publisher = RecordingPublisher()
    runtime = RuntimeStore(redis)
    manager = StrategyManager(sessions, runtime, publisher, clock, MarketCalendar(settings))
    strategy = await create_running_strategy(sessions, clock.now())
    await runtime.load(spec_for(strategy), 1, DAY, initial_runtime(1, DAY, clock.now()))
    gateway = KiteOrderGateway(KiteBroker(settings, account.api_key, account.access_token))

    async def gateways(user_id: int) -> OrderGateway:
        return gateway

    executor = Executor(settings, clock, sessions, redis, publisher, gateways, manager)
    return Engine(executor, gateway, publisher, clock, sessions, redis, strategy.id, strategy.user_id)  # type: ignore[arg-type]


def audit(simulator: RunningSimulator, account: SimAccount, action: str) -> list[Any]:
    return [r for r in simulator.state.audit_records(api_key=account.api_key) if r.action == action]


def sells(simulator: RunningSimulator, account: SimAccount) -> list[Any]:
    return [o for o in simulator.state.find_orders(account.api_key) if o.transaction_type == "SELL"]


async def bought(engine: Engine, simulator: RunningSimulator) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    result = await engine.executor.execute(engine.intent(Action.BUY))
    assert result is not None and result.status is OrderStatus.FILLED


async def crash(engine: Engine, simulator: RunningSimulator, price: float) -> None:
    """The price falls at the broker and the tick feed's last price says so."""
    simulator.state.config.fast_move_slippage = True
    simulator.state.set_price("NSE:INFY", price)
    await RuntimeStore(engine.redis).set_last_prices({"NSE:INFY": price})


async def calm_once_placed_anew(simulator: RunningSimulator, account: SimAccount) -> None:
    """Once the resting exit is cancelled and placed anew, the price takes a small step: the new order's band
    holds. The simulator's book is polled: it has no hook for a test to await (bounded by the engine's deadline)."""
    for _ in range(3000):
        cancelled = [r for r in audit(simulator, account, "cancel") if r.outcome == "cancelled"]
        if cancelled and len(sells(simulator, account)) >= 2:
            simulator.state.set_price("NSE:INFY", 1399.5)
            return
        await asyncio.sleep(0.02)


def test_an_exit_limit_is_on_the_tick_and_never_above_the_price() -> None:
    assert limit_for_exit(1400.0) == 1400.0
    assert limit_for_exit(1399.97) == 1399.95
    assert limit_for_exit(0.01) == 0.05


@sqlite_only
async def test_a_resting_exit_is_repriced_at_the_price_now_and_fills_once(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    await crash(engine, simulator, 1400.0)  # a SELL now sweeps to 1300, below its band (1393)

    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))

    assert result is not None and result.status is OrderStatus.FILLED and result.price == 1400.0
    (sell,) = sells(simulator, account)
    assert (sell.status, sell.average_price, sell.order_type) == ("COMPLETE", 140000, "LIMIT")
    modifies = audit(simulator, account, "modify")
    assert [(r.outcome, r.params["price"]) for r in modifies] == [("modified", "1400.0")]
    assert [r.params["transaction_type"] for r in audit(simulator, account, "place")] == ["BUY", "SELL"]
    kinds = [n.kind for n in engine.publisher.notifications()]
    assert kinds.count(NotificationKind.EXIT_CHASED) == 1 and NotificationKind.STOPLOSS_TRIGGERED in kinds
    assert simulator.state.accounts[account.api_key].positions[("NSE", "INFY", "MIS")].quantity == 0


@sqlite_only
async def test_with_no_last_price_in_redis_a_resting_exit_is_repriced_at_the_brokers(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    """Redis restarted empty and the instrument has not ticked since: without a price the exit could only be
    placed anew as a market order, which rests again in the same move, round after round (crash matrix)."""
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    await crash(engine, simulator, 1400.0)
    await redis.delete(LTP_KEY)

    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))

    assert result is not None and result.status is OrderStatus.FILLED and result.price == 1400.0
    (sell,) = sells(simulator, account)  # one order: re-priced, never cancelled and placed anew
    assert (sell.status, sell.order_type) == ("COMPLETE", "LIMIT")
    assert [(r.outcome, r.params["price"]) for r in audit(simulator, account, "modify")] == [("modified", "1400.0")]
    assert audit(simulator, account, "cancel") == []


@sqlite_only
async def test_a_limit_at_a_stale_price_that_does_not_fill_is_repriced_at_the_brokers(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    """Redis holds an older, higher price than the market (put back after a restart): a SELL limit at it never
    fills, and the exit went round cancel and place anew for the rest of the day (crash matrix)."""
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    await crash(engine, simulator, 1400.0)
    await RuntimeStore(redis).set_last_prices({"NSE:INFY": 1450.0})

    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))

    assert result is not None and result.status is OrderStatus.FILLED and result.price == 1400.0
    (sell,) = sells(simulator, account)
    assert sell.status == "COMPLETE"
    modifies = [(r.outcome, r.params["price"]) for r in audit(simulator, account, "modify")]
    assert modifies == [("modified", "1450.0"), ("modified", "1400.0")]
    assert audit(simulator, account, "cancel") == []


@sqlite_only
async def test_past_its_budget_a_resting_exit_is_cancelled_and_placed_anew(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    simulator.state.config.max_modifications = 0  # every modification refused: only cancel and replace is left
    await crash(engine, simulator, 1400.0)

    calm = asyncio.create_task(calm_once_placed_anew(simulator, account))
    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))
    await calm

    assert result is not None and result.status is OrderStatus.FILLED
    first, second = sorted(sells(simulator, account), key=lambda o: o.order_id)
    assert (first.status, second.status) == ("CANCELLED", "COMPLETE")
    assert first.tag != second.tag and result.broker_order_id == second.order_id
    rows = [r for r in await engine.log_rows(OrderLogKind.ATTEMPT) if r.action == "STOPLOSS"]
    assert [(r.broker_tag, r.status) for r in rows] == [(first.tag, "cancelled"), (second.tag, "placed")]
    assert simulator.state.accounts[account.api_key].positions[("NSE", "INFY", "MIS")].quantity == 0


@sqlite_only
async def test_a_worker_killed_between_its_cancel_and_the_next_order_has_the_exit_placed_anew_on_redelivery(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    """The chase cancelled its resting exit and the worker died before the next order's attempt row: the
    redelivery must place that next order, not read the cancelled one as a refusal and leave the position open
    (crash matrix: the stop's exit failed as "Cancelled by the user", and only the loss limit sold the position)."""
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    simulator.state.config.max_modifications = 0
    await crash(engine, simulator, 1400.0)
    place = engine.executor.placement.place

    async def killed_before_the_next(*args: Any, **kwargs: Any) -> Any:
        if sells(simulator, account):
            raise asyncio.CancelledError  # the worker is gone before the replacement's attempt row
        return await place(*args, **kwargs)

    engine.executor.placement.place = killed_before_the_next  # type: ignore[method-assign]
    intent = engine.intent(Action.STOPLOSS)
    with pytest.raises(asyncio.CancelledError):
        await engine.executor.execute(intent)
    [first] = sells(simulator, account)
    assert first.status == "CANCELLED" and await engine.attempts(intent) == [(1, "cancelled")]
    engine.executor.placement.place = place  # type: ignore[method-assign]
    simulator.state.set_price("NSE:INFY", 1399.5)  # a small step: the next order's band holds

    result = await engine.executor.execute(intent)

    assert result is not None and result.status is OrderStatus.FILLED
    first, second = sorted(sells(simulator, account), key=lambda o: o.order_id)
    assert (first.status, second.status) == ("CANCELLED", "COMPLETE") and first.tag != second.tag
    assert await engine.attempts(intent) == [(1, "cancelled"), (2, "placed")]
    assert simulator.state.accounts[account.api_key].positions[("NSE", "INFY", "MIS")].quantity == 0


@sqlite_only
async def test_a_resting_buy_is_cancelled_and_the_run_stopped_with_a_notice(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    simulator.state.config.fast_move_slippage = True
    simulator.state.set_price("NSE:INFY", 1500.0)
    simulator.state.set_price("NSE:INFY", 1600.0)  # a jump: a BUY now sweeps to 1700, above its band

    result = await engine.executor.execute(engine.intent(Action.BUY))

    assert result is not None and result.status is OrderStatus.REJECTED and "cancelled" in (result.message or "")
    (buy,) = simulator.state.find_orders(account.api_key)
    assert buy.status == "CANCELLED"
    assert (await engine.strategy()).status == "failed"
    assert NotificationKind.ORDER_FAILED in [n.kind for n in engine.publisher.notifications()]
    assert not simulator.state.accounts[account.api_key].positions


@sqlite_only
async def test_a_position_the_broker_squared_off_is_adopted_as_the_exit_with_no_sell_of_ours(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    sim_clock = simulator.state.clock
    assert isinstance(sim_clock, ManualClock)
    before = sim_clock.now()
    try:
        sim_clock.set(before.astimezone(IST).replace(hour=15, minute=20, second=0))
        simulator.state.step()  # the broker's 15:20 square-off
        (square_off,) = simulator.state.auto_square_offs
        engine.clock.set(BUY_AT.replace(hour=15, minute=21))  # a SELL (or a late STOPLOSS) arrives after it
        result = await engine.executor.execute(engine.intent(Action.SELL))
    finally:
        sim_clock.set(before)
    assert result is not None and result.status is OrderStatus.FILLED and result.broker_order_id == square_off
    assert [r.params["transaction_type"] for r in audit(simulator, account, "place")] == ["BUY"]  # no SELL of ours
    kinds = [n.kind for n in engine.publisher.notifications()]
    assert NotificationKind.SQUARED_OFF_BY_BROKER in kinds
    assert (await engine.strategy()).status == "completed"


@sqlite_only
async def test_a_time_exit_finding_its_positions_stop_exit_resting_chases_that_one_and_sends_none(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    """A worker placed the STOPLOSS (it rests: a fast move) and died before recording it; the SELL falls due.
    The SELL must not be sent beside a live exit (both could fill: a short position): the resting STOPLOSS is
    the position's exit, chased to its fill under its own intent, and the SELL finds the position closed."""
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    await bought(engine, simulator)
    await crash(engine, simulator, 1400.0)
    stoploss = engine.intent(Action.STOPLOSS)
    await engine.died_after_logging(stoploss)
    account.kite.place_order(
        variety="regular", exchange="NSE", tradingsymbol="INFY", transaction_type="SELL", quantity=5, product="MIS",
        order_type="MARKET", tag=stoploss.broker_tag, market_protection=-1,
    )  # fmt: skip
    (resting,) = sells(simulator, account)
    assert resting.status == "OPEN"

    calm = asyncio.create_task(calm_once_placed_anew(simulator, account))
    result = await engine.executor.execute(engine.intent(Action.SELL))
    await calm

    assert result is not None and result.status is OrderStatus.SKIPPED
    first, second = sorted(sells(simulator, account), key=lambda o: o.order_id)
    assert (first.status, second.status) == ("CANCELLED", "COMPLETE")
    assert first.tag == stoploss.broker_tag and second.tag != engine.intent(Action.SELL).broker_tag
    assert dict(await engine.results()) == {"BUY": "filled", "STOPLOSS": "filled", "SELL": "skipped"}
    assert simulator.state.accounts[account.api_key].positions[("NSE", "INFY", "MIS")].quantity == 0

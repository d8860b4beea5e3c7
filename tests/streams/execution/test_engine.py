"""The execution engine against a real database and Redis, with a scriptable fake broker.

One intent -> at most one broker order (DESIGN.md section 6): redeliveries are dropped, unclear outcomes are
looked up by tag, transient failures retry up to `order_max_attempts`, permanent ones do not, and an order
that finally fails stops the strategy and tells the trader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.broker import BrokerRejected, BrokerThrottled, BrokerTokenExpired, BrokerUnavailable
from connectors.retrying import NOT_SENT_TRIES
from schemas.events import (
    Action,
    ExitKind,
    LifecycleKind,
    NotificationKind,
    OrderIntent,
    OrderResult,
    OrderStatus,
    broker_tag_for,
)
from storage.db import aware
from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus, StrategyStatusChange, User
from storage.runtime import runtime_key, symbol_key
from streams.execution import ExecutionStalled, Executor
from streams.execution.gates import PriorityGate
from streams.execution.ledger import SEND_WINDOW
from streams.execution.order_lifecycle import OrderState, TrackedOrder
from streams.execution.priority import PRIORITY, RECONCILE_PRIORITY, Urgency, effective, inherited
from tests.streams.execution.engine_bench import (
    IST,
    Engine,
    make_engine,
    sqlite_only,
)

FAILED_TITLE = "Order Failed – Strategy Stopped"


async def buy_filled(engine: Engine) -> OrderResult:
    result = await engine.executor.execute(engine.intent(Action.BUY))
    assert result is not None and result.status is OrderStatus.FILLED
    engine.publisher.sent.clear()
    return result


# ------------------------------------------------------------------------------------------ happy path


async def test_a_filled_buy_is_recorded_armed_and_reflected_in_the_runtime(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts, result.price) == (OrderStatus.FILLED, 1, 1500.0)
    [placement] = engine.gateway.placements
    assert placement == {"exchange": "NSE", "tradingsymbol": "INFY", "side": "BUY", "quantity": 5, "product": "MIS",
                         "tag": broker_tag_for(intent.intent_id)}  # fmt: skip
    assert result.broker_order_id == engine.gateway.orders_tagged(intent.broker_tag)[0].order_id
    assert engine.gateway.lookups == []  # nothing was unclear: no lookup needed

    [row] = await engine.log_rows(OrderLogKind.RESULT)
    assert (row.status, row.price, row.broker_order_id) == ("filled", Decimal("1500.00"), result.broker_order_id)
    assert await engine.attempts(intent) == [(1, "placed")]

    [armed] = engine.publisher.lifecycle()
    assert (armed.kind, armed.run, armed.entry_price, armed.spec.strategy_id) == (
        LifecycleKind.ARMED,
        1,
        1500.0,
        engine.strategy_id,
    )
    assert [r.intent_id for r in engine.publisher.results()] == [intent.intent_id]
    assert [n.kind for n in engine.publisher.notifications()] == [NotificationKind.ORDER_FILLED]

    runtime = await engine.runtime()
    assert runtime["state"] == "bought"
    assert runtime["position"] == "bought"
    assert runtime["entry_price"] == "1500.00"
    assert runtime["last_buy_order"] == result.broker_order_id
    assert (await engine.strategy()).status == "running"


async def test_a_buy_filled_under_its_stop_sends_the_stoploss_with_its_fill(engine: Engine) -> None:
    engine.gateway.fill_price = 1390.0  # the market fell under the stop (1400.05) before the BUY reached it
    buy = engine.intent(Action.BUY)
    await engine.executor.execute(buy)

    # With the fill, not after the ARMED event's round trip through the workers' stop index.
    [stoploss] = [e for topic, _, e in engine.publisher.sent if topic == "orders"]
    assert isinstance(stoploss, OrderIntent)
    assert stoploss.intent_id == engine.intent(Action.STOPLOSS).intent_id  # the id the stop index fires too
    assert (stoploss.exit_kind, stoploss.exit_level, stoploss.trigger_price) == (ExitKind.STOP, 1400.05, 1390.0)
    result = await engine.executor.execute(stoploss)
    assert result is not None and result.status is OrderStatus.FILLED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]
    assert await engine.executor.execute(engine.intent(Action.STOPLOSS)) is None  # the index's copy: a duplicate


async def test_a_buy_filled_above_its_stop_sends_no_exit(engine: Engine) -> None:
    await engine.executor.execute(engine.intent(Action.BUY))
    assert [topic for topic, _, _ in engine.publisher.sent if topic == "orders"] == []


@sqlite_only
async def test_a_sell_after_the_buy_closes_the_position_and_completes_the_strategy(engine: Engine) -> None:
    await buy_filled(engine)
    result = await engine.executor.execute(engine.intent(Action.SELL))
    assert result is not None and result.status is OrderStatus.FILLED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]
    [exited] = engine.publisher.lifecycle()
    assert (exited.kind, exited.reason, exited.entry_price) == (LifecycleKind.EXITED, "SELL", 1500.0)
    assert (await engine.runtime())["state"] == "sold"
    assert (await engine.strategy()).status == "completed"
    assert not await engine.redis.sismember(symbol_key("NSE:INFY"), str(engine.strategy_id))


@sqlite_only
async def test_a_stoploss_exits_and_a_second_stoploss_is_dropped(engine: Engine) -> None:
    await buy_filled(engine)
    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))
    assert result is not None and result.status is OrderStatus.FILLED
    assert (await engine.runtime())["state"] == "exited_by_sl"
    assert [n.kind for n in engine.publisher.notifications()] == [NotificationKind.STOPLOSS_TRIGGERED]
    # A SELL arriving after the stop-loss exit finds no position.
    late_sell = await engine.executor.execute(engine.intent(Action.SELL))
    assert late_sell is not None and late_sell.status is OrderStatus.SKIPPED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]


# ------------------------------------------------------------------------------- a BUY handed over early


def holding_until_due(engine: Engine) -> asyncio.Event:
    """Set when the engine starts waiting on the clock for an intent's due time."""
    holding = asyncio.Event()
    wait_on_clock = engine.clock.sleep_until

    async def sleep_until(when: datetime) -> None:
        holding.set()
        await wait_on_clock(when)

    engine.clock.sleep_until = sleep_until  # type: ignore[method-assign]
    return holding


@dataclass
class HeldBuy:
    intent: OrderIntent
    execution: asyncio.Task[OrderResult | None]
    holding: asyncio.Event  # set whenever the engine starts waiting on the clock for the BUY's time

    @property
    def due(self) -> datetime:
        return self.intent.due_at


async def held_buy(engine: Engine, seconds_ahead: float = 5.0) -> HeldBuy:
    """A BUY handed over `seconds_ahead` early (due in exchange time, as the scheduler sends it), executing and
    held by the engine until its time."""
    due = (engine.clock.now() + timedelta(seconds=seconds_ahead)).astimezone(IST)
    intent = engine.intent(Action.BUY, due_at=due)
    holding = holding_until_due(engine)
    execution = asyncio.create_task(engine.executor.execute(intent))
    await asyncio.wait_for(holding.wait(), 5)
    return HeldBuy(intent, execution, holding)


async def loop_turns(count: int = 20) -> None:
    """Let every ready task run until it blocks on something this test controls (no I/O is pending)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_buy_handed_over_early_is_checked_and_logged_at_once_and_sent_only_when_due(engine: Engine) -> None:
    held = await held_buy(engine)
    intent, execution, due = held.intent, held.execution, held.due

    assert engine.gateway.placements == []
    [attempt] = await engine.log_rows(OrderLogKind.ATTEMPT)
    # Dated when it is to be sent: a successor finding it unanswered gives it the broker timeout from then.
    assert (attempt.status, aware(attempt.created_at)) == ("sending", due)
    assert (await engine.runtime())["state"] == "idle"  # not "buying" before its time

    engine.clock.set(due - timedelta(milliseconds=1))
    await loop_turns()
    assert not execution.done() and engine.gateway.placements == []
    engine.clock.set(due)
    result = await asyncio.wait_for(execution, 5)
    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.placements) == 1
    assert await engine.attempts(intent) == [(1, "placed")]
    assert (await engine.runtime())["state"] == "bought"


async def test_a_buy_whose_strategy_is_stopped_before_it_falls_due_is_never_sent(engine: Engine) -> None:
    held = await held_buy(engine)
    intent = held.intent

    outcome = await engine.executor.manager.stop(engine.strategy_id)
    assert not outcome.squared_off  # nothing bought yet
    engine.clock.set(held.due)
    result = await asyncio.wait_for(held.execution, 5)

    assert result is not None
    assert (result.status, result.message) == (OrderStatus.SKIPPED, "strategy stopped before its buy time")
    assert engine.gateway.placements == []
    assert await engine.attempts(intent) == [(1, "withdrawn")]
    assert await engine.results() == [("BUY", "skipped")]
    # A redelivery finds the result and sends nothing either.
    assert await engine.executor.execute(intent) is None
    assert engine.gateway.placements == []


def grant_held_until_let(engine: Engine) -> tuple[asyncio.Event, asyncio.Event]:
    """The engine's broker grants wait for `go`; `waiting` is set when an order starts waiting for one."""
    limiter = engine.executor.placement.rate_limiter
    grant = limiter._granted
    waiting, go = asyncio.Event(), asyncio.Event()

    async def grant_when_let(user_id: int, priority: int, *args: Any) -> str:
        waiting.set()
        await go.wait()
        return await grant(user_id, priority, *args)

    limiter._granted = grant_when_let  # type: ignore[method-assign,assignment]
    return waiting, go


async def stopped_by_the_manager(engine: Engine) -> None:
    await engine.executor.manager.stop(engine.strategy_id)  # "buying": its EXIT would find nothing to sell


async def kill_switch_engaged_before_its_stop(engine: Engine) -> None:
    """The daily loss limit (or the trader's kill switch) is engaged; the strategy's own stop has not come yet
    (the trader's strategies are stopped one after another)."""
    manager = engine.executor.manager
    await manager.runtime.hold_buys(engine.user_id)
    async with engine.sessions() as session:
        today = manager.calendar.local(engine.clock.now()).date()
        await session.execute(update(User).where(User.id == engine.user_id).values(kill_switch_day=today))
        await session.commit()


@pytest.mark.parametrize("stop_it", [stopped_by_the_manager, kill_switch_engaged_before_its_stop],
                         ids=["stopped", "kill-switch"])  # fmt: skip
async def test_a_buy_whose_strategy_is_stopped_while_it_waits_for_the_rate_limit_is_never_sent(
    engine: Engine, stop_it: Callable[[Engine], Awaitable[None]]
) -> None:
    """Its checks pass, then it waits for a broker grant (a burst of the trader's orders ahead of it) while the
    daily loss limit stops the strategy: the BUY is withdrawn, not sent seconds after the stop."""
    waiting, go = grant_held_until_let(engine)
    intent = engine.intent(Action.BUY)  # due now
    execution = asyncio.create_task(engine.executor.execute(intent))
    await asyncio.wait_for(waiting.wait(), 5)
    await stop_it(engine)
    go.set()
    result = await asyncio.wait_for(execution, 5)

    assert result is not None
    assert (result.status, result.message) == (OrderStatus.SKIPPED, "strategy stopped before its BUY was sent")
    assert engine.gateway.placements == []
    assert await engine.results() == [("BUY", "skipped")]


async def test_two_workers_sending_one_buy_at_once_place_one_order(engine: Engine) -> None:
    """Multi-worker crash matrix: Redis restarted and the strategy's lock went with it, so a second worker ran the
    BUY the first was still sending. The first had logged its attempt before waiting for its rate-limit grant;
    the second gave that attempt the broker timeout, asked, found nothing (the first's call had not left yet)
    and sent; then the first sent too: two orders under one tag. Now the attempt row is written just before
    the call, and the attempt number is claimed once: the worker that loses the claim sends nothing."""
    first = engine.executor
    waiting, go = grant_held_until_let(engine)
    intent = engine.intent(Action.BUY)
    sending = asyncio.create_task(first.execute(intent))
    await asyncio.wait_for(waiting.wait(), 5)

    c = first.context
    second = Executor(c.settings, c.clock, c.sessions, c.redis, c.publisher, c.gateways, c.manager)
    result = await second._execute_locked(intent)  # its lock "taken" in a Redis that lost the first's
    assert result is not None and result.status is OrderStatus.FILLED
    go.set()
    with pytest.raises(IntegrityError):  # attempt 1 is the second's: the first sends nothing (its lane retries)
        await asyncio.wait_for(sending, 5)

    assert len(engine.gateway.placements) == 1
    assert await first.execute(intent) is None  # the retry finds it settled
    assert len(engine.gateway.placements) == 1


async def test_a_buy_whose_worker_died_while_holding_it_is_sent_once_at_its_time_by_the_next(engine: Engine) -> None:
    engine.executor.settings = engine.executor.settings.model_copy(update={"broker_timeout_seconds": 0.2})
    held = await held_buy(engine)
    intent, holding, due = held.intent, held.holding, held.due
    held.execution.cancel()  # its delivery ends while holding it (the worker stopped): attempt 1 logged, nothing sent
    with pytest.raises(asyncio.CancelledError):
        await held.execution

    holding.clear()
    redelivered = asyncio.create_task(engine.executor.execute(intent))
    await asyncio.wait_for(holding.wait(), 5)  # looked up (nothing there), logged again, held for its time
    assert engine.gateway.placements == []
    engine.clock.set(due)
    result = await asyncio.wait_for(redelivered, 5)
    assert result is not None and (result.status, result.attempts) == (OrderStatus.FILLED, 2)
    assert len(engine.gateway.placements) == 1
    assert engine.gateway.lookups == [intent.broker_tag]
    assert await engine.attempts(intent) == [(1, "sending"), (2, "placed")]


@sqlite_only
async def test_a_buy_falling_due_after_redis_lost_its_keys_asks_the_database_and_is_sent(engine: Engine) -> None:
    held = await held_buy(engine)

    await engine.redis.flushdb()  # Redis restarted empty; the strategy is still running in the database
    engine.clock.set(held.due)
    result = await asyncio.wait_for(held.execution, 5)
    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.placements) == 1


@sqlite_only
async def test_a_buy_waiting_for_its_time_holds_no_execution_slot(engine: Engine) -> None:
    gate = PriorityGate(1)
    engine.executor.gate = gate
    due = engine.clock.now() + timedelta(seconds=5)
    holding = holding_until_due(engine)

    async def in_a_lane() -> OrderResult | None:
        async with gate.slot(PRIORITY[Action.BUY]):
            return await engine.executor.execute(engine.intent(Action.BUY, due_at=due))

    execution = asyncio.create_task(in_a_lane())
    await asyncio.wait_for(holding.wait(), 5)
    async with asyncio.timeout(5), gate.slot(PRIORITY[Action.STOPLOSS]):
        pass  # the worker's only slot is free while the BUY waits for 10:30:05
    engine.clock.set(due)
    result = await asyncio.wait_for(execution, 5)
    assert result is not None and result.status is OrderStatus.FILLED


# ----------------------------------------------------------------------------------------- idempotence


async def test_a_redelivered_intent_that_completed_is_not_placed_again(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    assert await engine.executor.execute(intent) is not None
    sent = len(engine.publisher.sent)

    assert await engine.executor.execute(intent) is None
    assert await engine.executor.execute(intent) is None
    assert len(engine.gateway.placements) == 1
    assert engine.gateway.lookups == []
    # No second result or notification. The only repeat is the ARMED re-announcement (idempotent): a worker
    # that died between recording the fill and arming the stop must not leave the position unguarded.
    repeats = engine.publisher.sent[sent:]
    assert [(topic, getattr(event, "kind", None)) for topic, _, event in repeats] == [
        ("strategy-lifecycle", LifecycleKind.ARMED)
    ] * 2
    assert await engine.results() == [("BUY", "filled")]


async def test_a_crash_between_the_attempt_log_and_the_answer_adopts_the_brokers_order(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    # The previous worker logged attempt 1 and sent the order, then died before recording anything more.
    await engine.died_after_logging(intent)
    existing = engine.gateway.add_order(intent.broker_tag)

    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.broker_order_id, result.attempts) == (OrderStatus.FILLED, existing.order_id, 1)
    assert engine.gateway.placements == []  # adopted, not re-sent
    assert engine.gateway.lookups == [intent.broker_tag]
    assert len(engine.gateway.orders_tagged(intent.broker_tag)) == 1
    assert (await engine.runtime())["state"] == "bought"
    assert [e.kind for e in engine.publisher.lifecycle()] == [LifecycleKind.ARMED]


@sqlite_only
async def test_an_exit_first_adopts_a_buy_whose_outcome_was_never_recorded(engine: Engine) -> None:
    """Crash matrix seed 6: the BUY reached the broker but the worker died before recording it; the trader's
    square-off must not conclude "no position" and leave the shares at the broker."""
    buy = engine.intent(Action.BUY)
    await engine.died_after_logging(buy)
    bought = engine.gateway.add_order(buy.broker_tag)

    result = await engine.executor.execute(engine.intent(Action.EXIT))

    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.placements) == 1  # the SELL; the BUY was adopted, not re-sent
    async with engine.sessions() as session:
        rows = (
            await session.execute(select(OrderLog).where(OrderLog.kind == "result").order_by(OrderLog.id))
        ).scalars()
        assert [(r.action, r.status, r.broker_order_id) for r in rows][0] == ("BUY", "filled", bought.order_id)


async def test_a_buy_that_fills_after_the_trader_stopped_the_strategy_is_squared_off(engine: Engine) -> None:
    """Regression for crash-matrix seed 9: the STOP landed after the engine's last check that the strategy was
    running, while the BUY was on its way. The STOP saw no position and squared nothing off; the BUY then filled,
    and the shares stayed at the broker with nobody managing them."""
    outcomes = []

    async def trader_stops() -> None:
        # The STOP read the runtime before the engine marked it "buying": as far as it could see, flat.
        await engine.redis.hset(runtime_key(engine.strategy_id), "state", "idle")
        outcomes.append(await engine.executor.manager.stop(engine.strategy_id, square_off=True))

    engine.gateway.on_place = trader_stops
    result = await engine.executor.execute(engine.intent(Action.BUY))

    assert result is not None and result.status is OrderStatus.FILLED
    assert outcomes and not outcomes[0].squared_off  # the STOP saw no position: the BUY was still in flight
    exits = [e for _, _, e in engine.publisher.sent if isinstance(e, OrderIntent)]
    assert [(e.action, e.run) for e in exits] == [(Action.EXIT, 1)]
    assert not [e for e in engine.publisher.lifecycle() if e.kind is LifecycleKind.ARMED]  # no stop armed
    exit_result = await engine.executor.execute(exits[0])
    assert exit_result is not None and exit_result.status is OrderStatus.FILLED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]  # flat at the broker again


async def test_a_buy_recorded_just_before_a_crash_is_still_squared_off_when_the_strategy_was_stopped(
    engine: Engine,
) -> None:
    """Crash matrix seed 6: the trader's STOP saw no position (the BUY's outcome was unknown, its worker had
    died); the next worker adopted the filled BUY, recorded it, and died before squaring it off. The
    redelivered BUY found its result recorded and dropped itself as a duplicate: shares left at the broker."""
    buy = engine.intent(Action.BUY)
    await engine.executor.execute(buy)
    engine.publisher.sent.clear()
    # The trader stopped it meanwhile, seeing no position (the runtime still said "buying").
    await engine.redis.hset(runtime_key(engine.strategy_id), "state", "idle")
    async with engine.sessions() as session:
        await session.execute(
            update(Strategy).where(Strategy.id == engine.strategy_id).values(status=StrategyStatus.STOPPED.value)
        )
        await session.commit()

    assert await engine.executor.execute(buy) is None  # the redelivered copy: a duplicate

    exits = [e for _, _, e in engine.publisher.sent if isinstance(e, OrderIntent)]
    assert [(e.action, e.run) for e in exits] == [(Action.EXIT, 1)]
    exit_result = await engine.executor.execute(exits[0])
    assert exit_result is not None and exit_result.status is OrderStatus.FILLED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]
    assert await engine.executor.execute(buy) is None  # and once flat, a later copy sends nothing more
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL"]


async def test_a_stalled_broker_call_is_abandoned_at_the_deadline_and_the_retry_adopts_the_order(
    engine: Engine,
) -> None:
    """Found by the crash matrix (seed 3): one strategy's lane stopped making progress after a Kafka
    restart, and the STOPLOSS and SELLs queued behind it never ran. Whatever stalls, an intent is abandoned
    at the deadline (the lane retries it); the retry finds the order the stalled call placed, by tag."""
    engine.executor.settings = engine.executor.settings.model_copy(update={"execution_deadline_seconds": 1.0})
    engine.gateway.script = ["placed-then-stalled"]
    buy = engine.intent(Action.BUY)

    with pytest.raises(ExecutionStalled):
        await engine.executor.execute(buy)
    engine.clock.advance(engine.executor.settings.broker_timeout_seconds)  # its request has had time to land
    result = await engine.executor.execute(buy)

    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.placements) == 1
    assert len(engine.gateway.orders_tagged(buy.broker_tag)) == 1


async def test_a_sell_first_adopts_a_stoploss_whose_outcome_was_never_recorded(engine: Engine) -> None:
    """Regression for crash-matrix seed 16: the worker died while its STOPLOSS was at the broker; the SELL
    then fell due, saw the position still open in the order log, and sold a second time."""
    await buy_filled(engine)
    stoploss = engine.intent(Action.STOPLOSS)
    await engine.died_after_logging(stoploss)
    sold = engine.gateway.add_order(stoploss.broker_tag)  # the broker executed it; nobody recorded that
    placements_before = len(engine.gateway.placements)

    result = await engine.executor.execute(engine.intent(Action.SELL))

    assert len(engine.gateway.placements) == placements_before  # no second exit
    assert result is not None and result.status is OrderStatus.SKIPPED
    assert ("STOPLOSS", "filled") in await engine.results()
    [row] = [r for r in await engine.log_rows(OrderLogKind.RESULT) if r.action == "STOPLOSS"]
    assert row.broker_order_id == sold.order_id


async def test_an_order_sent_just_before_its_worker_died_is_given_time_to_reach_the_broker(engine: Engine) -> None:
    """The successor of a worker killed mid-order takes its lock over within seconds (crash matrix seed 6), so
    the dead worker's request may still be on its way: asked at once, the broker knows nothing of it and the
    order would be placed a second time. The engine waits until the attempt is as old as the broker timeout."""
    engine.executor.settings = engine.executor.settings.model_copy(update={"broker_timeout_seconds": 0.5})
    stoploss = engine.intent(Action.STOPLOSS)
    await buy_filled(engine)
    await engine.died_after_logging(stoploss, seconds_ago=0.0)
    asyncio.get_running_loop().call_later(0.3, engine.gateway.add_order, stoploss.broker_tag)  # it lands late
    placements_before = len(engine.gateway.placements)

    result = await engine.executor.execute(stoploss)

    assert result is not None and (result.status, result.attempts) == (OrderStatus.FILLED, 1)
    assert len(engine.gateway.placements) == placements_before  # adopted, not sent again
    assert len(engine.gateway.orders_tagged(stoploss.broker_tag)) == 1


@sqlite_only
async def test_a_crash_before_the_order_reached_the_broker_places_it_as_the_next_attempt(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    await engine.died_after_logging(intent)

    result = await engine.executor.execute(intent)

    assert result is not None and (result.status, result.attempts) == (OrderStatus.FILLED, 2)
    assert engine.gateway.lookups == [intent.broker_tag]  # looked first, found nothing, then sent
    assert len(engine.gateway.placements) == 1
    assert await engine.attempts(intent) == [(1, "sending"), (2, "placed")]


@sqlite_only
async def test_an_order_placed_but_answered_with_an_error_is_found_by_its_tag(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = ["placed-but-lost"]
    result = await engine.executor.execute(intent)
    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.placements) == 1
    assert len(engine.gateway.orders_tagged(intent.broker_tag)) == 1
    assert result.broker_order_id == engine.gateway.orders_tagged(intent.broker_tag)[0].order_id
    assert await engine.attempts(intent) == [(1, "unclear")]
    # The result carries the path its order took: sent, no answer, found by its tag filled.
    assert [(t.before, t.event, t.after) for t in result.transitions] == [
        ("intended", "send", "sending"),
        ("sending", "timed_out", "unknown"),
        ("unknown", "filled", "filled"),
    ]


@sqlite_only
async def test_a_send_dropped_in_transit_is_given_the_broker_timeout_to_arrive_before_it_is_asked_about(
    db_engine: AsyncEngine, redis: Redis
) -> None:
    """An egress proxy killed mid-request answers at once, but the request still reaches the broker a moment
    later: asked at once, the broker knows nothing yet and the order would be placed twice."""
    engine = await make_engine(db_engine, redis, broker_timeout_seconds=0.5)
    intent = engine.intent(Action.STOPLOSS)
    await engine.executor.execute(engine.intent(Action.BUY))
    engine.gateway.script = ["arrives-after-egress-dropped"]
    result = await engine.executor.execute(intent)
    assert result is not None and result.status is OrderStatus.FILLED
    assert len(engine.gateway.orders_tagged(intent.broker_tag)) == 1  # found by its tag, not sent again
    assert len([p for p in engine.gateway.placements if p["tag"] == intent.broker_tag]) == 1


# ------------------------------------------------------------------------------------------- failures


async def test_three_transient_failures_then_success_make_four_attempts_and_one_order(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = [BrokerUnavailable("503 Service Unavailable", http_status=503) for _ in range(3)]
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts) == (OrderStatus.FILLED, 4)
    assert len(engine.gateway.placements) == 4
    assert len(engine.gateway.orders) == 1
    assert engine.gateway.lookups == [intent.broker_tag] * 3  # looked up before every re-send
    assert await engine.attempts(intent) == [(1, "unclear"), (2, "unclear"), (3, "unclear"), (4, "placed")]
    assert await engine.results() == [("BUY", "filled")]
    assert (await engine.strategy()).status == "running"


async def test_a_call_that_cannot_start_in_its_attempts_window_is_not_made_and_is_sent_again(engine: Engine) -> None:
    """An attempt row tells a process that takes the strategy over (its lock lost with Redis) that the order left
    within SEND_WINDOW of the broker timeout after the row's date; that process waits out the whole timeout, asks
    the broker and, hearing of nothing, sends. A call that could not start in time (a busy event loop, a full
    thread pool) is therefore never made: its attempt says so and a new attempt, with a new window, sends it."""
    intent = engine.intent(Action.BUY)
    engine.gateway.script = ["starts-late"]
    before = time.monotonic()

    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts) == (OrderStatus.FILLED, 2)
    assert len(engine.gateway.orders) == 1
    assert engine.gateway.lookups == []  # nothing was sent: nothing to ask about
    assert await engine.attempts(intent) == [(1, "unsent"), (2, "placed")]
    window = engine.executor.settings.broker_timeout_seconds * SEND_WINDOW
    (leave_by,) = engine.gateway.leave_by
    assert leave_by is not None and before < leave_by <= time.monotonic() + window


async def test_a_stop_whose_call_was_late_writes_its_next_row_only_with_its_grant_in_hand(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop's row is written while its grant is still expected, so that the call leaves as the grant comes; a grant
    that came after the row's window made the call late, and a grant late again each time kept the stop from ever
    leaving. Once late, the stop's next row waits for the grant itself."""
    intent = engine.intent(Action.STOPLOSS)
    await buy_filled(engine)
    limiter = engine.executor.placement.rate_limiter
    asked: list[bool] = []
    permit = limiter.permit

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("ready") is not None)
        return permit(*args, **kwargs)

    monkeypatch.setattr(limiter, "permit", recording)
    engine.gateway.script = ["starts-late"]

    result = await engine.executor.execute(intent)

    assert result is not None and result.status is OrderStatus.FILLED
    assert await engine.attempts(intent) == [(1, "unsent"), (2, "placed")]
    assert asked == [True, False]  # the row ahead of the grant, then with it


async def test_calls_that_placed_nothing_do_not_use_up_an_orders_tries(engine: Engine) -> None:
    """A 429, or a call that could not start in its window, is not a failed order: three retries are still left for
    the broker's failures (crash matrix: an EXIT given up after two unsent calls and two timeouts)."""
    intent = engine.intent(Action.STOPLOSS)
    await buy_filled(engine)
    timeout = BrokerUnavailable("broker did not answer in time")
    engine.gateway.script = ["starts-late", BrokerThrottled("429 Too many requests", http_status=429),
                             "starts-late", timeout, timeout, timeout]  # fmt: skip
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts) == (OrderStatus.FILLED, 7)
    assert len(engine.gateway.orders_tagged(intent.broker_tag)) == 1
    words = [word for _, word in await engine.attempts(intent)]
    assert words == ["unsent", "throttled", "unsent", "unclear", "unclear", "unclear", "placed"]


async def test_four_transient_failures_fail_the_order_and_stop_the_strategy(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    # 429s placed nothing: the first NOT_SENT_TRIES of them are not among the order's tries, the next four are.
    tries = NOT_SENT_TRIES + 4
    engine.gateway.script = [BrokerThrottled("429 Too many requests", http_status=429) for _ in range(tries)]
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts) == (OrderStatus.FAILED, tries)
    assert len(engine.gateway.placements) == tries  # no more
    assert engine.gateway.orders == {}
    # A 429 is answered before the order is read: nothing to look up before sending again.
    assert await engine.attempts(intent) == [(n, "throttled") for n in range(1, tries + 1)]
    assert engine.gateway.lookups == []
    assert await engine.results() == [("BUY", "failed")]

    strategy = await engine.strategy()
    assert strategy.status == "failed"
    assert "order failed" in (strategy.status_reason or "")
    assert await status_history(engine) == [("failed", strategy.status_reason)]
    assert [e.kind for e in engine.publisher.lifecycle()] == [LifecycleKind.FAILED]  # cancels the timers
    assert [(n.kind, n.title) for n in engine.publisher.notifications()] == [
        (NotificationKind.ORDER_FAILED, FAILED_TITLE)
    ]
    [(kind, title, message)] = await engine.notifications()
    assert (kind, title) == ("order_failed", FAILED_TITLE)
    assert message.startswith("BUY: ")
    assert await engine.runtime() == {}  # the auto-stop unloaded the runtime keys
    assert not await engine.redis.sismember(symbol_key("NSE:INFY"), str(engine.strategy_id))
    # Redelivery of the failed intent changes nothing.
    assert await engine.executor.execute(intent) is None
    assert len(engine.gateway.placements) == tries
    # Ending a run the strategy is no longer running changes nothing either, in the strategy or its history.
    ledger = engine.executor.ledger
    await engine.executor.context.journal.write(*ledger.end_rows(strategy, StrategyStatus.COMPLETED, "late"))
    assert (await engine.strategy()).status == "failed"
    assert await status_history(engine) == [("failed", strategy.status_reason)]


async def status_history(engine: Engine) -> list[tuple[str, str | None]]:
    async with engine.sessions() as session:
        rows = await session.execute(
            select(StrategyStatusChange.status, StrategyStatusChange.reason)
            .where(StrategyStatusChange.strategy_id == engine.strategy_id)
            .order_by(StrategyStatusChange.id)
        )
        return [(status, reason) for status, reason in rows.all()]


def exits_requested(engine: Engine) -> list[OrderIntent]:
    return [e for _, _, e in engine.publisher.sent if isinstance(e, OrderIntent) and e.action is Action.EXIT]


async def test_a_sell_that_fails_its_retries_stops_the_strategy_and_squares_off_the_position(engine: Engine) -> None:
    # Crash matrix seed 9: a SELL met a timeout, a 429 and a 5xx in a row; the auto-stop left the shares held.
    await buy_filled(engine)
    sell = engine.intent(Action.SELL)
    engine.gateway.script = [BrokerUnavailable("503", http_status=503) for _ in range(4)]

    result = await engine.executor.execute(sell)

    assert result is not None and result.status is OrderStatus.FAILED
    assert (await engine.strategy()).status == "failed"
    assert [(n.kind, n.title) for n in engine.publisher.notifications()] == [
        (NotificationKind.ORDER_FAILED, FAILED_TITLE)
    ]
    [square_off] = exits_requested(engine)  # the auto-stop is a STOP: an open position is squared off
    exited = await engine.executor.execute(square_off)

    assert exited is not None and exited.status is OrderStatus.FILLED
    assert [p["side"] for p in engine.gateway.placements] == ["BUY", "SELL", "SELL", "SELL", "SELL", "SELL"]
    assert sell.broker_tag in engine.gateway.lookups  # the given-up SELL was asked about before selling again
    assert await engine.results() == [("BUY", "filled"), ("SELL", "failed"), ("EXIT", "filled")]


async def test_a_square_off_adopts_a_given_up_sell_that_reached_the_broker_after_all(engine: Engine) -> None:
    await buy_filled(engine)
    sell = engine.intent(Action.SELL)
    engine.gateway.script = [BrokerUnavailable("broker did not answer in time") for _ in range(4)]
    await engine.executor.execute(sell)
    [square_off] = exits_requested(engine)
    late = engine.gateway.add_order(sell.broker_tag)  # one of the unanswered SELLs did become an order

    assert await engine.executor.execute(square_off) is not None

    assert len(engine.gateway.placements) == 5  # the BUY and the four SELL attempts: no second sale
    assert await engine.results() == [("BUY", "filled"), ("SELL", "filled"), ("EXIT", "skipped")]
    [sell_result] = [r for r in await engine.log_rows(OrderLogKind.RESULT) if r.action == "SELL"]
    assert (sell_result.broker_order_id, sell_result.price) == (late.order_id, Decimal("1500.00"))
    assert [(r.action, r.status) for r in engine.publisher.results()][-2:] == [
        (Action.SELL, OrderStatus.FILLED),
        (Action.EXIT, OrderStatus.SKIPPED),
    ]


async def test_an_exit_refused_by_the_broker_stops_the_strategy_without_a_square_off(engine: Engine) -> None:
    await buy_filled(engine)
    engine.gateway.script = [BrokerRejected("RMS: blocked for trading", http_status=400)]

    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))

    assert result is not None and result.status is OrderStatus.REJECTED
    assert (await engine.strategy()).status == "failed"
    assert exits_requested(engine) == []  # the broker said no: the trader is told, and decides


async def test_an_order_accepted_on_the_last_attempt_is_not_declared_failed(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = [*(BrokerUnavailable("503", http_status=503) for _ in range(3)), "placed-but-lost"]
    result = await engine.executor.execute(intent)
    [order] = engine.gateway.orders_tagged(intent.broker_tag)
    assert result is not None
    assert (result.status, result.broker_order_id) == (OrderStatus.FILLED, order.order_id)


@sqlite_only
async def test_a_rejection_is_not_retried(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = [BrokerRejected("Insufficient funds. Required margin is 7500.00", http_status=400)]
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.attempts) == (OrderStatus.REJECTED, 1)
    assert "Insufficient funds" in (result.message or "")
    assert len(engine.gateway.placements) == 1
    assert engine.gateway.lookups == []
    assert await engine.attempts(intent) == [(1, "refused")]
    assert (await engine.strategy()).status == "failed"
    assert [e.kind for e in engine.publisher.lifecycle()] == [LifecycleKind.FAILED]
    assert [n.title for n in engine.publisher.notifications()] == [FAILED_TITLE]


@sqlite_only
async def test_an_order_the_exchange_rejects_after_placement_is_not_retried(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = ["rejected"]
    result = await engine.executor.execute(intent)
    assert result is not None
    assert result.status is OrderStatus.REJECTED
    assert result.message == "RMS: margin exceeds limit"
    assert len(engine.gateway.placements) == 1
    assert (await engine.strategy()).status == "failed"


@sqlite_only
async def test_an_expired_token_fails_at_once_and_asks_for_a_reconnect(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    engine.gateway.script = [BrokerTokenExpired("Incorrect `api_key` or `access_token`.", http_status=403)]
    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.message) == (OrderStatus.FAILED, "broker session expired, reconnect")
    assert len(engine.gateway.placements) == 1  # no retry
    assert (await engine.strategy()).status == "failed"
    [note] = engine.publisher.notifications()
    assert (note.kind, note.title) == (NotificationKind.BROKER_SESSION_EXPIRED, FAILED_TITLE)
    assert "broker session expired, reconnect" in note.message


@sqlite_only
async def test_a_refusal_for_an_expired_session_settled_by_a_redelivery_still_asks_for_a_reconnect(
    engine: Engine,
) -> None:
    """The worker died between the refusal's attempt row and the result row: the redelivery settles the refused
    order without a broker call, and must still tell the trader to reconnect, not "refused by the broker"."""
    intent = engine.intent(Action.BUY)
    engine.gateway.script = [BrokerTokenExpired("Incorrect `api_key` or `access_token`.", http_status=403)]
    fail = engine.executor.outcomes.fail

    async def killed(*args: object, **kwargs: object) -> None:
        raise asyncio.CancelledError  # the worker is gone before it records the outcome

    engine.executor.outcomes.fail = killed  # type: ignore[assignment,method-assign]
    with pytest.raises(asyncio.CancelledError):
        await engine.executor.execute(intent)
    assert await engine.attempts(intent) == [(1, "expired")]
    engine.executor.outcomes.fail = fail  # type: ignore[method-assign]

    result = await engine.executor.execute(intent)

    assert result is not None
    assert (result.status, result.message) == (OrderStatus.FAILED, "broker session expired, reconnect")
    assert len(engine.gateway.placements) == 1  # the redelivery sent nothing
    [note] = engine.publisher.notifications()
    assert note.kind is NotificationKind.BROKER_SESSION_EXPIRED


# ------------------------------------------------------------------------------------ state machine


@sqlite_only
class WatchedGate(PriorityGate):
    """Records the priority of every checkpoint at which an intent steps aside for higher-priority work."""

    def __init__(self) -> None:
        super().__init__(10)
        self.checkpoints: list[int] = []
        self.reached = asyncio.Event()

    async def yield_to_higher(self, priority: int, at_most: float) -> None:
        self.checkpoints.append(effective(priority)[0])
        self.reached.set()
        await super().yield_to_higher(priority, at_most)


async def test_a_buy_steps_aside_before_its_decision_and_its_broker_call_while_a_stoploss_runs(
    engine: Engine,
) -> None:
    gate = engine.executor.gate = WatchedGate()
    stoploss_slot = gate.slot(PRIORITY[Action.STOPLOSS])
    await stoploss_slot.__aenter__()  # another strategy's STOPLOSS is being executed
    buy = asyncio.create_task(engine.executor.execute(engine.intent(Action.BUY)))
    await asyncio.wait_for(gate.reached.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not buy.done() and engine.gateway.placements == []  # held at its first checkpoint
    await stoploss_slot.__aexit__(None, None, None)
    result = await asyncio.wait_for(buy, 10)
    assert result is not None and result.status is OrderStatus.FILLED
    assert gate.checkpoints == [PRIORITY[Action.BUY]] * 2  # once its reads are done, before the broker call


async def test_a_buy_held_until_due_steps_aside_only_as_long_as_its_attempt_row_allows(engine: Engine) -> None:
    """Its row is dated at its due instant and promises the call within half the broker timeout of it: stepping
    aside for a running STOPLOSS for the usual 2 s would break that promise (and the call would not be made)."""
    engine.executor.settings = engine.executor.settings.model_copy(update={"broker_timeout_seconds": 0.6})
    held = await held_buy(engine, seconds_ahead=0.01)
    gate = engine.executor.gate = WatchedGate()
    stoploss_slot = gate.slot(PRIORITY[Action.STOPLOSS])
    await stoploss_slot.__aenter__()  # another strategy's STOPLOSS is being executed, and stays so
    try:
        engine.clock.set(held.due)
        result = await asyncio.wait_for(held.execution, 1.0)
    finally:
        await stoploss_slot.__aexit__(None, None, None)
    assert result is not None and result.status is OrderStatus.FILLED
    assert gate.checkpoints == [PRIORITY[Action.BUY]]  # it did step aside, briefly
    assert await engine.attempts(held.intent) == [(1, "placed")]  # its first call, in its window


async def sent_before_and_found_with_every_turn_taken(engine: Engine, intent: OrderIntent) -> OrderResult | None:
    """`intent`'s attempt was logged by a worker that died, the broker holds its order, and every turn of its
    trader is held by others meanwhile: execute it. Returns its result and checks it settled the broker's order."""
    await engine.died_after_logging(intent)
    existing = engine.gateway.add_order(intent.broker_tag)
    pace = engine.executor.pace
    held = [await pace.turn(intent.user_id, PRIORITY[intent.action]) for _ in range(pace.per_user)]  # all taken
    try:
        # A lookup sends nothing: it does not wait for the orders that hold the trader's turns.
        result = await asyncio.wait_for(engine.executor.execute(intent), 10)
    finally:
        for give_back in held:
            give_back()
    assert result is not None and (result.status, result.broker_order_id) == (OrderStatus.FILLED, existing.order_id)
    return result


async def test_a_buy_an_earlier_delivery_sent_is_looked_up_without_a_turn_of_its_user(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    await sent_before_and_found_with_every_turn_taken(engine, intent)
    assert engine.gateway.placements == [] and engine.gateway.lookups == [intent.broker_tag]


async def test_a_stop_an_earlier_delivery_sent_is_looked_up_without_a_turn_of_its_user(engine: Engine) -> None:
    """After a restart a trader's redelivered stops asked the broker about their unanswered attempts holding the
    trader's turns, 5 s each with its order-book reads failing, and its newly crossed stops waited 7.6 s."""
    await buy_filled(engine)
    await sent_before_and_found_with_every_turn_taken(engine, engine.intent(Action.STOPLOSS))
    assert [p["tag"] for p in engine.gateway.placements] == [engine.intent(Action.BUY).broker_tag]  # no SELL sent


async def test_a_buy_an_earlier_delivery_sent_is_looked_up_with_the_stoploss_exits(engine: Engine) -> None:
    intent = engine.intent(Action.BUY)
    await engine.died_after_logging(intent)
    existing = engine.gateway.add_order(intent.broker_tag)
    gate = engine.executor.gate = WatchedGate()
    sell_slot = gate.slot(PRIORITY[Action.SELL])
    await sell_slot.__aenter__()  # another strategy's SELL is being executed, as after a restart
    try:
        with inherited(Urgency(PRIORITY[Action.BUY])):  # as its lane runs it
            result = await asyncio.wait_for(engine.executor.execute(intent), 10)
    finally:
        await sell_slot.__aexit__(None, None, None)
    # Whether the position is open is unknown until the broker is asked: that goes with the STOPLOSS exits.
    assert result is not None and (result.status, result.broker_order_id) == (OrderStatus.FILLED, existing.order_id)
    assert gate.checkpoints and set(gate.checkpoints) == {RECONCILE_PRIORITY}
    assert RECONCILE_PRIORITY == PRIORITY[Action.STOPLOSS]
    assert engine.gateway.placements == []


async def test_a_sell_with_no_open_position_is_skipped(engine: Engine) -> None:
    result = await engine.executor.execute(engine.intent(Action.SELL))
    assert result is not None
    assert result.status is OrderStatus.SKIPPED
    assert result.message == "no open position to exit"
    assert engine.gateway.placements == []
    assert await engine.results() == [("SELL", "skipped")]
    assert engine.publisher.lifecycle() == []
    assert (await engine.strategy()).status == "running"


@sqlite_only
async def test_a_second_buy_in_the_same_run_is_skipped(engine: Engine) -> None:
    await buy_filled(engine)
    again = engine.intent(Action.BUY).model_copy(update={"intent_id": "different-id-same-decision"})
    result = await engine.executor.execute(again)
    assert result is not None and result.status is OrderStatus.SKIPPED
    assert len(engine.gateway.placements) == 1


@sqlite_only
async def test_an_intent_of_an_older_run_is_skipped(engine: Engine) -> None:
    result = await engine.executor.execute(engine.intent(Action.BUY, run=0))
    assert result is not None and result.status is OrderStatus.SKIPPED
    assert "run 0" in (result.message or "")
    assert engine.gateway.placements == []


@sqlite_only
async def test_a_buy_past_its_grace_is_skipped_but_a_late_sell_still_goes(engine: Engine) -> None:
    on_time = engine.intent(Action.BUY, due_at=engine.clock.now() - timedelta(seconds=60))
    result = await engine.executor.execute(on_time)
    assert result is not None and result.status is OrderStatus.FILLED  # exactly at the grace: still bought

    engine.clock.advance(4 * 3600)  # the SELL comes very late (worker down): it must still exit
    sell = engine.intent(Action.SELL, due_at=engine.clock.now() - timedelta(hours=1))
    result = await engine.executor.execute(sell)
    assert result is not None and result.status is OrderStatus.FILLED


@sqlite_only
async def test_a_buy_missed_by_more_than_the_grace_is_skipped_and_the_trader_told(engine: Engine) -> None:
    late = engine.intent(Action.BUY, due_at=engine.clock.now() - timedelta(seconds=61))
    result = await engine.executor.execute(late)
    assert result is not None
    assert result.status is OrderStatus.SKIPPED
    assert (result.message or "").startswith("BUY time missed")
    assert engine.gateway.placements == []
    assert [n.kind for n in engine.publisher.notifications()] == [NotificationKind.BUY_SKIPPED]


async def test_a_missed_buy_an_earlier_delivery_sent_is_skipped_under_a_claimed_attempt_no_one_can_send(
    engine: Engine,
) -> None:
    late = engine.intent(Action.BUY, due_at=engine.clock.now() - timedelta(seconds=61))
    await engine.died_after_logging(late)  # attempt 1 sent by a worker that died; the broker never got it
    result = await engine.executor.execute(late)
    assert result is not None and result.status is OrderStatus.SKIPPED
    assert engine.gateway.placements == []
    assert await engine.attempts(late) == [(1, "sending"), (2, "withdrawn")]
    # A process still holding this BUY (its lock gone with a Redis restart) cannot claim attempt 2 to send it.
    straggler = TrackedOrder(late.intent_id, Action.BUY, late.broker_tag, attempts=1, state=OrderState.INTENDED)
    with pytest.raises(IntegrityError):
        await engine.executor.ledger.sent(late, straggler)


@sqlite_only
async def test_an_intent_for_an_unknown_strategy_is_dropped(engine: Engine) -> None:
    ghost = engine.intent(Action.BUY).model_copy(update={"strategy_id": engine.strategy_id + 1000})
    assert await engine.executor.execute(ghost) is None
    assert engine.gateway.placements == []


@sqlite_only
async def test_timestamps_are_the_engines_clock(engine: Engine) -> None:
    engine.clock.set(datetime(2025, 1, 15, 5, 0, 7, tzinfo=UTC))
    result = await engine.executor.execute(engine.intent(Action.BUY))
    assert result is not None
    assert result.occurred_at == engine.clock.now()
    assert (await engine.runtime())["entry_at"] == engine.clock.now().isoformat()


@sqlite_only
async def test_a_buy_the_days_order_budget_has_no_room_for_is_skipped_with_a_notice(
    db_engine: AsyncEngine, redis: Redis
) -> None:
    engine = await make_engine(db_engine, redis, broker_orders_per_day=2, broker_exit_reserve=2)
    result = await engine.executor.execute(engine.intent(Action.BUY))
    assert result is not None and result.status is OrderStatus.SKIPPED and "budget" in (result.message or "")
    assert engine.gateway.placements == []
    assert [n.kind for n in engine.publisher.notifications()] == [NotificationKind.BUY_SKIPPED]
    assert (await engine.strategy()).status == StrategyStatus.STOPPED.value


async def test_a_time_event_due_outside_market_hours_is_not_placed_and_the_trader_told(engine: Engine) -> None:
    await buy_filled(engine)
    engine.clock.set(datetime(2025, 1, 15, 15, 45, tzinfo=IST))  # after the close
    result = await engine.executor.execute(engine.intent(Action.SELL))
    assert result is not None and result.status is OrderStatus.SKIPPED and "market closed" in (result.message or "")
    assert [p["side"] for p in engine.gateway.placements] == ["BUY"]
    assert [n.kind for n in engine.publisher.notifications()] == [NotificationKind.MARKET_CLOSED]

"""The protective SL-M following a risen stop, in the execution engine against the Kite simulator (real database
and Redis, the official client): a modification whose answer is lost, the budget, coalescing, and the exit's
release of whichever SL-M is on the book. Judged by the simulator's book and audit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.kite_sim import RunningSimulator
from schemas.events import Action, OrderIntent, OrderStatus, broker_tag_for, intent_id_for, raise_stop_id_for
from storage.models import Strategy
from tests.fixtures.simulator import SimAccount
from tests.streams.execution.engine_bench import DAY, Engine, sqlite_only
from tests.streams.execution.test_resting import audit, bought, engine_on_simulator


def raise_to(engine: Engine, level: float) -> OrderIntent:
    intent = engine.intent(Action.RAISE_STOP)
    return intent.model_copy(
        update={"intent_id": raise_stop_id_for(engine.strategy_id, DAY, 1, level), "exit_level": level}
    )


def stops(simulator: RunningSimulator, account: SimAccount) -> list[Any]:
    orders = simulator.state.find_orders(account.api_key)
    return sorted((o for o in orders if o.order_type == "SL-M"), key=lambda o: o.order_id)


@sqlite_only
async def test_a_lost_answer_the_budget_and_coalesced_steps_then_one_exit(
    db_engine: AsyncEngine, redis: Redis, simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    engine = await engine_on_simulator(db_engine, redis, simulator, account)
    engine.executor.settings = engine.executor.settings.model_copy(update={"protective_stop_modifications": 1})
    async with engine.sessions() as session:
        strategy = await session.get(Strategy, engine.strategy_id)
        assert strategy is not None
        strategy.protective_stop = True
        await session.commit()
    await bought(engine, simulator)  # at 1,500: the SL-M rests at the stop, 1,400.05
    [first] = stops(simulator, account)
    assert (first.status, first.trigger_price) == ("TRIGGER PENDING", 140005)

    # The modification reaches the broker, its answer does not: left MODIFYING, never sent again blindly.
    simulator.state.inject_fault("error", api_key=account.api_key, count=1, process=True)
    assert await engine.executor.execute(raise_to(engine, 1410.0)) is None
    assert first.trigger_price == 141000
    protect_id = intent_id_for(engine.strategy_id, DAY, 1, Action.PROTECT)
    assert (await engine.attempts(engine.intent(Action.PROTECT)))[-1] == (2, "modifying")

    # The next step asks the broker (it holds 1,410), and with the budget (1) spent cancels and places anew.
    await engine.executor.execute(raise_to(engine, 1420.0))
    first_after, second = stops(simulator, account)
    assert (first_after.status, second.status, second.trigger_price) == ("CANCELLED", "TRIGGER PENDING", 142000)
    assert second.tag == broker_tag_for(protect_id, 2)
    records = simulator.state.audit_records(api_key=account.api_key)
    cancel_at = next(r.seq for r in records if r.action == "cancel")
    assert cancel_at < next(r.seq for r in records if r.action == "place" and r.order_id == second.order_id)

    # Steps that came while one was on its way: one modification, to the latest; the later step sends nothing.
    modifies = len(audit(simulator, account, "modify"))
    for level in (1430.0, 1440.0):
        engine.executor.follower.note(raise_to(engine, level))
    await engine.executor.execute(raise_to(engine, 1430.0))
    await engine.executor.execute(raise_to(engine, 1440.0))
    assert len(audit(simulator, account, "modify")) == modifies + 1 and second.trigger_price == 144000

    # The exit takes the live SL-M off the book first: one SELL, position flat.
    simulator.state.set_price("NSE:INFY", 1445.0)
    result = await engine.executor.execute(engine.intent(Action.STOPLOSS))
    assert result is not None and result.status is OrderStatus.FILLED
    assert [o.status for o in stops(simulator, account)] == ["CANCELLED", "CANCELLED"]
    sold = [o for o in simulator.state.find_orders(account.api_key) if o.transaction_type == "SELL"]
    assert [(o.order_type, o.status) for o in sold if o.status == "COMPLETE"] == [("MARKET", "COMPLETE")]
    assert simulator.state.accounts[account.api_key].positions[("NSE", "INFY", "MIS")].quantity == 0
    # And a step after the exit finds nothing to follow.
    await engine.executor.execute(raise_to(engine, 1450.0))
    assert len(audit(simulator, account, "modify")) == modifies + 1

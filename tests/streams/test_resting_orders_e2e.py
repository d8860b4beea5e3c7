"""Orders the broker leaves resting (Kite's market protection, April 2026): an exit is chased until it fills,
exactly once per position; a BUY is cancelled and its run stopped. Judged by the simulator's audit and book.

The simulator's `fast_move_slippage` makes a market order sweep the book as far again as the last price step
moved: a crash through the stop then leaves the protected STOPLOSS exit resting OPEN beyond its band.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.clock import ScaledClock
from core.settings import Settings
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import bought_strategy, clock_time, eventually, start

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

BUDGET = 2


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"exit_chase_modifications": BUDGET, "buy_rest_seconds": 3.0})


async def trade(simulator: Any, pipeline: Pipeline, clock: ScaledClock, instrument: str, price: float) -> None:
    """The price moves at the simulator and its tick reaches the pipeline (as the tick connector publishes it)."""
    simulator.state.set_price(instrument, price)
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()
    try:
        tick = {"instrument": instrument, "token": 0, "last_price": price, "volume": 1,
                "received_at": clock.now().isoformat()}  # fmt: skip
        await producer.send_and_wait(pipeline.settings.topic("ticks"), orjson.dumps(tick), key=instrument.encode())
    finally:
        await producer.stop()


def sells(simulator: Any, api_key: str) -> list[Any]:
    return [o for o in simulator.state.find_orders(api_key) if o.transaction_type == "SELL"]


def net_quantity(simulator: Any, api_key: str) -> int:
    account = simulator.state.accounts[api_key]
    return sum(position.quantity for position in account.positions.values())


async def test_a_resting_stoploss_exit_is_repriced_until_it_fills_once(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    state = simulator.state
    user, sid = await bought_strategy(client, make_user, make_strategy, simulator, pipeline, pinned_clock,
                                      symbol="NSE:TCS", price=3400.0, stop=3300.0)  # fmt: skip
    state.config.fast_move_slippage = True  # once bought: the BUY's own price step must not sweep it
    api_key = user.broker.api_key
    # A crash through the stop: the exit sweeps to 3000, below its band.
    await trade(simulator, pipeline, pinned_clock, "NSE:TCS", 3200.0)

    def resting() -> Any:
        return [o for o in sells(simulator, api_key) if o.status == "OPEN"]

    await eventually(resting, 15, "the protected STOPLOSS resting at the broker", pipeline)
    filled = await eventually(
        lambda: [o for o in sells(simulator, api_key) if o.status == "COMPLETE"], 30, "the exit filled", pipeline
    )
    records = state.audit_records(api_key=api_key)
    modifications = [r for r in records if r.action == "modify" and r.outcome == "modified"]
    assert len(filled) == 1 and filled[0].average_price == 320000  # re-priced at the price now, 3200.00
    assert 1 <= len(modifications) <= BUDGET
    assert [r.params["transaction_type"] for r in records if r.action == "place"] == ["BUY", "SELL"]
    assert all(r.http_status != 429 for r in records)
    assert net_quantity(simulator, api_key) == 0

    async def stopped_out() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return bool(status.get("last_action") == "STOPLOSS" and status.get("position") != "bought")

    await eventually(stopped_out, 15, "the status shows the STOPLOSS exit", pipeline)


async def test_past_its_budget_a_resting_exit_is_cancelled_and_placed_anew(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    state = simulator.state
    user, _ = await bought_strategy(client, make_user, make_strategy, simulator, pipeline, pinned_clock,
                                    symbol="NSE:WIPRO", price=300.0, stop=290.0)  # fmt: skip
    state.config.fast_move_slippage = True
    state.config.max_modifications = 0  # every modification refused: the chase must cancel and replace
    api_key = user.broker.api_key
    await trade(simulator, pipeline, pinned_clock, "NSE:WIPRO", 280.0)

    def cancelled() -> Any:
        return [r for r in state.audit_records(api_key=api_key) if r.action == "cancel" and r.outcome == "cancelled"]

    await eventually(cancelled, 30, "the resting exit cancelled", pipeline)
    await eventually(lambda: len(sells(simulator, api_key)) >= 2, 15, "the exit placed anew", pipeline)
    await trade(simulator, pipeline, pinned_clock, "NSE:WIPRO", 279.5)  # a small step: the new order's band now holds
    await eventually(
        lambda: any(o.status == "COMPLETE" for o in sells(simulator, api_key)), 30, "the exit filled", pipeline
    )
    orders = sells(simulator, api_key)
    assert [o.status for o in orders].count("COMPLETE") == 1
    assert len({o.tag for o in orders}) == len(orders)  # each order of the exit carries its own tag
    assert all(o.status in ("CANCELLED", "COMPLETE") for o in orders)  # nothing left resting
    assert net_quantity(simulator, api_key) == 0


async def test_a_resting_buy_is_cancelled_and_the_run_stopped(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    state = simulator.state
    state.config.fast_move_slippage = True
    state.set_price("NSE:ITC", 400.0)
    state.set_price("NSE:ITC", 440.0)  # a jump up: a BUY now sweeps to 480, above its band
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 120)
    strategy = await make_strategy(user, symbol="NSE:ITC", buy_time=buy_time, sell_time=sell_time, stop_loss=380)
    sid = int(strategy["strategy_id"])
    await start(client, user, sid)
    api_key = user.broker.api_key

    async def stopped() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return bool(status.get("strategy_status") in ("failed", "stopped"))

    await eventually(stopped, 40, "the run stopped after its BUY was cancelled", pipeline)
    (buy,) = state.find_orders(api_key)
    assert buy.status == "CANCELLED"
    assert net_quantity(simulator, api_key) == 0

"""The optional protective SL-M at the broker: placed after the BUY, cancelled before a normal exit, and,
when it executed while this system was down, adopted as the exit (the two never both execute)."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline, start_service, stop_service, wait_ready
from tests.streams.test_pipeline_e2e import clock_time, eventually, placements, start

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def orders_of(simulator: Any, api_key: str) -> list[Any]:
    return sorted(simulator.state.find_orders(api_key), key=lambda o: o.order_id)


async def test_protective_stop_is_cancelled_before_the_sell(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:AXISBANK", 1100.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 9)
    body = await make_strategy(user, symbol="NSE:AXISBANK", buy_time=buy_time, sell_time=sell_time,
                               stop_loss=1050, protective_stop=True)  # fmt: skip
    assert body.get("protective_stop", True) is True
    await start(client, user, body["strategy_id"])

    def protected() -> Any:
        stops = [o for o in orders_of(simulator, user.broker.api_key) if o.order_type == "SL-M"]
        return stops and stops[0].status not in ("COMPLETE", "CANCELLED", "REJECTED") and stops[0]

    stop_order = await eventually(protected, 15, "the protective SL-M resting at the broker", pipeline)
    assert stop_order.transaction_type == "SELL" and stop_order.trigger_price == 105000  # paise

    def sold() -> bool:
        sells = [o for o in orders_of(simulator, user.broker.api_key) if o.order_type == "MARKET"]
        return len(sells) == 2

    await eventually(sold, 20, "the SELL at sell_time", pipeline)
    final = {o.order_id: o for o in orders_of(simulator, user.broker.api_key)}
    assert final[stop_order.order_id].status == "CANCELLED"
    assert [o.transaction_type for o in final.values() if o.status == "COMPLETE"] == ["BUY", "SELL"]


async def test_protective_stop_executed_while_down_is_adopted_not_doubled(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:KOTAKBANK", 1800.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 300)
    body = await make_strategy(user, symbol="NSE:KOTAKBANK", buy_time=buy_time, sell_time=sell_time,
                               stop_loss=1750, protective_stop=True)  # fmt: skip
    sid = body["strategy_id"]
    await start(client, user, sid)

    def protected() -> Any:
        return [o for o in orders_of(simulator, user.broker.api_key) if o.order_type == "SL-M"]

    await eventually(protected, 15, "the protective SL-M", pipeline)
    stop_service(pipeline.services["worker"], signal.SIGKILL)
    simulator.state.set_price("NSE:KOTAKBANK", 1740.0)  # the broker executes the SL-M while we are down

    def stop_executed() -> bool:
        return any(o.order_type == "SL-M" and o.status == "COMPLETE" for o in orders_of(simulator, user.broker.api_key))

    await eventually(stop_executed, 10, "the broker to execute the SL-M", pipeline)
    placed_before = len(placements(simulator, user.broker.api_key))
    pipeline.services["worker"] = start_service("worker", pipeline.env)
    await wait_ready(pipeline.services["worker"])
    started = time.monotonic()

    async def exited() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("last_action") == "STOPLOSS"

    await eventually(exited, 15, "the exit adopted after recovery", pipeline)
    assert time.monotonic() - started < 10
    sells = [o for o in orders_of(simulator, user.broker.api_key) if o.transaction_type == "SELL"]
    assert [(o.order_type, o.status) for o in sells] == [("SL-M", "COMPLETE")], "a second exit reached the broker"
    assert len(placements(simulator, user.broker.api_key)) == placed_before

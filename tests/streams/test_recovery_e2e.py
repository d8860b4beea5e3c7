"""Seed sequence 10 on real processes: Redis flushed and the worker killed while a position is open and its
stop is crossed; the restarted worker rebuilds the runtime from the database and exits the position."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from core.clock import ScaledClock
from storage.runtime import LTP_KEY
from tests.fixtures.pipeline import Pipeline, start_service, stop_service, wait_ready
from tests.streams.test_exits_e2e import tick
from tests.streams.test_pipeline_e2e import clock_time, eventually, placements, start

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.mark.tansu
async def test_stop_crossed_while_down_exits_within_seconds_of_recovery(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, redis: Redis,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:LT", 3500.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 300)
    protected = await make_strategy(user, symbol="NSE:LT", buy_time=buy_time, sell_time=sell_time, stop_loss=3400)
    waiting = await make_strategy(user, symbol="NSE:LT", buy_time=sell_time, sell_time=clock_time(pinned_clock, 400)[0],
                                  stop_loss=3000)  # fmt: skip
    for strategy in (protected, waiting):
        await start(client, user, strategy["strategy_id"])

    async def bought() -> bool:
        status = (await client.get(f"/strategy/status/{protected['strategy_id']}", headers=user.headers)).json()
        return status.get("position") == "bought"

    await eventually(bought, 15, "BUY filled", pipeline)

    # Everything goes down: the worker dies, Redis loses its data, and the price falls through the stop.
    stop_service(pipeline.services["worker"], signal.SIGKILL)
    await redis.flushall()
    simulator.state.set_price("NSE:LT", 3390.0)

    pipeline.services["worker"] = start_service("worker", pipeline.env)
    await wait_ready(pipeline.services["worker"])
    ready_at = time.monotonic()
    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 10, "the stop-loss exit", pipeline
    )
    assert [o.params["transaction_type"] for o in orders] == ["BUY", "SELL"]
    assert orders[1].received_monotonic - ready_at < 5.0
    assert any("Recovery Complete" in line for line in pipeline.services["worker"].lines)

    # The runtime layer is back for the strategy that was still waiting for its BUY.
    rebuilt = await redis.hgetall(f"strategy:{waiting['strategy_id']}")
    assert rebuilt["instrument"] == "NSE:LT" and rebuilt["user_id"] == str(user.id)
    assert str(waiting["strategy_id"]) in await redis.smembers("symbol:NSE:LT:strategies")

    async def exited() -> bool:
        status = (await client.get(f"/strategy/status/{protected['strategy_id']}", headers=user.headers)).json()
        return status.get("last_action") == "STOPLOSS"

    await eventually(exited, 10, "status shows the STOPLOSS exit", pipeline)


async def test_a_running_worker_puts_back_the_last_prices_redis_lost_once_it_is_rebuilt(
    pipeline: Pipeline, pinned_clock: ScaledClock, redis: Redis, simulator: Any
) -> None:
    """An instrument that does not tick again after Redis lost its data still has its last price (for a chased exit,
    the P&L, a loss limit): the worker writes back what it knows once Redis has been rebuilt."""
    await tick(pipeline, pinned_clock, simulator, "NSE:HDFCBANK", [1612.5])

    async def price() -> float | None:
        value = await redis.hget(LTP_KEY, "NSE:HDFCBANK")
        return None if value is None else float(value)

    assert await eventually(price, 10, "the tick's price written to Redis", pipeline) == 1612.5
    await redis.flushall()  # the worker stays up; no tick follows
    assert await eventually(price, 15, "the price put back once Redis was rebuilt", pipeline) == 1612.5

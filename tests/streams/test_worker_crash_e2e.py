"""A worker killed with SIGKILL in the middle of a burst of BUYs, then restarted: every strategy still gets
exactly one BUY and one SELL at the broker (no duplicate from a redelivered intent, none lost)."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import clock_time, eventually, placements, start

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

USERS = 3
STRATEGIES_PER_USER = 8  # under Kite's 10 orders/s per user: the burst is not rate limited


async def test_worker_killed_mid_burst_loses_and_doubles_nothing(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:WIPRO", 300.0)
    users = [await make_user() for _ in range(USERS)]
    buy_time, _ = clock_time(pinned_clock, 5)
    sell_time, _ = clock_time(pinned_clock, 30)
    for user in users:
        for _ in range(STRATEGIES_PER_USER):
            body = await make_strategy(user, symbol="NSE:WIPRO", buy_time=buy_time, sell_time=sell_time, stop_loss=100)
            await start(client, user, body["strategy_id"])
    # Slow order placement so that the kill lands while orders are in flight.
    simulator.state.inject_fault("latency", scope="orders", latency_ms=400)

    def placed_count() -> int:
        return sum(len(placements(simulator, user.broker.api_key)) for user in users)

    await eventually(lambda: placed_count() >= 1, 15, "the burst to reach the broker", pipeline)
    await pipeline.restart("worker", signal.SIGKILL)
    simulator.state.clear_faults()

    expected = USERS * STRATEGIES_PER_USER
    await eventually(lambda: placed_count() >= 2 * expected, 60, "every BUY and SELL after the restart", pipeline)
    for user in users:
        orders = simulator.state.find_orders(user.broker.api_key)
        by_tag: dict[str, int] = {}
        for order in orders:
            by_tag[order.tag] = by_tag.get(order.tag, 0) + 1
        assert all(count == 1 for count in by_tag.values()), f"duplicate orders at the broker: {by_tag}"
        sides = [order.transaction_type for order in orders]
        assert sides.count("BUY") == sides.count("SELL") == STRATEGIES_PER_USER
        for sid in user.strategies:

            async def both_filled(sid: int = sid, user: Any = user) -> bool:
                log = (await client.get(f"/strategy/{sid}/orders", headers=user.headers)).json()
                rows = log["orders"] if isinstance(log, dict) else log
                # Each fill is at the broker before its result row is written: wait for the row.
                return sorted((r["action"], r["status"]) for r in rows if r["kind"] == "result") == [
                    ("BUY", "filled"),
                    ("SELL", "filled"),
                ]

            await eventually(both_filled, 10, f"strategy {sid}'s BUY and SELL results", pipeline)

"""One trader's order bursts at Kite's 10 a second, through the whole pipeline, with no fault injected.

Thirty BUYs of one trader fall due in the same second, then one tick crosses all thirty stops. The broker
refuses an eleventh order call in any second with a 429; the trader's order budget must make that never happen.
Judged by the simulator's audit: every order placed once, no 429, and never more than ten order calls of the
trader in any one-second window of the simulator's own clock.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import clock_time, eventually, start
from tests.streams.test_resting_orders_e2e import trade

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

STRATEGIES = 30
BROKER_ORDERS_PER_SECOND = 10


def busiest_second(records: list[Any]) -> int:
    """The most order calls the broker received in any window of one second (sliding, on its clock)."""
    times = sorted(r.received_monotonic for r in records)
    return max(sum(1 for t in times[i:] if t < first + 1.0) for i, first in enumerate(times))


async def test_thirty_buys_and_thirty_stop_exits_of_one_trader_never_meet_a_429(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:INFY", 1500.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 8)
    sell_time, _ = clock_time(pinned_clock, 600)
    for _ in range(STRATEGIES):
        body = await make_strategy(user, buy_time=buy_time, sell_time=sell_time, stop_loss=1400.0, quantity=1)
        await start(client, user, int(body["strategy_id"]))
    api_key = user.broker.api_key

    def placed(side: str) -> list[Any]:
        records = simulator.state.audit_records(api_key=api_key)
        return [r for r in records if r.action == "place" and r.params.get("transaction_type") == side]

    def filled(side: str) -> list[Any]:
        orders = simulator.state.find_orders(api_key)
        return [o for o in orders if o.transaction_type == side and o.status == "COMPLETE"]

    await eventually(lambda: len(filled("BUY")) == STRATEGIES, 60, "thirty BUYs filled", pipeline)
    await trade(simulator, pipeline, pinned_clock, "NSE:INFY", 1390.0)  # one tick through every stop
    await eventually(lambda: len(filled("SELL")) == STRATEGIES, 60, "thirty stop exits filled", pipeline)

    records = simulator.state.audit_records(api_key=api_key)
    assert [r for r in records if r.http_status == 429] == []
    assert len(placed("BUY")) == STRATEGIES and len(placed("SELL")) == STRATEGIES  # each decision once
    assert len({r.tag for r in placed("SELL")}) == STRATEGIES
    assert busiest_second([r for r in records if r.action in ("place", "modify", "cancel")]) <= (
        BROKER_ORDERS_PER_SECOND
    )

"""Seed sequence 9 under injected broker faults, end to end: retries never double an order, exhausted or
permanent failures stop the strategy safely and tell the trader. The simulator's order book is the judge."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import clock_time, eventually, placements, start

# Fault scenarios exercise the engine, not the database: one backend keeps the suite short.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def buying_soon(
    make_user: Any, connect_broker: Any, make_strategy: Any, clock: ScaledClock
) -> tuple[Any, Any, int]:
    """A connected trader with an SBIN strategy whose BUY is due in 3 s (not started yet: faults go first)."""
    user = await make_user()
    creds = await connect_broker(user)
    buy_time, _ = clock_time(clock, 3)
    sell_time, _ = clock_time(clock, 120)
    strategy = await make_strategy(user, symbol="NSE:SBIN", buy_time=buy_time, sell_time=sell_time, stop_loss=10)
    return user, creds, strategy["strategy_id"]


async def failure_notice(client: httpx.AsyncClient, user: Any, sid: int) -> dict[str, Any] | None:
    notes = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
    return next((n for n in notes if n["title"] == "Order Failed – Strategy Stopped" and n["strategy_id"] == sid), None)


async def status_of(client: httpx.AsyncClient, user: Any, sid: int) -> dict[str, Any]:
    return (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()  # type: ignore[no-any-return]


async def test_unclear_outcomes_are_looked_up_and_never_doubled(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, connect_broker: Any,
) -> None:  # fmt: skip
    user, creds, sid = await buying_soon(make_user, connect_broker, make_strategy, pinned_clock)
    # The first placement is carried out but answered with a 503 (the order exists; we are not told),
    # the second request fails outright: the engine must find the first order by its tag, not resend.
    simulator.state.inject_fault("error", api_key=creds.api_key, scope="orders", count=1, process=True)
    simulator.state.inject_fault("error", api_key=creds.api_key, scope="all", count=1, status=502,
                                 error_type="DataException")  # fmt: skip
    await start(client, user, sid)

    async def bought() -> Any:
        status = await status_of(client, user, sid)
        return status.get("position") == "bought" and status

    await eventually(bought, 20, "BUY filled after retries", pipeline)
    orders = simulator.state.find_orders(creds.api_key)
    assert len(orders) == 1, [o.tag for o in orders]
    assert orders[0].status == "COMPLETE"
    log = (await client.get(f"/strategy/{sid}/orders", headers=user.headers)).json()
    rows = log["orders"] if isinstance(log, dict) else log
    assert [r["status"] for r in rows if r["kind"] == "result"] == ["filled"]
    assert len(placements(simulator, creds.api_key)) == 1  # the lookup found it: no second placement


async def test_four_transient_failures_exhaust_retries_and_stop_the_strategy(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, connect_broker: Any,
) -> None:  # fmt: skip
    user, creds, sid = await buying_soon(make_user, connect_broker, make_strategy, pinned_clock)
    simulator.state.inject_fault("error", api_key=creds.api_key, scope="orders", count=4, status=503)
    await start(client, user, sid)

    async def failed() -> Any:
        status = await status_of(client, user, sid)
        return status.get("strategy_status") == "failed" and status

    await eventually(failed, 30, "strategy failed", pipeline)
    assert len(placements(simulator, creds.api_key)) == 4  # the first try and three retries
    assert simulator.state.find_orders(creds.api_key) == []
    failure = await eventually(lambda: failure_notice(client, user, sid), 10, "failure notification", pipeline)
    assert failure["message"].startswith("BUY: ")

    async def recorded_failed() -> bool:
        # The runtime says "failed" first; the auto-stop then writes the database row.
        return (await client.get(f"/strategy/{sid}", headers=user.headers)).json()["status"] == "failed"

    await eventually(recorded_failed, 10, "the database status failed", pipeline)


async def test_a_rejection_is_not_retried_and_stops_the_strategy_with_the_reason(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, connect_broker: Any,
) -> None:  # fmt: skip
    user, creds, sid = await buying_soon(make_user, connect_broker, make_strategy, pinned_clock)
    simulator.state.inject_fault("reject", api_key=creds.api_key, count=1, message="RMS: margin exceeds limit")
    await start(client, user, sid)

    async def failed() -> Any:
        status = await status_of(client, user, sid)
        return status.get("strategy_status") == "failed" and status

    await eventually(failed, 20, "strategy failed", pipeline)
    assert len(placements(simulator, creds.api_key)) == 1
    failure = await eventually(lambda: failure_notice(client, user, sid), 10, "failure notification", pipeline)
    assert "RMS: margin exceeds limit" in failure["message"]

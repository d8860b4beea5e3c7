"""The trader's kill switch end to end through the REST API: every running strategy stopped, every position
squared off once, no BUY afterwards, starts refused until released. The simulator's audit is the judge."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_exits_e2e import bought, sides, status_of, tick
from tests.streams.test_pipeline_e2e import clock_time, eventually, start


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_kill_switch_squares_off_stops_everything_and_refuses_starts_until_released(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    holding = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:HDFCBANK", 1700.0,
                           stop_loss=1650)  # fmt: skip
    simulator.state.set_price("NSE:KOTAKBANK", 1800.0)
    later_buy, later_buy_at = clock_time(pinned_clock, 8)
    later_sell, _ = clock_time(pinned_clock, 300)
    created = await make_strategy(
        user, symbol="NSE:KOTAKBANK", buy_time=later_buy, sell_time=later_sell, stop_loss=1750
    )
    waiting = created["strategy_id"]
    await start(client, user, waiting)

    engaged = await client.post("/kill-switch", headers=user.headers)
    assert engaged.status_code == 200, engaged.text
    body = engaged.json()
    assert (body["engaged"], body["strategies_stopped"], body["positions_squared_off"]) == (True, 2, 1)

    refused = await client.post(f"/strategy/{waiting}/start", headers=user.headers)
    assert refused.status_code == 409 and "kill switch" in refused.json()["detail"], refused.text
    assert (await client.get("/kill-switch", headers=user.headers)).json()["engaged"] is True

    # The waiting strategy's BUY time passes with nothing sent; the held position was sold once.
    await asyncio.sleep(max(later_buy_at + 2 - time.monotonic(), 0))
    assert sides(simulator, user.broker.api_key, "HDFCBANK") == ["BUY", "SELL"]
    assert sides(simulator, user.broker.api_key, "KOTAKBANK") == []
    for sid in (holding, waiting):
        detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
        assert (detail["status"], detail["status_reason"]) == ("stopped", "kill switch")
    assert (await status_of(client, user, holding))["last_action"] == "EXIT"

    released = await client.delete("/kill-switch", headers=user.headers)
    assert released.status_code == 200 and released.json()["engaged"] is False
    again = await client.post(f"/strategy/{waiting}/start", headers=user.headers)
    assert again.status_code == 200, again.text
    assert sides(simulator, user.broker.api_key, "HDFCBANK") == ["BUY", "SELL"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_traders_daily_loss_limit_squares_everything_off_once_and_stops_the_day(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    assert (
        await client.put("/daily-loss-limit", json={"daily_max_loss": 300}, headers=user.headers)
    ).status_code == 200
    # 10 shares each; stops far below: only the limit across both can sell them.
    first = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:SUNPHARMA", 1700.0,
                         stop_loss=1500)  # fmt: skip
    second = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:TITAN", 3700.0,
                          stop_loss=3500)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:SUNPHARMA", [1685.0])  # -150: under the limit
    await tick(pipeline, pinned_clock, simulator, "NSE:TITAN", [3684.0])  # -160 more: -310, past it

    def both_sold() -> bool:
        key = user.broker.api_key
        return sides(simulator, key, "SUNPHARMA") == ["BUY", "SELL"] and sides(simulator, key, "TITAN") == [
            "BUY",
            "SELL",
        ]

    await eventually(both_sold, 20, "both positions squared off", pipeline)

    async def told() -> list[Any]:
        notices = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
        return [n for n in notices if n["kind"] == "daily_loss_limit"]

    [notice] = await eventually(told, 10, "the trader told", pipeline)
    assert "310.00" in notice["message"], notice
    for sid in (first, second):
        detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
        assert (detail["status"], detail["status_reason"]) == ("stopped", "daily loss limit")
    refused = await client.post(f"/strategy/{first}/start", headers=user.headers)
    assert refused.status_code == 409, refused.text
    await tick(pipeline, pinned_clock, simulator, "NSE:TITAN", [3600.0])  # more loss: nothing more to do
    assert len(await told()) == 1
    assert sides(simulator, user.broker.api_key, "SUNPHARMA") == ["BUY", "SELL"]
    assert sides(simulator, user.broker.api_key, "TITAN") == ["BUY", "SELL"]

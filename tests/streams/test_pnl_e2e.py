"""The P&L view end to end through the REST API only: strategies that traded at the simulator through real
Kafka, Redis, database, `algo worker` and `algo scheduler`. The simulator's trades judge the realised P&L, the
last tick the unrealised."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_exits_e2e import bought, sides, tick
from tests.streams.test_pipeline_e2e import eventually


def fills(simulator: Any, api_key: str, tradingsymbol: str, side: str) -> tuple[Decimal, int]:
    """The simulator's average fill price and quantity of one side of one instrument for this account."""
    trades = [
        t for t in simulator.state.trades_json(simulator.state.account(api_key))
        if t["tradingsymbol"] == tradingsymbol and t["transaction_type"] == side
    ]  # fmt: skip
    quantity = sum(int(t["quantity"]) for t in trades)
    value = sum(Decimal(str(t["average_price"])) * int(t["quantity"]) for t in trades)
    return value / quantity, quantity


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_realised_pnl_is_the_simulators_fills_and_unrealised_the_last_tick(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    closed = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:SUNPHARMA", 1700.0,
                          quantity=7, stop_loss=1650, target=1720.5)  # fmt: skip
    held = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:MARUTI", 12500.0,
                        quantity=3, stop_loss=12000)  # fmt: skip

    # SUNPHARMA reaches its target: sold. MARUTI falls a little, above its stop: still held.
    await tick(pipeline, pinned_clock, simulator, "NSE:SUNPHARMA", [1710.0, 1720.5])
    await eventually(lambda: sides(simulator, user.broker.api_key, "SUNPHARMA") == ["BUY", "SELL"], 20,
                     "the TARGET exit of SUNPHARMA", pipeline)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:MARUTI", [12490.0, 12480.55])

    buy, bought_quantity = fills(simulator, user.broker.api_key, "SUNPHARMA", "BUY")
    sell, sold_quantity = fills(simulator, user.broker.api_key, "SUNPHARMA", "SELL")
    assert bought_quantity == sold_quantity == 7
    realised = ((sell - buy) * 7).quantize(Decimal("0.01"))
    maruti_buy, maruti_quantity = fills(simulator, user.broker.api_key, "MARUTI", "BUY")
    unrealised = ((Decimal("12480.55") - maruti_buy) * maruti_quantity).quantize(Decimal("0.01"))
    assert maruti_quantity == 3

    async def day_with_the_last_tick() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get("/pnl", headers=user.headers)).json()
        rows = {row["strategy_id"]: row for row in body["strategies"]}
        # The worker writes last prices to Redis on a timer: the view follows the tick within a flush. The exit's
        # result row follows its fill at the broker once the trader's order book has been read, which may come
        # after that flush: the view is asserted once it holds both.
        priced = rows.get(held, {}).get("last_price") == "12480.55"
        return body if priced and rows.get(closed, {}).get("open_quantity") == 0 else None

    day = await eventually(day_with_the_last_tick, 20, "the P&L with SUNPHARMA's exit and MARUTI's last tick", pipeline)
    rows = {row["strategy_id"]: row for row in day["strategies"]}
    assert rows[closed] | {"realised": Decimal(rows[closed]["realised"])} == {
        "strategy_id": closed, "symbol": "NSE:SUNPHARMA", "day": day["day"], "runs": 1, "bought_quantity": 7,
        "sold_quantity": 7, "open_quantity": 0, "average_buy_price": str(buy.quantize(Decimal("0.01"))),
        "average_sell_price": str(sell.quantize(Decimal("0.01"))), "last_price": None, "realised": realised,
        "unrealised": "0.00", "total": str(realised),
    }  # fmt: skip
    assert realised > 0  # bought at 1,700, sold at the 1,720.50 target
    assert (rows[held]["open_quantity"], Decimal(rows[held]["unrealised"])) == (3, unrealised)
    assert Decimal(day["total"]) == realised + unrealised

    per_day = (await client.get(f"/strategy/{closed}/pnl", headers=user.headers)).json()
    assert [(d["day"], Decimal(d["realised"])) for d in per_day["days"]] == [(day["day"], realised)]

"""Re-entry after a stop-loss exit, end to end through the REST API only: `reentry_max` BUYs again after a stop
exit (each cycle its own intents and tags, its stop resolved from its own entry), none at or after
`reentry_until`, and in at_entry mode only once a tick is back at the previous entry. Real Kafka, Redis, database,
`algo worker` and `algo scheduler`; the simulator's audit is the judge of what reached the broker."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from tests.fixtures.api import read_topic
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_exits_e2e import sides, status_of, tick
from tests.streams.test_pipeline_e2e import IST, clock_time, eventually, placements, start


async def started(
    client: httpx.AsyncClient, user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    clock: ScaledClock, symbol: str, price: float, **fields: Any,
) -> int:  # fmt: skip
    simulator.state.set_price(symbol, price)
    buy_time, _ = clock_time(clock, 3)
    sell_time, _ = clock_time(clock, 300)
    body = await make_strategy(user, symbol=symbol, buy_time=buy_time, sell_time=sell_time, stop_loss=..., **fields)
    sid = int(body["strategy_id"])
    await start(client, user, sid)
    return sid


async def holding(
    client: httpx.AsyncClient, user: Any, sid: int, pipeline: Pipeline, cycle: int, within: float = 20
) -> dict[str, Any]:
    """Wait until the strategy holds the position of `cycle`; its status."""

    async def bought() -> dict[str, Any] | None:
        status = await status_of(client, user, sid)
        return status if (status.get("position"), status.get("cycle")) == ("bought", cycle) else None

    status: dict[str, Any] = await eventually(bought, within, f"cycle {cycle} bought", pipeline)
    return status


def orders_placed(simulator: Any, api_key: str, tradingsymbol: str) -> list[Any]:
    mine = (r for r in placements(simulator, api_key) if r.params["tradingsymbol"] == tradingsymbol)
    return [r for r in mine if r.outcome == "placed"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_two_re_entries_then_none(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    symbol = "NSE:HINDUNILVR"
    sid = await started(client, user, make_strategy, simulator, pipeline, pinned_clock, symbol, 1000.0,
                        stop_loss_points=10, reentry_max=2)  # fmt: skip
    status = await holding(client, user, sid, pipeline, 1)
    key = user.broker.api_key
    assert (status["entry_price"], status["stop_loss"], status["reentries_left"]) == (1000.0, 990.0, 2), status

    # Cycle 1 stops out at 990 and buys again there at once: cycle 2's stop is 10 under its own entry, 980.
    await tick(pipeline, pinned_clock, simulator, symbol, [995.0, 990.0])
    status = await holding(client, user, sid, pipeline, 2)
    assert (status["entry_price"], status["stop_loss"], status["reentries_left"]) == (990.0, 980.0, 1), status
    # 985 is above cycle 2's stop (and under cycle 1's): no exit; 980 is cycle 2's.
    await tick(pipeline, pinned_clock, simulator, symbol, [985.0, 980.0])
    status = await holding(client, user, sid, pipeline, 3)
    assert (status["entry_price"], status["stop_loss"], status["reentries_left"]) == (980.0, 970.0, 0), status
    await tick(pipeline, pinned_clock, simulator, symbol, [970.0])

    async def done() -> dict[str, Any] | None:
        status = await status_of(client, user, sid)
        return status if status.get("strategy_status") == "completed" else None

    status = await eventually(done, 20, "the third stop exit ends the day", pipeline)
    assert (status["state"], status["cycle"], status["reentries_left"]) == ("exited_by_sl", 3, 0), status
    # The price comes back and falls again: nothing more reaches the broker.
    await tick(pipeline, pinned_clock, simulator, symbol, [1000.0, 960.0, 1001.0, 950.0])
    intents = [v for _, v in await read_topic(pipeline.settings, "orders", expect=10_000, wait_seconds=3)
               if v["strategy_id"] == sid]  # fmt: skip
    assert [(v["action"], v["cycle"]) for v in intents] == [
        ("BUY", 1), ("STOPLOSS", 1), ("BUY", 2), ("STOPLOSS", 2), ("BUY", 3), ("STOPLOSS", 3),
    ]  # fmt: skip
    placed = orders_placed(simulator, key, "HINDUNILVR")
    assert [r.params["transaction_type"] for r in placed] == ["BUY", "SELL"] * 3
    assert len({r.tag for r in placed}) == 6  # each cycle's orders are their own decisions
    results = [v for _, v in await read_topic(pipeline.settings, "order-results", expect=10_000, wait_seconds=3)
               if v["strategy_id"] == sid]  # fmt: skip
    assert sorted((v["action"], v["cycle"], v["price"]) for v in results if v["status"] == "filled") == [
        ("BUY", 1, 1000.0), ("BUY", 2, 990.0), ("BUY", 3, 980.0),
        ("STOPLOSS", 1, 990.0), ("STOPLOSS", 2, 980.0), ("STOPLOSS", 3, 970.0),
    ]  # fmt: skip


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_stop_at_or_after_the_cut_off_does_not_re_enter(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    symbol = "NSE:BRITANNIA"
    until, _ = clock_time(pinned_clock, 6)
    sid = await started(client, user, make_strategy, simulator, pipeline, pinned_clock, symbol, 5000.0,
                        stop_loss_points=20, reentry_max=3, reentry_until=until)  # fmt: skip
    await holding(client, user, sid, pipeline, 1)
    # The exchange clock passes the cut-off; then the stop is reached.
    await eventually(lambda: pinned_clock.now().astimezone(IST).strftime("%H:%M:%S") >= until, 15,
                     "the re-entry cut-off", pipeline)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, symbol, [4980.0])

    async def done() -> dict[str, Any] | None:
        status = await status_of(client, user, sid)
        return status if status.get("strategy_status") == "completed" else None

    status = await eventually(done, 20, "the stop exit ends the day", pipeline)
    assert (status["state"], status["cycle"]) == ("exited_by_sl", 1), status
    await tick(pipeline, pinned_clock, simulator, symbol, [5000.0, 4950.0])
    assert sides(simulator, user.broker.api_key, "BRITANNIA") == ["BUY", "SELL"]
    intents = [v for _, v in await read_topic(pipeline.settings, "orders", expect=10_000, wait_seconds=3)
               if v["strategy_id"] == sid]  # fmt: skip
    assert [v["action"] for v in intents] == ["BUY", "STOPLOSS"]


@pytest.mark.slow  # a minute or so: `make pytest-slow`, which CI runs
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_at_entry_waits_for_a_tick_back_at_the_previous_entry(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    symbol = "NSE:TITAN"
    sid = await started(client, user, make_strategy, simulator, pipeline, pinned_clock, symbol, 3000.0,
                        stop_loss_points=15, reentry_max=1, reentry_mode="at_entry")  # fmt: skip
    await holding(client, user, sid, pipeline, 1)
    await tick(pipeline, pinned_clock, simulator, symbol, [2985.0])

    async def waiting() -> dict[str, Any] | None:
        status = await status_of(client, user, sid)
        return status if status.get("state") == "exited_by_sl" else None

    status = await eventually(waiting, 20, "the stop exit of cycle 1", pipeline)
    assert (status["strategy_status"], status["cycle"], status["reentries_left"]) == ("running", 1, 1), status
    # Up towards the entry, not at it: no BUY. Then 3000.00, the entry: the BUY of cycle 2.
    await tick(pipeline, pinned_clock, simulator, symbol, [2990.0, 2999.95, 3000.0])
    status = await holding(client, user, sid, pipeline, 2)
    assert (status["entry_price"], status["stop_loss"], status["reentries_left"]) == (3000.0, 2985.0, 0), status
    buys = [v for _, v in await read_topic(pipeline.settings, "orders", expect=10_000, wait_seconds=3)
            if v["strategy_id"] == sid and v["action"] == "BUY"]  # fmt: skip
    assert [(v["cycle"], v["trigger"], v["trigger_price"]) for v in buys] == [(1, "schedule", None),
                                                                             (2, "price", 3000.0)]  # fmt: skip
    assert sides(simulator, user.broker.api_key, "TITAN") == ["BUY", "SELL", "BUY"]


@pytest.mark.slow  # a minute or so: `make pytest-slow`, which CI runs
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_worker_killed_between_the_stop_exit_and_the_re_entry_re_enters_once(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    symbol = "NSE:DIVISLAB"
    sid = await started(client, user, make_strategy, simulator, pipeline, pinned_clock, symbol, 2000.0,
                        stop_loss_points=10, reentry_max=1)  # fmt: skip
    await holding(client, user, sid, pipeline, 1)
    # The broker answers slowly: the worker dies with the stop exit sent and neither it nor the re-entry recorded.
    simulator.state.inject_fault("latency", scope="orders", latency_ms=1500)
    await tick(pipeline, pinned_clock, simulator, symbol, [1990.0])
    await eventually(lambda: len(placements(simulator, user.broker.api_key)) >= 2, 20, "the stop exit sent", pipeline)
    await pipeline.restart("worker", signal.SIGKILL)
    simulator.state.clear_faults()

    status = await holding(client, user, sid, pipeline, 2, within=60)
    assert (status["entry_price"], status["stop_loss"], status["reentries_left"]) == (1990.0, 1980.0, 0), status
    await tick(pipeline, pinned_clock, simulator, symbol, [1980.0])

    async def done() -> dict[str, Any] | None:
        status = await status_of(client, user, sid)
        return status if status.get("strategy_status") == "completed" else None

    await eventually(done, 30, "cycle 2's stop exit ends the day", pipeline)
    placed = orders_placed(simulator, user.broker.api_key, "DIVISLAB")
    assert [r.params["transaction_type"] for r in placed] == ["BUY", "SELL", "BUY", "SELL"]
    assert len({r.tag for r in placed}) == 4

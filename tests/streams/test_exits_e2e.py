"""Exits beyond one stop price, end to end through the REST API only (issue: the exits traders compare us on):
a stop in points or percent of the entry, resolved when the BUY fills; a target. Real Kafka, Redis, database,
`algo worker` and `algo scheduler`; the simulator's audit is the judge of what reached the broker, the `orders`
topic of which tick decided the exit."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from core.clock import ScaledClock
from streams.price_highs import ARMED_AT_KEY
from tests.fixtures.api import read_topic
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import clock_time, eventually, placements, start


async def bought(
    client: httpx.AsyncClient, user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    clock: ScaledClock, symbol: str, price: float, **exits: Any,
) -> int:  # fmt: skip
    """A strategy of `user` with these exit fields, started, its BUY filled at `price`; a rising stop (trailing,
    move to cost) also armed on the worker, whose high counts the prices read from then on."""
    simulator.state.set_price(symbol, price)
    buy_time, _ = clock_time(clock, 3)
    sell_time, _ = clock_time(clock, 300)
    body = await make_strategy(user, symbol=symbol, buy_time=buy_time, sell_time=sell_time, **exits)
    sid = int(body["strategy_id"])
    await start(client, user, sid)

    async def holding() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("position") == "bought"

    await eventually(holding, 20, f"BUY of {symbol} filled", pipeline)
    if any(name.startswith(("trail_", "move_to_cost_")) for name in exits):
        redis = Redis.from_url(pipeline.settings.redis_url)
        try:

            async def armed() -> bool:
                return bool(await redis.hexists(ARMED_AT_KEY, str(sid)))

            await eventually(armed, 20, f"the rising stop of {symbol} armed", pipeline)
        finally:
            await redis.aclose()
    return sid


async def tick(pipeline: Pipeline, clock: ScaledClock, simulator: Any, symbol: str, prices: list[float]) -> None:
    """The market moves through `prices`: the simulator's price, and ticks as the tick connector publishes them."""
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()
    try:
        for price in prices:
            simulator.state.set_price(symbol, price)
            value = {"instrument": symbol, "token": 0, "last_price": price, "volume": 1,
                     "received_at": clock.now().isoformat()}  # fmt: skip
            await producer.send_and_wait(pipeline.settings.topic("ticks"), orjson.dumps(value), key=symbol.encode())
    finally:
        await producer.stop()


async def exit_intents(pipeline: Pipeline, sid: int, expect: int = 1) -> list[dict[str, Any]]:
    records = await read_topic(pipeline.settings, "orders", expect=10_000, wait_seconds=3)
    return [v for _, v in records if v["strategy_id"] == sid and v["action"] not in ("BUY", "SELL")]


def sides(simulator: Any, api_key: str, tradingsymbol: str) -> list[str]:
    return [
        r.params["transaction_type"]
        for r in placements(simulator, api_key)
        if r.params["tradingsymbol"] == tradingsymbol and r.outcome == "placed"
    ]


async def status_of(client: httpx.AsyncClient, user: Any, sid: int) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
    return body


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_stops_in_points_and_percent_exit_at_the_first_tick_at_or_under_the_resolved_stop(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    # Bought at 1,700.00: 12.50 points under it is 1,687.50. Bought at 12,500.00: 1.5% under it is 12,312.50.
    cases = [
        ("NSE:SUNPHARMA", 1700.0, {"stop_loss_points": 12.5}, 1687.5),
        ("NSE:MARUTI", 12500.0, {"stop_loss_percent": 1.5}, 12312.5),
    ]
    strategies = []
    for symbol, price, rule, stop in cases:
        sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, symbol, price,
                           stop_loss=..., **rule)  # fmt: skip
        status = await status_of(client, user, sid)
        assert (status["entry_price"], status["stop_loss"]) == (price, stop), status
        strategies.append((sid, symbol, stop))

    for _, symbol, stop in strategies:
        # Above it by a point, by one tick, then exactly on it (the first tick at or under it); later under it.
        await tick(pipeline, pinned_clock, simulator, symbol, [stop + 1, round(stop + 0.05, 2), stop])
        tradingsymbol = symbol.split(":")[1]
        await eventually(lambda ts=tradingsymbol: sides(simulator, user.broker.api_key, ts) == ["BUY", "SELL"], 20,
                         f"the STOPLOSS exit of {symbol}", pipeline)  # fmt: skip
        await tick(pipeline, pinned_clock, simulator, symbol, [stop - 5])

    for sid, symbol, stop in strategies:
        [intent] = await exit_intents(pipeline, sid)
        assert (intent["action"], intent["trigger_price"]) == ("STOPLOSS", stop)
        status = await status_of(client, user, sid)
        assert (status["state"], status["stop_loss"]) == ("exited_by_sl", stop)
        assert sides(simulator, user.broker.api_key, symbol.split(":")[1]) == ["BUY", "SELL"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_target_exits_at_the_first_tick_at_or_above_it_and_the_stop_goes_with_it(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:ASIANPAINT", 4000.0,
                       stop_loss=3950, target_points=20)  # fmt: skip
    status = await status_of(client, user, sid)
    assert (status["stop_loss"], status["target"]) == (3950.0, 4020.0)

    await tick(pipeline, pinned_clock, simulator, "NSE:ASIANPAINT", [4010.0, 4019.95, 4020.0])
    await eventually(lambda: sides(simulator, user.broker.api_key, "ASIANPAINT") == ["BUY", "SELL"], 20,
                     "the TARGET exit", pipeline)  # fmt: skip
    # Then the price falls through the stop: the position is gone, and so is its stop.
    await tick(pipeline, pinned_clock, simulator, "NSE:ASIANPAINT", [3940.0])

    async def exited_by_target() -> bool:
        return (await status_of(client, user, sid)).get("state") == "exited_by_target"

    await eventually(exited_by_target, 10, "the status shows the TARGET exit", pipeline)
    [intent] = await exit_intents(pipeline, sid)
    assert (intent["action"], intent["trigger_price"]) == ("TARGET", 4020.0)
    notices = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
    assert any(n["kind"] == "target_reached" and n["strategy_id"] == sid for n in notices), notices
    assert sides(simulator, user.broker.api_key, "ASIANPAINT") == ["BUY", "SELL"]
    detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
    assert (detail["status"], Decimal(detail["target_points"])) == ("completed", 20)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_trailing_stop_exits_at_the_first_tick_at_or_under_the_high_since_activation_minus_the_trail(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    # Bought at 2,000.00; the trailing stop starts at 2,005.00 and trails 10.00 under the high since then.
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:NESTLEIND", 2000.0,
                       stop_loss=..., stop_loss_points=50, trail_points=10, trail_activation_points=5)  # fmt: skip
    # 1,999 and 2,004.95: not active (a trail from 2,004.95 would be at 1,994.95; 1,995 would not reach it anyway).
    # Active at 2,030 (stop 2,020); 2,025 and 2,020.05 stay above it; 2,020.00 is the first at or under it.
    await tick(pipeline, pinned_clock, simulator, "NSE:NESTLEIND",
               [1999.0, 2004.95, 1995.0, 2030.0, 2025.0, 2020.05, 2020.0])  # fmt: skip
    await eventually(lambda: sides(simulator, user.broker.api_key, "NESTLEIND") == ["BUY", "SELL"], 20,
                     "the trailing stop's exit", pipeline)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:NESTLEIND", [2010.0])
    [intent] = await exit_intents(pipeline, sid)
    assert (intent["action"], intent["exit_kind"], intent["exit_level"], intent["trigger_price"]) == (
        "STOPLOSS", "trailing_stop", 2020.0, 2020.0,
    )  # fmt: skip
    assert sides(simulator, user.broker.api_key, "NESTLEIND") == ["BUY", "SELL"]
    notices = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
    assert any(n["kind"] == "stoploss_triggered" and "trailing stop 2020.0" in n["message"] for n in notices), notices


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_move_to_cost_makes_the_entry_the_stop_once_the_price_is_far_enough_above_it(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    # Bought at 900.00 with a 2% stop (882.00); 6 points above the entry (906.00) the stop becomes 900.00.
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:BAJFINANCE", 900.0,
                       stop_loss=..., stop_loss_percent=2, move_to_cost_points=6)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:BAJFINANCE", [895.0, 905.95, 906.0, 901.0, 900.05, 900.0])
    await eventually(lambda: sides(simulator, user.broker.api_key, "BAJFINANCE") == ["BUY", "SELL"], 20,
                     "the exit at cost", pipeline)  # fmt: skip
    [intent] = await exit_intents(pipeline, sid)
    assert (intent["action"], intent["exit_kind"], intent["exit_level"], intent["trigger_price"]) == (
        "STOPLOSS", "cost_stop", 900.0, 900.0,
    )  # fmt: skip
    status = await status_of(client, user, sid)
    assert (status["state"], status["entry_price"]) == ("exited_by_sl", 900.0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
async def test_a_strategy_loss_limit_sells_once_and_ends_its_day(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    # 10 shares bought at 1,500.00 with a 100-point stop (1,400.00) and a loss limit of 250 rupees: 1,475.00.
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:WIPRO", 1500.0,
                       stop_loss=..., stop_loss_points=100, max_loss=250)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:WIPRO", [1480.0, 1475.05, 1475.0])
    await eventually(lambda: sides(simulator, user.broker.api_key, "WIPRO") == ["BUY", "SELL"], 20,
                     "the loss limit's exit", pipeline)  # fmt: skip
    await tick(pipeline, pinned_clock, simulator, "NSE:WIPRO", [1390.0])  # under the stop too: nothing more
    [intent] = await exit_intents(pipeline, sid)
    assert (intent["action"], intent["exit_kind"], intent["exit_level"]) == ("STOPLOSS", "loss_limit", 1475.0)

    async def told() -> bool:
        notices = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
        return any(n["kind"] == "loss_limit_reached" and n["strategy_id"] == sid for n in notices)

    await eventually(told, 10, "the trader told of the loss limit", pipeline)
    detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
    assert detail["status"] == "completed"
    assert sides(simulator, user.broker.api_key, "WIPRO") == ["BUY", "SELL"]

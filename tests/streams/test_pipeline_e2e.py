"""Seed sequences 4-7 end to end through the REST API only: real Kafka, Redis, database, `algo worker` and
`algo scheduler` processes, and the simulator as the broker whose audit judges the outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.clock import ScaledClock
from tests.fixtures.pipeline import Pipeline, dump_logs, start_service, wait_ready

IST = ZoneInfo("Asia/Kolkata")


async def eventually(condition: Callable[[], Any], within: float, what: str, pipeline: Pipeline) -> Any:
    """Await a condition on external state (the simulator's audit, the API), checking every 50 ms."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(dump_logs(pipeline)))
        await asyncio.sleep(0.05)


def clock_time(clock: ScaledClock, seconds_ahead: float) -> tuple[str, float]:
    """An exchange time `seconds_ahead` from now as "HH:MM:SS", and when it falls on time.monotonic().

    The simulator stamps its audit with time.monotonic() too, so "within 1 s of due" is measured on one
    clock whatever project clock the simulator runs on.
    """
    at = (clock.now() + timedelta(seconds=seconds_ahead)).astimezone(IST).replace(microsecond=0)
    return at.strftime("%H:%M:%S"), time.monotonic() + clock.seconds_until(at)


def placements(simulator: Any, api_key: str) -> list[Any]:
    return [r for r in simulator.state.audit_records(api_key=api_key) if r.action == "place"]


async def start(client: httpx.AsyncClient, user: Any, strategy_id: int) -> None:
    response = await client.post("/strategy/start", json={"strategy_id": strategy_id}, headers=user.headers)
    assert response.status_code == 200, response.text


async def bought_strategy(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    clock: ScaledClock, *, symbol: str, price: float, stop: float, sell_in: float = 120.0,
) -> tuple[Any, int]:  # fmt: skip
    """A new user's strategy, started, its BUY (due 3 s ahead) filled at `price`: the user and its id."""
    simulator.state.set_price(symbol, price)
    user = await make_user()
    buy_time, _ = clock_time(clock, 3)
    sell_time, _ = clock_time(clock, sell_in)
    strategy = await make_strategy(user, symbol=symbol, buy_time=buy_time, sell_time=sell_time, stop_loss=stop)
    sid = int(strategy["strategy_id"])
    await start(client, user, sid)

    async def bought() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("position") == "bought"

    await eventually(bought, 15, "BUY filled", pipeline)
    return user, sid


@pytest.mark.tansu
async def test_buy_and_sell_happen_once_each_at_their_times(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:INFY", 1500.0)
    user = await make_user()
    buy_time, buy_at = clock_time(pinned_clock, 4)
    sell_time, sell_at = clock_time(pinned_clock, 7)
    strategy = await make_strategy(user, symbol="NSE:INFY", buy_time=buy_time, sell_time=sell_time, stop_loss=1400)
    await start(client, user, strategy["strategy_id"])

    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 20, "BUY and SELL", pipeline
    )
    buy, sell = orders
    assert (buy.params["transaction_type"], sell.params["transaction_type"]) == ("BUY", "SELL")
    assert buy.outcome == sell.outcome == "placed"
    assert 0 <= buy.received_monotonic - buy_at < 1.0
    assert 0 <= sell.received_monotonic - sell_at < 1.0
    assert buy.tag != sell.tag

    async def completed() -> Any:
        status = await client.get(f"/strategy/status/{strategy['strategy_id']}", headers=user.headers)
        return status.json().get("strategy_status") == "completed" and status.json()

    final = await eventually(completed, 10, "strategy completed", pipeline)
    assert final["last_action"] == "SELL"
    log = (await client.get(f"/strategy/{strategy['strategy_id']}/orders", headers=user.headers)).json()
    results = [row for row in (log["orders"] if isinstance(log, dict) else log) if row["kind"] == "result"]
    assert [(r["action"], r["status"]) for r in results] == [("BUY", "filled"), ("SELL", "filled")]
    # Nothing more arrives at the broker afterwards.
    assert len(placements(simulator, user.broker.api_key)) == 2


@pytest.mark.tansu
async def test_price_crossing_the_stop_exits_once_and_cancels_the_sell(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    _, sell_at = clock_time(pinned_clock, 12)
    user, sid = await bought_strategy(client, make_user, make_strategy, simulator, pipeline, pinned_clock,
                                      symbol="NSE:TCS", price=4000.0, stop=3950, sell_in=12)  # fmt: skip
    # Ticks as the tick connector publishes them: two above the stop, then three at or below it.
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()
    try:
        for price in (3990.0, 3960.5, 3950.0, 3940.0, 3930.0):
            simulator.state.set_price("NSE:TCS", price)
            tick = {"instrument": "NSE:TCS", "token": 0, "last_price": price, "volume": 1,
                    "received_at": pinned_clock.now().isoformat()}  # fmt: skip
            await producer.send_and_wait(pipeline.settings.topic("ticks"), orjson.dumps(tick), key=b"NSE:TCS")
    finally:
        await producer.stop()

    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 15, "STOPLOSS exit", pipeline
    )
    assert [o.params["transaction_type"] for o in orders] == ["BUY", "SELL"]
    # Past sell_time, no second exit: the SELL job was cancelled by the exit.
    await asyncio.sleep(max(sell_at + 2 - time.monotonic(), 0))  # the SELL's due time must pass unanswered
    assert len(placements(simulator, user.broker.api_key)) == 2
    status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
    assert status["last_action"] == "STOPLOSS"


@pytest.mark.tansu
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine, not the database, is under test here
async def test_a_fresh_stop_ignores_ticks_from_before_its_position(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    """A feed reading behind (or a replay of older ticks) delivers prices from before the BUY: they predate the
    position and must not sell it. A crossing received after the BUY exits at once."""
    user, sid = await bought_strategy(client, make_user, make_strategy, simulator, pipeline, pinned_clock,
                                      symbol="NSE:WIPRO", price=300.0, stop=290)  # fmt: skip

    async def status() -> dict[str, Any]:
        return dict((await client.get(f"/strategy/status/{sid}", headers=user.headers)).json())

    before_buy = pinned_clock.now() - timedelta(seconds=30)
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()

    async def tick(price: float, received_at: Any, late_seconds: float = 0.0) -> None:
        value = {"instrument": "NSE:WIPRO", "token": 0, "last_price": price, "volume": 1,
                 "received_at": received_at.isoformat()}  # fmt: skip
        published_ms = int((time.time() - late_seconds) * 1000)  # as published by a feed that far behind
        await producer.send_and_wait(pipeline.settings.topic("ticks"), orjson.dumps(value), key=b"NSE:WIPRO",
                                     timestamp_ms=published_ms)  # fmt: skip

    try:
        for offset, price in enumerate((289.0, 250.0, 280.5)):  # through the stop, 30 s before the BUY
            await tick(price, before_buy + timedelta(milliseconds=offset), late_seconds=30)
        await tick(295.25, pinned_clock.now())  # fresh, above the stop: once shown, the old ones were read
        await eventually(lambda: status_is(status, last_price=295.25), 15, "the fresh price in the status", pipeline)
        assert len(placements(simulator, user.broker.api_key)) == 1, "an exit on prices older than the position"
        shown = await status()
        assert shown["position"] == "bought"
        # The trader is told the prices were read late (the stale ticks were published 30 s before being read).
        assert shown["market_data_delay_seconds"] is not None and shown["market_data_delay_seconds"] >= 29
        simulator.state.set_price("NSE:WIPRO", 289.9)
        await tick(289.9, pinned_clock.now())
    finally:
        await producer.stop()
    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 15, "STOPLOSS exit", pipeline
    )
    assert [o.params["transaction_type"] for o in orders] == ["BUY", "SELL"]
    await eventually(lambda: status_is(status, last_action="STOPLOSS"), 10, "the STOPLOSS in the status", pipeline)
    # Read in time again: the delay is no longer shown.
    await eventually(lambda: status_is(status, market_data_delay_seconds=None), 10, "no delay shown", pipeline)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine, not the database, is under test here
async def test_a_position_opened_through_its_stop_on_a_quiet_instrument_exits_at_once(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    """The price fell through the stop before the BUY and then stood still: no tick after the BUY will come
    (Kite ticks only when a price moves), and the one before it predates the position. The worker asks the
    broker for the current price and exits at once (crash matrix seeds 4, 5 and 8 on Apache Kafka)."""
    simulator.state.set_price("NSE:SBIN", 800.0)
    user = await make_user()
    buy_time, buy_at = clock_time(pinned_clock, 4)
    sell_time, _ = clock_time(pinned_clock, 120)
    strategy = await make_strategy(user, symbol="NSE:SBIN", buy_time=buy_time, sell_time=sell_time, stop_loss=790)
    await start(client, user, strategy["strategy_id"])
    simulator.state.set_price("NSE:SBIN", 785.0)
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()
    try:
        tick = {"instrument": "NSE:SBIN", "token": 0, "last_price": 785.0, "volume": 1,
                "received_at": pinned_clock.now().isoformat()}  # fmt: skip
        await producer.send_and_wait(pipeline.settings.topic("ticks"), orjson.dumps(tick), key=b"NSE:SBIN")
    finally:
        await producer.stop()
    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 20, "the STOPLOSS exit", pipeline
    )
    buy, exit_order = orders[:2]
    assert (buy.params["transaction_type"], exit_order.params["transaction_type"]) == ("BUY", "SELL")
    assert exit_order.received_monotonic - buy.received_monotonic < 5.0


async def status_is(read: Callable[[], Any], **expected: Any) -> bool:
    current = await read()
    return all(current.get(key) == value for key, value in expected.items())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine, not the database, is under test here
async def test_live_ticks_from_the_broker_trigger_the_stop_through_the_tick_connector(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    """The whole chain: simulator websocket -> `algo ticker` (KiteTicker) -> ticks -> stop-loss agent ->
    orders -> execution engine -> simulator."""
    simulator.state.set_price("NSE:RELIANCE", 2500.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 120)
    strategy = await make_strategy(user, symbol="NSE:RELIANCE", buy_time=buy_time, sell_time=sell_time, stop_loss=2450)
    sid = strategy["strategy_id"]
    await start(client, user, sid)
    env = dict(pipeline.env)
    env.update(TICKER_API_KEY=user.broker.api_key, TICKER_ACCESS_TOKEN=user.broker.access_token,
               KITE_TICKER_ROOT=simulator.ticker_root, TICKER_SILENCE_SECONDS="3")  # fmt: skip
    ticker = start_service("ticker", env, ready_line="ticker connected")
    pipeline.services["ticker"] = ticker
    await wait_ready(ticker)

    async def bought() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("position") == "bought"

    await eventually(bought, 15, "BUY filled", pipeline)

    async def price_shown() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("last_price") == 2500.0

    await eventually(price_shown, 10, "the live price in the status", pipeline)
    simulator.state.set_price("NSE:RELIANCE", 2449.5)
    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 2 and p, 15, "STOPLOSS exit", pipeline
    )
    assert [o.params["transaction_type"] for o in orders] == ["BUY", "SELL"]

    async def exited_by_stop() -> bool:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        return status.get("last_action") == "STOPLOSS"

    await eventually(exited_by_stop, 10, "status shows the STOPLOSS exit", pipeline)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine, not the database, is under test here
async def test_stop_with_an_open_position_squares_it_off_and_without_one_does_not(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:ITC", 450.0)
    user = await make_user()
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 120)
    holding = await make_strategy(user, symbol="NSE:ITC", buy_time=buy_time, sell_time=sell_time, stop_loss=400)
    kept = await make_strategy(user, symbol="NSE:ITC", buy_time=buy_time, sell_time=sell_time, stop_loss=400)
    for strategy in (holding, kept):
        await start(client, user, strategy["strategy_id"])

    async def both_bought() -> bool:
        for strategy in (holding, kept):
            status = (await client.get(f"/strategy/status/{strategy['strategy_id']}", headers=user.headers)).json()
            if status.get("position") != "bought":
                return False
        return True

    await eventually(both_bought, 15, "both BUYs filled", pipeline)
    squared = await client.post("/strategy/stop", json={"strategy_id": holding["strategy_id"]}, headers=user.headers)
    assert squared.status_code == 200 and squared.json()["squared_off"] is True
    left_open = await client.post(
        "/strategy/stop", json={"strategy_id": kept["strategy_id"], "square_off": False}, headers=user.headers
    )
    assert left_open.status_code == 200 and left_open.json()["squared_off"] is False

    orders = await eventually(
        lambda: len(p := placements(simulator, user.broker.api_key)) >= 3 and p, 15, "the square-off", pipeline
    )
    sides = sorted(o.params["transaction_type"] for o in orders)
    assert sides == ["BUY", "BUY", "SELL"]

    async def exit_logged() -> bool:
        log = (await client.get(f"/strategy/{holding['strategy_id']}/orders", headers=user.headers)).json()
        rows = log["orders"] if isinstance(log, dict) else log
        return [(r["action"], r["status"]) for r in rows if r["kind"] == "result"] == [
            ("BUY", "filled"),
            ("EXIT", "filled"),
        ]

    await eventually(exit_logged, 10, "the EXIT in the order log", pipeline)
    for strategy in (holding, kept):
        detail = (await client.get(f"/strategy/{strategy['strategy_id']}", headers=user.headers)).json()
        assert detail["status"] == "stopped"
    assert len(placements(simulator, user.broker.api_key)) == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine, not the database, is under test here
async def test_two_users_on_shared_and_separate_instruments_each_trade_exactly_once(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    simulator.state.set_price("NSE:INFY", 1500.0)
    simulator.state.set_price("NSE:HDFCBANK", 1700.0)
    alice, bob = await make_user(), await make_user()
    buy_time, buy_at = clock_time(pinned_clock, 4)
    sell_time, sell_at = clock_time(pinned_clock, 8)
    plan = [(alice, "NSE:INFY"), (alice, "NSE:HDFCBANK"), (bob, "NSE:INFY")]
    strategies = []
    for user, symbol in plan:
        body = await make_strategy(user, symbol=symbol, buy_time=buy_time, sell_time=sell_time, stop_loss=1000)
        strategies.append((user, body["strategy_id"]))
    for user, sid in strategies:
        await start(client, user, sid)

    def all_traded() -> bool:
        return (
            len(placements(simulator, alice.broker.api_key)) >= 4
            and len(placements(simulator, bob.broker.api_key)) >= 2
        )

    await eventually(all_traded, 20, "every BUY and SELL", pipeline)
    for user in (alice, bob):
        per_tag: dict[str, list[Any]] = {}
        for record in placements(simulator, user.broker.api_key):
            per_tag.setdefault(record.tag, []).append(record)
        assert all(len(records) == 1 for records in per_tag.values()), "a duplicate order reached the broker"
        for records in per_tag.values():
            due = buy_at if records[0].params["transaction_type"] == "BUY" else sell_at
            assert 0 <= records[0].received_monotonic - due < 1.0
    # Each trader's orders went out on their own broker account only.
    assert {r.params["tradingsymbol"] for r in placements(simulator, bob.broker.api_key)} == {"INFY"}
    assert len(placements(simulator, alice.broker.api_key)) == 4 and len(placements(simulator, bob.broker.api_key)) == 2

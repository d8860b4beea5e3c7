"""The protective SL-M follows the stop as it rises, and a trailing stop's high survives a worker restart, end to
end through the REST API: real Kafka, Redis, database, `algo worker` and `algo scheduler`, the simulator's order
book and audit as the judge of what the broker holds and executed."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from core.clock import ScaledClock
from core.settings import Settings
from streams.price_highs import HIGHS_KEY
from tests.fixtures.pipeline import Pipeline, start_service, stop_service, wait_ready
from tests.streams.test_exits_e2e import bought, exit_intents, status_of, tick
from tests.streams.test_pipeline_e2e import eventually

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def stop_orders(simulator: Any, api_key: str, tradingsymbol: str) -> list[Any]:
    """The trader's SL-M orders on the instrument, oldest first."""
    orders = simulator.state.find_orders(api_key)
    return sorted((o for o in orders if o.order_type == "SL-M" and o.instrument.tradingsymbol == tradingsymbol),
                  key=lambda o: o.order_id)  # fmt: skip


def live(orders: list[Any]) -> list[Any]:
    return [o for o in orders if o.status not in ("COMPLETE", "CANCELLED", "REJECTED")]


def sells(simulator: Any, api_key: str, tradingsymbol: str) -> list[tuple[str, str]]:
    orders = simulator.state.find_orders(api_key)
    return sorted((o.order_type, o.status) for o in orders
                  if o.transaction_type == "SELL" and o.instrument.tradingsymbol == tradingsymbol)  # fmt: skip


def placed_at(simulator: Any, api_key: str, symbol: str) -> float:
    """The trigger the first SL-M of the instrument was placed with (the simulator's audit)."""
    first = stop_orders(simulator, api_key, symbol)[0]
    [placed] = [r for r in simulator.state.audit_records(api_key=api_key) if r.action == "place" and r.order_id ==
                first.order_id]  # fmt: skip
    return float(placed.params["trigger_price"])


async def trigger_at(pipeline: Pipeline, simulator: Any, api_key: str, symbol: str, rupees: float) -> Any:
    """Wait until the one live SL-M of the instrument holds this trigger; return it."""

    def following() -> Any:
        resting = live(stop_orders(simulator, api_key, symbol))
        assert len(resting) <= 1, f"two live SL-M for one position: {resting}"
        return resting and resting[0].trigger_price == round(rupees * 100) and resting[0]

    return await eventually(following, 20, f"the SL-M's trigger at {rupees}", pipeline)


async def rewind_tick_feed(settings: Settings) -> None:
    """Commit the workers' tick feed back to each partition's first tick, as if it had never committed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                group_id=settings.topic("algo-worker-ticks"))  # fmt: skip
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.topic("ticks"), n) for n in range(settings.ticks_partitions)]
        consumer.assign(partitions)
        await consumer.commit(await consumer.beginning_offsets(partitions))
    finally:
        await consumer.stop()


async def test_the_protective_stop_follows_a_trailing_stop_up_and_exits_once(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    # Bought at 2,000; the SL-M is placed at the stop (1,950); the trail (10 under the high) is at 1,990 at once.
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:TITAN", 2000.0,
                       stop_loss=..., stop_loss_points=50, trail_points=10, protective_stop=True)  # fmt: skip
    key = user.broker.api_key
    await trigger_at(pipeline, simulator, key, "TITAN", 1990.0)
    assert placed_at(simulator, key, "TITAN") == 1950.0
    # Three steps in a row: the SL-M follows to the last (steps coming while one is in flight are coalesced).
    await tick(pipeline, pinned_clock, simulator, "NSE:TITAN", [2010.0, 2020.0, 2030.0])
    stop = await trigger_at(pipeline, simulator, key, "TITAN", 2020.0)
    history = [row["status"] for row in stop.history_dicts()]
    assert 2 <= stop.modifications <= 4 and history.count("MODIFY PENDING") == stop.modifications, history
    assert len(stop_orders(simulator, key, "TITAN")) == 1  # modified, never replaced
    # 2,025 stays above it; at 2,019 the broker's SL-M and the worker's trailing stop both fire: one exit.
    await tick(pipeline, pinned_clock, simulator, "NSE:TITAN", [2025.0, 2019.0])

    async def exited() -> bool:
        return (await status_of(client, user, sid)).get("state") == "exited_by_sl"

    await eventually(exited, 20, "the exit at the risen stop", pipeline)
    await tick(pipeline, pinned_clock, simulator, "NSE:TITAN", [2010.0, 2000.0])
    assert sells(simulator, key, "TITAN") == [("SL-M", "COMPLETE")], "a second exit reached the broker"
    intents = await exit_intents(pipeline, sid)
    [intent] = [i for i in intents if i["action"] != "RAISE_STOP"]
    assert (intent["action"], intent["exit_kind"], intent["exit_level"]) == ("STOPLOSS", "trailing_stop", 2020.0)
    raised = [i["exit_level"] for i in intents if i["action"] == "RAISE_STOP"]
    assert raised[0] == 1990.0 and raised[-1] == 2020.0 and raised == sorted(set(raised)), raised
    positions = simulator.state.find_orders(key)
    assert sum(o.filled_quantity for o in positions if o.transaction_type == "BUY") == sum(
        o.filled_quantity for o in positions if o.transaction_type == "SELL"
    )  # flat


@pytest.mark.slow  # a minute or so: `make pytest-slow`, which CI runs
async def test_past_its_modification_budget_the_protective_stop_is_cancelled_and_placed_anew(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    pipeline.env["PROTECTIVE_STOP_MODIFICATIONS"] = "2"
    await pipeline.restart("worker", signal.SIGTERM)
    user = await make_user()
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:SUNPHARMA", 2000.0,
                       stop_loss=..., stop_loss_points=50, trail_points=10, protective_stop=True)  # fmt: skip
    key = user.broker.api_key
    await trigger_at(pipeline, simulator, key, "SUNPHARMA", 1990.0)  # placed at 1,950, raised to the trail at once
    for price in (2000.0, 2010.0, 2020.0, 2030.0):  # one step at a time: two modifications, then a new order
        await tick(pipeline, pinned_clock, simulator, "NSE:SUNPHARMA", [price])
        await trigger_at(pipeline, simulator, key, "SUNPHARMA", price - 10)
    first, second = stop_orders(simulator, key, "SUNPHARMA")
    assert (first.status, first.modifications, first.trigger_price) == ("CANCELLED", 2, 200000)
    assert (second.trigger_price, second.modifications) == (202000, 1) and second.tag != first.tag
    cancelled = [r for r in simulator.state.audit_records(api_key=key) if r.action == "cancel"]
    placed = [r for r in simulator.state.audit_records(api_key=key) if r.action == "place" and r.order_id ==
              second.order_id]  # fmt: skip
    assert cancelled[0].seq < placed[0].seq, "the new SL-M was placed before the old one was off the book"
    await tick(pipeline, pinned_clock, simulator, "NSE:SUNPHARMA", [2019.0])

    async def exited() -> bool:
        return (await status_of(client, user, sid)).get("state") == "exited_by_sl"

    await eventually(exited, 20, "the exit at the risen stop", pipeline)
    assert sells(simulator, key, "SUNPHARMA") == [("SL-M", "CANCELLED"), ("SL-M", "COMPLETE")]


@pytest.mark.slow  # a minute or so: `make pytest-slow`, which CI runs
async def test_a_worker_restart_mid_trail_keeps_the_high(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    sid = await bought(client, user, make_strategy, simulator, pipeline, pinned_clock, "NSE:ASIANPAINT", 2000.0,
                       stop_loss=..., stop_loss_points=50, trail_points=10)  # fmt: skip
    redis = Redis.from_url(pipeline.settings.redis_url)
    try:
        # 2,015 (stop 2,005), the high 2,030 (stop 2,020), then a price under it: each in the highs before the next.
        for price in (2015.0, 2030.0, 2026.0):
            await tick(pipeline, pinned_clock, simulator, "NSE:ASIANPAINT", [price])

            async def kept(price: float = price) -> bool:
                raw = await redis.hget(HIGHS_KEY, "NSE:ASIANPAINT")
                return raw is not None and f"{price}".encode() in raw

            await eventually(kept, 10, f"the worker to write {price} to the highs", pipeline)
    finally:
        await redis.aclose()
    stop_service(pipeline.services["worker"], signal.SIGKILL)
    # However far the tick feed had committed, the new worker reads every tick again: 2,015, under the stop of
    # the high kept (2,020), was judged before the high came, and must not exit now.
    await rewind_tick_feed(pipeline.settings)
    pipeline.services["worker"] = start_service("worker", pipeline.env)
    await wait_ready(pipeline.services["worker"])
    # From the entry the stop would be 1,990: 2,019.95 exits only if the high of 2,030 was kept.
    await tick(pipeline, pinned_clock, simulator, "NSE:ASIANPAINT", [2025.0, 2019.95])

    async def exited() -> bool:
        return (await status_of(client, user, sid)).get("state") == "exited_by_sl"

    await eventually(exited, 20, "the exit at the high kept across the restart", pipeline)
    [intent] = await exit_intents(pipeline, sid)
    assert (intent["exit_kind"], intent["exit_level"], intent["trigger_price"]) == ("trailing_stop", 2020.0, 2019.95)

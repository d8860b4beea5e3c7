"""The tick connector (`algo ticker`) as a process, against real Kafka, Redis and the simulator's websocket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from connectors.kite_sim.instruments import default_master
from core.clock import ScaledClock
from core.kafka import ensure_topics
from core.settings import Settings
from storage.runtime import strategy_key, symbol_key
from tests.fixtures.pipeline import settings_env, start_service, stop_service, wait_ready


async def first_tick_of(settings: Settings, instrument: str, within: float) -> dict[str, Any] | None:
    consumer = AIOKafkaConsumer(
        settings.topic("ticks"), bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    tick: dict[str, Any] = orjson.loads(record.value or b"{}")
                    if tick.get("instrument") == instrument:
                        return tick
        return None
    finally:
        await consumer.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the connector reads no database here
async def test_a_strategy_that_no_lifecycle_event_announced_is_still_watched(
    api_settings: Settings, pinned_clock: ScaledClock, redis: Redis, kite_account: Callable[..., Any], simulator: Any
) -> None:
    """Regression for crash-matrix seed 1: the connector restarted just after Redis came back empty and
    after the Kafka broker restarted empty, so it found no running strategy in Redis and never saw the
    STARTED events recovery republished before it joined; it watched nothing until its next restart. Here
    the strategy appears in Redis (as recovery writes it) with no lifecycle event at all."""
    account = kite_account()
    settings = api_settings.model_copy(update={"ticker_resync_seconds": 0.5})
    await ensure_topics(settings)
    env = settings_env(settings, pinned_clock)
    env.update(TICKER_API_KEY=account.api_key, TICKER_ACCESS_TOKEN=account.access_token,
               TICKER_RESYNC_SECONDS="0.5", KITE_TICKER_ROOT=simulator.ticker_root)  # fmt: skip
    ticker = start_service("ticker", env, ready_line="ticker connected; subscribing 0 instruments")
    try:
        await wait_ready(ticker)
        instrument = default_master().by_key("NSE:INFY")
        assert instrument is not None
        runtime_keys = {"instrument": "NSE:INFY", "instrument_token": instrument.instrument_token}
        await redis.hset(strategy_key(9001), mapping=runtime_keys)
        await redis.sadd(symbol_key("NSE:INFY"), "9001")
        tick = await first_tick_of(settings, "NSE:INFY", within=10.0)
        assert tick is not None, "no NSE:INFY tick: the connector never subscribed\n" + ticker.output()
        assert tick["token"] == instrument.instrument_token
        assert any("the lifecycle stream had not" in line for line in ticker.lines), ticker.output()
    finally:
        stop_service(ticker)

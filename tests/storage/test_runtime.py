"""The runtime store's last prices, on a real Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from storage.runtime import RuntimeStore


async def test_restored_prices_fill_what_redis_lost_and_keep_what_was_written_since(redis: Redis) -> None:
    runtime = RuntimeStore(redis)
    await runtime.set_last_prices({"NSE:INFY": 1410.5})  # a tick since Redis came back empty

    await runtime.restore_last_prices({"NSE:INFY": 1400.0, "NSE:WIPRO": 270.0})

    assert await runtime.last_prices(["NSE:INFY", "NSE:WIPRO"]) == {"NSE:INFY": 1410.5, "NSE:WIPRO": 270.0}

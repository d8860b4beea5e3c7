from __future__ import annotations

from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from connectors.broker import BrokerRejected
from connectors.paper import PaperOrderGateway
from core.clock import ManualClock
from storage.runtime import LTP_KEY


async def test_paper_orders_fill_at_the_last_price_and_are_found_by_tag(redis: Redis) -> None:
    gateway = PaperOrderGateway(redis, "7", ManualClock(datetime(2025, 1, 15, 5, 0, tzinfo=UTC)))
    with pytest.raises(BrokerRejected, match="no live price for NSE:INFY"):
        await gateway.place_market_order(exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=5,
                                         product="MIS", tag="t1")  # fmt: skip
    await redis.hset(LTP_KEY, "NSE:INFY", "1501.25")
    order_id = await gateway.place_market_order(
        exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=5, product="MIS", tag="t1"
    )
    order = await gateway.order_status(order_id)
    assert (order.status, order.average_price, order.filled_quantity) == ("COMPLETE", 1501.25, 5)
    found = await gateway.find_by_tag("t1")
    assert found is not None and found.order_id == order_id
    assert await gateway.find_by_tag("never-sent") is None
    # Another trader's paper book is separate.
    assert await PaperOrderGateway(redis, "8", ManualClock(datetime.now(UTC))).find_by_tag("t1") is None

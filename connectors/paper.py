"""A paper broker: MARKET orders fill at once at the last price the tick connector published.

For trying strategies on live Kite market data without sending orders (BROKER_MODE=paper). The order
book lives in Redis, so a restarted worker still finds an order by its tag, as it would at Kite.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from redis.asyncio import Redis

from connectors.broker import BrokerRejected, BrokerUnavailable, ensure_in_time
from connectors.orders import BrokerOrder
from core.clock import Clock
from storage.runtime import LTP_KEY


class PaperOrderGateway:
    def __init__(self, redis: Redis, account: str, clock: Clock) -> None:
        self.redis = redis
        self.account = account
        self.clock = clock

    def _orders_key(self) -> str:
        return f"paper:{self.account}:orders"

    def _tags_key(self) -> str:
        return f"paper:{self.account}:tags"

    async def place_market_order(
        self, *, exchange: str, tradingsymbol: str, side: str, quantity: int, product: str, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        ensure_in_time(leave_by)
        instrument = f"{exchange}:{tradingsymbol}"
        price = await self.redis.hget(LTP_KEY, instrument)
        if price is None:
            raise BrokerRejected(f"no live price for {instrument} yet: paper orders fill at the last tick")
        if quantity <= 0:
            raise BrokerRejected("quantity must be positive")
        order_id = f"PAPER{await self.redis.incr('paper:order_seq')}"
        order = {
            "order_id": order_id, "status": "COMPLETE", "tag": tag, "average_price": float(price),
            "filled_quantity": quantity, "status_message": None, "transaction_type": side,
            "tradingsymbol": tradingsymbol, "exchange": exchange, "product": product,
            "order_timestamp": self.clock.now().isoformat(),
        }  # fmt: skip
        await self._save(order)
        return order_id

    async def place_stop_order(
        self, *, exchange: str, tradingsymbol: str, quantity: int, product: str, trigger_price: float, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        """Rests OPEN and never executes: on paper the pipeline's own stop-loss is the protection."""
        ensure_in_time(leave_by)
        order_id = f"PAPER{await self.redis.incr('paper:order_seq')}"
        order = {
            "order_id": order_id, "status": "OPEN", "tag": tag, "average_price": None, "filled_quantity": 0,
            "status_message": None, "transaction_type": "SELL", "tradingsymbol": tradingsymbol,
            "exchange": exchange, "product": product, "trigger_price": trigger_price,
        }  # fmt: skip
        await self._save(order)
        return order_id

    async def find_square_off(self, exchange: str, tradingsymbol: str, product: str) -> BrokerOrder | None:
        """No broker squares paper positions off."""
        return None

    async def last_price(self, instrument: str) -> float:
        """The last tick's price, the one paper orders fill at."""
        price = await self.redis.hget(LTP_KEY, instrument)
        if price is None:
            raise BrokerUnavailable(f"no live price for {instrument} yet")
        return float(price)

    async def modify_order(self, order_id: str, *, price: float) -> None:
        """Paper market orders fill at once and stops are never modified: nothing rests to re-price."""
        raise BrokerRejected("paper orders are not modified")

    async def modify_stop(self, order_id: str, *, trigger_price: float) -> None:
        """The resting stop's trigger follows the position's stop (it still never executes on paper)."""
        order = await self.order_status(order_id)
        if order.terminal:
            raise BrokerRejected(f"Order cannot be modified as it is {order.status}.")
        raw = orjson.loads(await self.redis.hget(self._orders_key(), order_id))  # type: ignore[arg-type]
        raw["trigger_price"] = trigger_price
        await self._save(raw)

    async def cancel_order(self, order_id: str) -> BrokerOrder:
        order = await self.order_status(order_id)
        if order.terminal:
            return order
        raw = orjson.loads(await self.redis.hget(self._orders_key(), order_id))  # type: ignore[arg-type]
        raw["status"] = "CANCELLED"
        await self._save(raw)
        return BrokerOrder.from_kite(raw)

    async def _save(self, order: Mapping[str, object]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._orders_key(), str(order["order_id"]), orjson.dumps(order))
        pipe.hset(self._tags_key(), str(order["tag"]), str(order["order_id"]))
        await pipe.execute()

    async def order_status(self, order_id: str) -> BrokerOrder:
        raw = await self.redis.hget(self._orders_key(), order_id)
        if raw is None:
            raise BrokerRejected(f"no paper order {order_id}")
        return BrokerOrder.from_kite(orjson.loads(raw))

    async def find_by_tag(self, tag: str) -> BrokerOrder | None:
        order_id = await self.redis.hget(self._tags_key(), tag)
        return await self.order_status(str(order_id)) if order_id is not None else None

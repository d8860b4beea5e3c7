"""Order calls on a trader's Kite session, for the execution engine.

Kept apart from `connectors.broker` (session and instrument calls used by the API) but built on the same
`KiteBroker.call`, so every order call runs in a thread and fails with the same three exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from connectors.broker import BrokerRejected, BrokerSourceRefused, BrokerUnavailable, KiteBroker
from connectors.retrying import broker_retries
from connectors.shared_read import FreshSharedRead

TERMINAL_ORDER_STATUSES = frozenset({"COMPLETE", "CANCELLED", "REJECTED"})
# An order-book read takes Kite tens to a few hundred milliseconds; one still on the wire after this long is
# likely held (a timeout to come), and the next read begins beside it rather than after it.
BOOK_READ_HEDGE_SECONDS = 0.5
BOOK_READ_TRIES = 3


@dataclass(frozen=True, slots=True)
class BrokerOrder:
    order_id: str
    status: str
    tag: str | None
    average_price: float | None
    filled_quantity: int
    status_message: str | None
    trigger_price: float | None = None  # a stop order's trigger (rupees); None for other orders

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_ORDER_STATUSES

    @classmethod
    def from_kite(cls, row: dict[str, Any]) -> BrokerOrder:
        average = row.get("average_price")
        return cls(
            order_id=str(row["order_id"]),
            status=str(row.get("status") or ""),
            tag=row.get("tag"),
            average_price=float(average) if average not in (None, "", 0, 0.0) else None,
            filled_quantity=int(row.get("filled_quantity") or 0),
            status_message=row.get("status_message"),
            trigger_price=float(row["trigger_price"]) if row.get("trigger_price") else None,
        )


class OrderGateway(Protocol):
    # `leave_by` (time.monotonic()): made only if the call can start by then, else BrokerCallLate (nothing sent).
    async def place_market_order(
        self, *, exchange: str, tradingsymbol: str, side: str, quantity: int, product: str, tag: str,
        leave_by: float | None = None,
    ) -> str: ...  # fmt: skip

    async def place_stop_order(
        self, *, exchange: str, tradingsymbol: str, quantity: int, product: str, trigger_price: float, tag: str,
        leave_by: float | None = None,
    ) -> str: ...  # fmt: skip

    async def modify_order(self, order_id: str, *, price: float) -> None: ...

    async def modify_stop(self, order_id: str, *, trigger_price: float) -> None: ...

    async def cancel_order(self, order_id: str) -> BrokerOrder: ...

    async def order_status(self, order_id: str) -> BrokerOrder: ...

    async def find_by_tag(self, tag: str) -> BrokerOrder | None: ...

    async def find_square_off(self, exchange: str, tradingsymbol: str, product: str) -> BrokerOrder | None: ...

    async def last_price(self, instrument: str) -> float: ...


class KiteOrderGateway:
    def __init__(
        self,
        broker: KiteBroker,
        algo_id: str | None = None,
        read_permit: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        """`read_permit`: taken around each order-book read, so that the trader's reads from every process stay
        under Kite's limit together (each process alone spaces its reads `broker_book_reads_per_second` apart)."""
        self.broker = broker
        self._read_permit = read_permit
        # Kite refuses MARKET and SL-M orders without market protection (April 2026); the algo id is the
        # exchange's registration of the trader's strategy, when the account has one.
        self._order_extras: dict[str, Any] = {"market_protection": broker.settings.broker_market_protection}
        if algo_id:
            self._order_extras["algo_id"] = algo_id
        self._order_book = FreshSharedRead(
            self._read_book,
            spacing=1 / broker.settings.broker_book_reads_per_second,
            hedge_after=BOOK_READ_HEDGE_SECONDS,
        )

    async def _read_book(self) -> list[dict[str, Any]]:
        # Retried here, once for everyone sharing the read, rather than by each caller with its own backoff: after
        # a restart dozens of one trader's lookups wait on this read, and a single 5xx or 429 sent every one of them
        # into seconds of backoff.
        async for try_ in broker_retries(BOOK_READ_TRIES, initial=0.05, most=0.2, jitter=0.05):
            with try_:
                if self._read_permit is None:
                    return await self.broker.call(self.broker.client.orders)
                async with self._read_permit():
                    return await self.broker.call(self.broker.client.orders)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def place_market_order(
        self, *, exchange: str, tradingsymbol: str, side: str, quantity: int, product: str, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        order_id = await self.broker.order_call(
            self.broker.order_client.place_order,
            leave_by=leave_by,
            variety="regular",
            exchange=exchange,
            tradingsymbol=tradingsymbol,
            transaction_type=side,
            quantity=quantity,
            product=product,
            order_type="MARKET",
            tag=tag,
            **self._order_extras,
        )
        return str(order_id)

    async def place_stop_order(
        self, *, exchange: str, tradingsymbol: str, quantity: int, product: str, trigger_price: float, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        """A SELL SL-M resting at the broker: it becomes a market order when the price trades at the trigger."""
        order_id = await self.broker.order_call(
            self.broker.order_client.place_order,
            leave_by=leave_by,
            variety="regular",
            exchange=exchange,
            tradingsymbol=tradingsymbol,
            transaction_type="SELL",
            quantity=quantity,
            product=product,
            order_type="SL-M",
            trigger_price=trigger_price,
            tag=tag,
            **self._order_extras,
        )
        return str(order_id)

    async def modify_order(self, order_id: str, *, price: float) -> None:
        """Re-price a resting order as a limit at `price` (a resting exit being chased)."""
        await self.broker.order_call(
            self.broker.order_client.modify_order, variety="regular", order_id=order_id, order_type="LIMIT", price=price
        )

    async def last_price(self, instrument: str) -> float:
        """The broker's last traded price of "EXCHANGE:TRADINGSYMBOL" (paced to Kite's quote limit)."""
        return await self.broker.last_price(instrument)

    async def modify_stop(self, order_id: str, *, trigger_price: float) -> None:
        """Move a resting SL-M's trigger (the protective stop following a risen stop)."""
        await self.broker.order_call(
            self.broker.order_client.modify_order, variety="regular", order_id=order_id, order_type="SL-M",
            trigger_price=trigger_price,
        )  # fmt: skip

    async def cancel_order(self, order_id: str) -> BrokerOrder:
        """Cancel and return the order's final state; an order that executed first comes back COMPLETE."""
        try:
            await self.broker.order_call(self.broker.order_client.cancel_order, variety="regular", order_id=order_id)
        except BrokerSourceRefused:
            raise  # not an answer about the order: the cancel never reached it
        except BrokerRejected:
            pass  # Kite refuses to cancel a completed order: its status below says what happened
        return await self.order_status(order_id)

    async def order_status(self, order_id: str) -> BrokerOrder:
        """The order's state now, from the trader's shared order-book read rather than its own `order_history`.

        An order is polled until it fills, and `order_history` would cost a request per order per poll: a
        trader's ten BUYs at 09:30 would go far over Kite's 10 a second for such calls. Orders followed at
        the same time share a read, and a trader's reads start at most `broker_book_reads_per_second` a second.
        """
        for row in await self._order_book():
            if str(row.get("order_id")) == order_id:
                return BrokerOrder.from_kite(row)
        raise BrokerUnavailable(f"order {order_id} is not in the broker's order book yet")

    async def find_square_off(self, exchange: str, tradingsymbol: str, product: str) -> BrokerOrder | None:
        """The broker's own intraday square-off of the instrument (Zerodha's at 15:20): a completed SELL in the
        trader's order book that carries no tag of ours."""
        for row in await self._order_book():
            if (
                not row.get("tag") and row.get("status") == "COMPLETE" and row.get("transaction_type") == "SELL"
                and row.get("exchange") == exchange and row.get("tradingsymbol") == tradingsymbol
                and row.get("product") == product
            ):  # fmt: skip
                return BrokerOrder.from_kite(row)
        return None

    async def find_by_tag(self, tag: str) -> BrokerOrder | None:
        """The broker's own record of an order carrying `tag` (the intent), if it ever received one."""
        orders = await self._order_book()
        matches = [BrokerOrder.from_kite(row) for row in orders if row.get("tag") == tag]
        if not matches:
            return None
        # Should there be several (a broker-side duplicate), the filled one is the position we hold.
        matches.sort(key=lambda order: (order.status == "COMPLETE", order.filled_quantity), reverse=True)
        return matches[0]

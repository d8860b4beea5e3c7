"""Orders the broker leaves resting: an exit is chased until it fills, a BUY is cancelled.

Since April 2026 every MARKET order carries market protection, and Kite treats it as a limit at the last price
-/+ the protection: in a fast move it rests OPEN while the price runs away. An exit must never be left so:

- it is re-priced by modify, a limit at the current price, at most `exit_chase_modifications` times (Kite allows
  25 per order), then cancelled and placed anew as a fresh protected market order, and so on until it fills;
- the trader is told once that the exit is being chased;
- each step is persisted before its broker call (REPRICE on the attempt row, CANCEL as `cancelling`), so a
  redelivery after a crash knows a cancelled order was ours to replace, never a refusal;
- a delivery that finds the order already resting (a redelivery, a recovery) does not modify it again: it cancels
  and replaces, so no order is ever modified past Kite's limit whatever happens to the workers.

A BUY resting unfilled past `buy_rest_seconds` is cancelled, never chased; the run then stops with a notice.
"""

from __future__ import annotations

import asyncio
import logging
import math

from connectors.broker import BrokerError, BrokerRejected, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from core.settings import Settings
from schemas.events import NotificationKind, OrderIntent
from storage.models import Strategy
from storage.runtime import RuntimeStore
from streams.execution.context import EngineContext
from streams.execution.ledger import Ledger
from streams.execution.order_lifecycle import OrderEvent, OrderState, TrackedOrder, broker_event
from streams.execution.placement import Placement
from streams.execution.priority import PRIORITY, chase_priority
from streams.execution.reconcile import EXITS

log = logging.getLogger(__name__)

CHASED = EXITS  # a protective stop (PROTECT) is meant to rest: it is never chased
TICK = 0.05  # NSE equity tick: the stop-loss and every strategy price are on it


def limit_for_exit(last_price: float) -> float:
    """A SELL limit at the current price, on the tick grid and never above it (it stays marketable)."""
    return max(TICK, round(math.floor(round(last_price / TICK, 6)) * TICK, 2))


def _no_turn() -> None:
    return None


class RestingOrders:
    def __init__(self, context: EngineContext, ledger: Ledger, placement: Placement) -> None:
        self.context = context
        self.ledger = ledger
        self.placement = placement
        self.prices = RuntimeStore(context.redis)

    @property
    def _settings(self) -> Settings:
        return self.context.settings

    async def chase(
        self,
        gateway: OrderGateway,
        intent: OrderIntent,
        strategy: Strategy,
        order: TrackedOrder,
        current: BrokerOrder | None,
        *,
        fresh: bool,
    ) -> tuple[BrokerOrder, TrackedOrder]:
        """Escalate a resting exit until it fills; the filled broker order and the tracked order it ended as (a
        replacement's, if the first was cancelled). `fresh`: this delivery placed the order (it may be modified);
        otherwise it was found resting and is cancelled and replaced at once. Raises BrokerRejected if the broker
        refuses the exit (the caller fails the intent as for any refusal)."""
        settings = self._settings
        budget = settings.exit_chase_modifications
        repriced = 0 if fresh else budget
        priority = chase_priority(intent.action)
        told = False
        while True:
            if current is not None and current.status == "COMPLETE":
                self._apply(order, OrderEvent.FILLED)
                return current, order
            if current is not None and current.status in ("REJECTED", "CANCELLED"):
                if order.state is OrderState.CANCELLING and current.status == "CANCELLED":
                    # Our own cancel: the exit is placed anew (the old order is off the book, so never two live).
                    await self.ledger.moved(intent, order, OrderEvent.CANCELLED, message="cancelled to be replaced")
                    order = order.replacement()
                    current, _ = await self.placement.place(gateway, intent, strategy, order, _no_turn)
                    repriced = 0
                    continue
                self._apply(order, broker_event(current.status))
                raise BrokerRejected(current.status_message or f"exit {current.status.lower()} by the broker")
            if not told:
                told = True
                await self.ledger.notify(
                    intent, NotificationKind.EXIT_CHASED, "Exit being chased",
                    f"{intent.action.value} of {strategy.quantity} {strategy.instrument} rests unfilled at the broker "
                    "(the price moved past its market protection): it is re-priced until it fills",
                )  # fmt: skip
            if current is not None and order.state is OrderState.OPEN and order.order_id is not None:
                price = await self._price_now(gateway, strategy.instrument, repriced) if repriced < budget else None
                if price is not None:
                    repriced += 1
                    limit = limit_for_exit(price)
                    await self.ledger.moved(intent, order, OrderEvent.REPRICE,
                                            message=f"re-priced to {limit:.2f} ({repriced}/{budget})")  # fmt: skip
                    try:
                        async with self.placement.rate_limiter.permit(intent.user_id, priority):
                            await gateway.modify_order(order.order_id, price=limit)
                    except BrokerRejected as exc:  # filled meanwhile, or the broker will not modify it: cancel next
                        log.info("intent %s: modify refused (%s)", intent.intent_id, exc.message)
                        repriced = budget
                    except BrokerUnavailable:
                        pass  # its status read below says what happened
                else:
                    await self.ledger.moved(intent, order, OrderEvent.CANCEL, message="cancel, to place anew")
            if order.state is OrderState.CANCELLING and order.order_id is not None:
                try:
                    async with self.placement.rate_limiter.permit(intent.user_id, priority):
                        current = await gateway.cancel_order(order.order_id)
                except BrokerUnavailable:
                    current = None
                if current is not None and current.terminal:
                    continue
            await asyncio.sleep(settings.exit_chase_interval_seconds)
            current = await self._status(gateway, order)

    async def _price_now(self, gateway: OrderGateway, instrument: str, repriced: int) -> float | None:
        """The price to re-price at: first the last one the workers wrote; once a limit at it has not filled, or
        where Redis has none, also the broker's, and the lower of the two (a SELL limit that stays marketable).
        Redis restarted empty has no price for an instrument that has not ticked since, and may hold an older one
        put back after it; at such a price the limit never fills and the exit would be cancelled and placed anew,
        round after round, while the position stays open (crash matrix)."""
        known = await self.prices.last_price(instrument)
        if known is not None and repriced == 0:
            return known
        try:
            broker = await gateway.last_price(instrument)
        except BrokerError as exc:
            log.info("no broker price for %s to re-price at (%s)", instrument, exc)
            return known
        return broker if known is None else min(known, broker)

    async def resume(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy, order: TrackedOrder
    ) -> tuple[BrokerOrder, TrackedOrder]:
        """A redelivered exit whose order we were cancelling to replace: finish that, then chase as usual."""
        found = await self.placement.reconciler.lookup(gateway, order.tag)
        if found is None:  # the cancel's order never arrived? It did (it was OPEN): ask again later
            raise BrokerUnavailable(f"exit order {order.tag} not in the broker's order book yet")
        order.order_id = found.order_id
        return await self.chase(gateway, intent, strategy, order, found, fresh=False)

    async def cancel_resting_buy(
        self, gateway: OrderGateway, intent: OrderIntent, order: TrackedOrder, current: BrokerOrder
    ) -> BrokerOrder:
        """Wait up to `buy_rest_seconds` for a resting BUY to fill; then cancel it. Returns it filled, or raises
        BrokerRejected (cancelled: the caller stops the run with a notice)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.buy_rest_seconds
        while current.status != "COMPLETE" and not current.terminal and loop.time() < deadline:
            await asyncio.sleep(self._settings.exit_chase_interval_seconds)
            current = await self._status(gateway, order) or current
        if not current.terminal:
            await self.ledger.moved(intent, order, OrderEvent.CANCEL, message="BUY rested unfilled: cancelled")
            async with self.placement.rate_limiter.permit(intent.user_id, PRIORITY[intent.action]):
                current = await gateway.cancel_order(order.order_id or current.order_id)
        if current.status == "COMPLETE":
            self._apply(order, OrderEvent.FILLED)
            return current
        self._apply(order, broker_event(current.status))
        seconds = self._settings.buy_rest_seconds
        raise BrokerRejected(f"BUY rested unfilled at the broker for {seconds:.0f}s and was cancelled")

    async def cancel_unwanted(
        self, gateway: OrderGateway, intent: OrderIntent, order: TrackedOrder, current: BrokerOrder
    ) -> BrokerOrder:
        """Take an order that rests unfilled and no longer fits off the book at once; its final state (COMPLETE
        if it filled first). Still open after the cancel: BrokerUnavailable (the intent is retried, and asks)."""
        await self.ledger.moved(intent, order, OrderEvent.CANCEL, message="no longer wanted: cancelled")
        async with self.placement.rate_limiter.permit(intent.user_id, PRIORITY[intent.action]):
            final = await gateway.cancel_order(order.order_id or current.order_id)
        if not final.terminal:
            raise BrokerUnavailable(f"order {final.order_id} still open after its cancel")
        self._apply(order, broker_event(final.status))
        return final

    async def _status(self, gateway: OrderGateway, order: TrackedOrder) -> BrokerOrder | None:
        try:
            return await gateway.order_status(order.order_id or "")
        except BrokerUnavailable:
            return None

    @staticmethod
    def _apply(order: TrackedOrder, event: OrderEvent) -> None:
        if order.state is not OrderState.FILLED or event is not OrderEvent.FILLED:
            order.apply(event)


__all__ = ["CHASED", "RestingOrders", "limit_for_exit"]

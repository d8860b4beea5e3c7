"""The optional SL-M order at the broker that guards a position while this system is down.

Placed after the BUY fills (intent id `{strategy}:{day}:{run}:PROTECT`, logged like any order, resting in
TRIGGER_PENDING); released before any other exit: cancelled, or, if the broker already executed it, adopted as
that exit (the two never both execute).
"""

from __future__ import annotations

import logging

from connectors.broker import BrokerError, BrokerNotSent, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from connectors.retrying import broker_retries
from schemas.events import Action, OrderIntent, OrderStatus, intent_id_for
from storage.models import Strategy
from streams.execution.context import EngineContext
from streams.execution.ledger import Ledger, RunHistory
from streams.execution.limits import BrokerRateLimiter
from streams.execution.order_lifecycle import OrderEvent, OrderState, TrackedOrder, broker_event
from streams.execution.priority import PRIORITY
from streams.execution.reconcile import Reconciler, apply

log = logging.getLogger(__name__)


class ProtectiveStops:
    def __init__(
        self, context: EngineContext, ledger: Ledger, reconciler: Reconciler, rate_limiter: BrokerRateLimiter
    ) -> None:
        self.context = context
        self.ledger = ledger
        self.reconciler = reconciler
        self.rate_limiter = rate_limiter  # placing and cancelling it count against the trader's order limits

    @staticmethod
    def intent(intent: OrderIntent) -> OrderIntent:
        """The protective stop of the position `intent` belongs to."""
        protect_id = intent_id_for(intent.strategy_id, intent.trading_day, intent.run, Action.PROTECT, intent.cycle)
        return intent.model_copy(update={"intent_id": protect_id, "action": Action.PROTECT})

    async def place(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy, entry_price: float | None
    ) -> None:
        stop_price = strategy.exits.stop_price(entry_price)  # a stop in points or percent, from this entry
        if stop_price is None:
            log.warning("protective stop for strategy %s not placed: no entry price to resolve it", strategy.id)
            return
        protect = self.intent(intent)
        await self.send(gateway, protect, TrackedOrder(protect.intent_id, Action.PROTECT, protect.broker_tag),
                        strategy, stop_price)  # fmt: skip

    async def send(
        self, gateway: OrderGateway, protect: OrderIntent, order: TrackedOrder, strategy: Strategy, trigger: float
    ) -> None:
        """Place the SL-M `order` at `trigger`, logged before the call. Refused, the position has no broker-side
        stop (the worker's own check still guards it, and the exit's release finds nothing to cancel); unanswered,
        the exit's release or the next step asks the broker by its tag."""
        await self.ledger.sent(protect, order, price=trigger)  # its trigger
        try:
            async with self.rate_limiter.permit(protect.user_id, PRIORITY[Action.PROTECT]):
                order.order_id = await gateway.place_stop_order(
                    exchange=strategy.exchange, tradingsymbol=strategy.tradingsymbol, quantity=strategy.quantity,
                    product=strategy.product, trigger_price=trigger, tag=order.tag, leave_by=order.leave_by,
                )  # fmt: skip
        except BrokerNotSent as exc:  # nothing placed: the worker's own check guards the position, as if refused
            await self.ledger.not_sent(protect, order, exc)
            log.warning("protective stop of strategy %s not placed: %s", strategy.id, exc.message)
            return
        except BrokerUnavailable as exc:
            await self.ledger.moved(protect, order, OrderEvent.TIMED_OUT, message=exc.message)
            return
        except BrokerError as exc:
            await self.ledger.moved(protect, order, OrderEvent.REJECTED, message=exc.message)
            log.warning("protective stop of strategy %s not placed: %s", strategy.id, exc.message)
            return
        await self.ledger.moved(protect, order, OrderEvent.TRIGGER_PENDING)
        await self.context.set_runtime(strategy.id, protective_order=order.order_id)

    async def release(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy, history: RunHistory
    ) -> BrokerOrder | None:
        """Cancel the protective order (`history`: the run's order log, as the exit read it); returns it if the
        broker had already executed it."""
        if not strategy.protective_stop:
            return None
        protect = self.intent(intent)
        order = history.order(protect.intent_id, Action.PROTECT, protect.broker_tag)
        if order.recorded:
            if order.state is OrderState.FILLED and order.order_id:
                return await gateway.order_status(order.order_id)
            return None
        found = await self.reconciler.lookup(gateway, order.tag)
        if found is None:
            if order.state is OrderState.SENDING:
                log.warning("protective stop of strategy %s was never received by the broker", strategy.id)
            return None
        settled = found
        if not settled.terminal:
            retrying = broker_retries(4, initial=0.2, most=2.0, jitter=0.1)
            async for try_ in retrying:
                with try_:
                    async with self.rate_limiter.permit(intent.user_id, PRIORITY[intent.action]):
                        settled = await gateway.cancel_order(settled.order_id)
        apply(order, broker_event(settled.status))
        status = OrderStatus.FILLED if order.state is OrderState.FILLED else OrderStatus.CANCELLED
        result = self.ledger.result(
            protect,
            order,
            status,
            broker_order_id=settled.order_id,
            price=settled.average_price,
            message=f"protective stop {settled.status.lower()}",
        )
        await self.ledger.record_result(result, protect)
        return settled if status is OrderStatus.FILLED else None

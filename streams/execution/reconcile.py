"""Reconciliation: asking the broker about an order by its tag, and turning the answer into state-machine events.

Every path that must know whether an order reached the broker comes here: a redelivered intent whose attempt has
no answer, a retry after a timeout, an exit that needs the run's other unsettled orders settled first (a BUY a
dead worker never recorded, a STOPLOSS at the broker when the SELL falls due, an exit given up after its
retries), and the protective stop's release. None of them asks the broker any other way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from connectors.broker import BrokerRejected, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from connectors.retrying import broker_retries
from schemas.events import Action, OrderIntent, OrderResult, OrderStatus
from storage.models import Strategy
from streams.execution.context import EngineContext
from streams.execution.ledger import Ledger, RunHistory
from streams.execution.order_lifecycle import OrderEvent, OrderState, Refused, TrackedOrder, broker_event

log = logging.getLogger(__name__)

# The orders that close a position (a resting protective stop, PROTECT, is released, not settled as one).
EXITS = frozenset({Action.SELL, Action.STOPLOSS, Action.TARGET, Action.EXIT})


def apply(order: TrackedOrder, event: OrderEvent) -> bool:
    """Apply a broker answer; an answer the order's state refuses is logged and ignored."""
    try:
        order.apply(event)
    except Refused as refused:
        log.warning("%s (intent %s): ignored", refused, order.intent_id)
        return False
    return True


@dataclass(frozen=True, slots=True)
class RestingOrder:
    """Another order of the run, its delivery gone, found resting unfilled at the broker: an exit that is the
    position's exit already, or a BUY that may still open the position."""

    intent: OrderIntent
    order: TrackedOrder
    broker_order: BrokerOrder


@dataclass(frozen=True, slots=True)
class Settled:
    adopted: bool  # some order's outcome was recorded: the run's position is to be read again
    resting: RestingOrder | None = None  # to be settled at the broker before anything else is sent


class Reconciler:
    def __init__(self, context: EngineContext, ledger: Ledger) -> None:
        self.context = context
        self.ledger = ledger

    @property
    def confirm_timeout(self) -> float:
        return max(self.context.settings.broker_timeout_seconds, 5.0)

    async def ask(self, gateway: OrderGateway, order: TrackedOrder, *, tries: int = 4) -> BrokerOrder | None:
        """What the broker holds under the order's tag, followed to a final status, its answer applied to the
        order; None (the order back to INTENDED) if it holds nothing. Transient failures of the lookup are tried
        `tries` times, then propagate; a final REJECTED or CANCELLED raises BrokerRejected, like `confirm`."""
        found = await self.lookup(gateway, order.tag, tries)
        if found is None:
            apply(order, OrderEvent.NOT_FOUND)
            return None
        order.order_id = found.order_id
        return await self.confirm(gateway, found.order_id, found, order)

    async def lookup(self, gateway: OrderGateway, tag: str, tries: int = 4) -> BrokerOrder | None:
        """The broker's order for `tag`, retrying transient failures briefly (a STOPLOSS may queue behind)."""
        retrying = broker_retries(tries, initial=0.1, most=1.0, jitter=0.05)
        async for try_ in retrying:
            with try_:
                return await gateway.find_by_tag(tag)
        return None  # pragma: no cover - tenacity either returns or reraises

    async def confirm(
        self, gateway: OrderGateway, order_id: str, known: BrokerOrder | None = None, order: TrackedOrder | None = None,
        *, within: float | None = None,
    ) -> BrokerOrder:  # fmt: skip
        """Follow the broker's order to a final status (MARKET orders fill in milliseconds); if it is still open
        after `within` seconds (default `confirm_timeout`), return it open. Raises BrokerRejected if it ends
        rejected or cancelled."""
        current = known
        delay = 0.02
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.confirm_timeout if within is None else within)
        while current is None or not current.terminal:
            if current is not None:
                if loop.time() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            try:
                current = await gateway.order_status(order_id)
            except BrokerUnavailable:
                if loop.time() > deadline:
                    raise
                current = None
                await asyncio.sleep(delay)
        if order is not None:
            apply(order, broker_event(current.status))
        if current.status in ("REJECTED", "CANCELLED"):
            raise BrokerRejected(current.status_message or f"order {current.status.lower()} by the broker")
        return current

    async def let_settle(self, order: TrackedOrder) -> None:
        """Give an order that a dead delivery may have sent time to reach the broker before asking about it.

        An attempt still SENDING belongs to a delivery that never heard back: its worker died mid-call (or lost
        its lock to a Redis restart). The request may still be on its way; asked too soon, the broker knows
        nothing of it and the order would be placed twice. So wait until that attempt is as old as the broker
        timeout, as long as its sender would have waited for the answer itself. Once a dead holder's lock is
        taken over as soon as its lease lapses, this wait is what keeps that early takeover safe."""
        if order.state is not OrderState.SENDING or order.sent_at is None:
            return
        timeout = self.context.settings.broker_timeout_seconds
        remaining = timeout + self.context.clock.seconds_until(order.sent_at)
        if remaining > 0:
            log.info("intent %s: an earlier attempt got no answer; %.1fs for it to reach the broker before asking",
                     order.intent_id, remaining)  # fmt: skip
            await asyncio.sleep(min(remaining, timeout))

    async def settle_run(self, intent: OrderIntent, strategy: Strategy, history: RunHistory) -> Settled:
        """Before an exit: settle the run's other orders whose fate the log does not know.

        "No position" may only mean the BUY's outcome was never recorded (a worker died mid-BUY), and "still
        open" that another exit's was (its STOPLOSS reached the broker, and now the SELL is due), or that an exit
        given up after its retries reached the broker after all (the auto-stop's square-off follows it): ask the
        broker about those first, or the position is left unsold or sold twice (crash matrix seeds 4, 9, 16).
        An order found resting at the broker is not settled here but returned: another exit is the position's exit,
        to be chased, and nothing may be sent beside it; a BUY may still fill, and must be ended first.
        """
        if not intent.action.is_exit or intent.run != strategy.run:
            return Settled(False)
        position = history.position
        others = [order for order in history.orders().values() if order.intent_id != intent.intent_id]
        unrecorded = [o for o in others if o.attempts > 0 and not o.recorded]
        candidates = EXITS if position.open else {Action.BUY}
        given_up = [o for o in others if o.recorded and o.state is OrderState.GIVEN_UP and o.action in EXITS]
        adopted = False
        settle = sorted((o for o in unrecorded if o.action in candidates), key=lambda o: o.action.value)
        if position.open:
            settle += sorted(given_up, key=lambda o: o.action.value)
        for order in settle:
            outcome = await self._adopt(intent, order)
            if isinstance(outcome, RestingOrder):
                return Settled(adopted, outcome)
            adopted = outcome or adopted
        return Settled(adopted)

    async def _adopt(self, intent: OrderIntent, order: TrackedOrder) -> bool | RestingOrder:
        """Record what the broker says of another order of the run (attempted with no result, or given up, which
        the broker's order then corrects); False if the broker has none. An order the broker holds unfilled (a
        protected market order resting in a fast move) is returned as it is, not recorded as placed: a resting
        exit recorded so leaves the position open in the log and a second exit would be sent beside it, and a
        resting BUY recorded so reads as a position held, and the exit would sell what was never bought."""
        other = intent.model_copy(update={"intent_id": order.intent_id, "action": order.action})
        given_up = order.state is OrderState.GIVEN_UP
        await self.let_settle(order)
        # A transient failure propagates (the lane retries the exit shortly); a refusal means nothing to adopt.
        try:
            found = await self.ask(await self.context.gateways(intent.user_id), order)
        except BrokerRejected:
            return False
        if found is None:
            return False
        if not found.terminal:
            log.warning("intent %s: %s order %s of the same run rests unfilled at the broker: it is settled first",
                        intent.intent_id, order.action.value, found.order_id)  # fmt: skip
            return RestingOrder(other, order, found)
        log.warning("intent %s: adopting %s order %s that was %s", intent.intent_id, order.action.value,
                    found.order_id, "given up as failed" if given_up else "never recorded")  # fmt: skip
        await self.record_found(other, order, found, corrected=given_up)
        return True

    async def record_found(
        self, intent: OrderIntent, order: TrackedOrder, found: BrokerOrder, *, corrected: bool = False
    ) -> OrderResult:
        """Settle `intent` with the order the broker holds for it; `corrected`: its given-up result is replaced."""
        status = OrderStatus.FILLED if found.status == "COMPLETE" else OrderStatus.PLACED
        result = self.ledger.result(intent, order, status, broker_order_id=found.order_id,
                                    price=found.average_price)  # fmt: skip
        if corrected:
            result = result.model_copy(update={"message": "found at the broker after it was given up"})
            await self.ledger.correct_result(intent, result)
        else:
            await self.ledger.record_result(result, intent)
        return result

"""The protective SL-M follows the position's stop as it rises (a RAISE_STOP intent from the stop-loss worker).

- The worker sends a RAISE_STOP each time a protected position's stop (trailing, moved to cost) has risen at least
  `protective_stop_step_ticks` above the last level it sent; it runs in the strategy's lane, under its lock, so an
  exit decided before it has released the protective order already, and one decided after it waits one call.
- Coalesced: steps that arrive while a modification is in flight are not sent one by one. Each RAISE_STOP raises
  the trigger to the highest level this worker has been asked for; the ones queued behind it find the trigger
  there already and send nothing.
- A modification is an order call: logged before it (MODIFYING, a new attempt row on the PROTECT order whose price
  is the trigger asked for, then the trigger the order holds), through the trader's egress and rate budget, after
  every exit and outside the exits' reserve. Refused (the price is already at the new trigger, the day has no
  room), the order stays as it was: still a stop, only a lower one.
- Kite allows 25 modifications per order: past `protective_stop_modifications` the order is cancelled and, once
  the broker confirms the cancel, placed anew at the risen stop under the intent's next tag. Cancel first: two live
  SL-M for one position could both trigger and sell it twice. For that one round trip the position has no broker
  stop; the worker's own tick check guards it meanwhile, as it guards every position.
- An exit's release cancels (or adopts, if it executed) whichever protective order the log's last tag names.
"""

from __future__ import annotations

import logging

from connectors.broker import BrokerError, BrokerRejected, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from schemas.events import Action, OrderIntent
from storage.models import OrderLogKind, Strategy
from streams.execution.context import EngineContext
from streams.execution.ledger import Ledger, RunHistory
from streams.execution.limits import BrokerRateLimiter, DayBudgetExhausted
from streams.execution.order_lifecycle import OrderEvent, OrderState, TrackedOrder, broker_event
from streams.execution.priority import PRIORITY
from streams.execution.protective import ProtectiveStops
from streams.execution.reconcile import Reconciler, apply

log = logging.getLogger(__name__)

RESTING = frozenset({"TRIGGER PENDING", "OPEN"})  # an SL-M waiting for its trigger (OPEN: the paper broker's word)
OUT_OF_MODIFICATIONS = "modifications"  # in Kite's refusal: "Maximum allowed order modifications exceeded."


class StopFollower:
    def __init__(
        self, context: EngineContext, ledger: Ledger, reconciler: Reconciler, rate_limiter: BrokerRateLimiter,
        protection: ProtectiveStops,
    ) -> None:  # fmt: skip
        self.context = context
        self.protection = protection
        self.ledger = ledger
        self.reconciler = reconciler
        self.rate_limiter = rate_limiter
        self._wanted: dict[tuple[int, int], float] = {}  # (strategy, run) -> the highest level asked for

    def note(self, intent: OrderIntent) -> None:
        """A RAISE_STOP has arrived (perhaps queued behind another): the next one executed goes up to it."""
        key = (intent.strategy_id, intent.run)
        if intent.exit_level is not None and intent.exit_level > self._wanted.get(key, 0.0):
            self._wanted[key] = intent.exit_level

    async def follow(self, intent: OrderIntent, strategy: Strategy, history: RunHistory) -> None:
        key = (intent.strategy_id, intent.run)
        wanted = max(intent.exit_level or 0.0, self._wanted.get(key, 0.0))
        position = history.position
        protect = ProtectiveStops.intent(intent)
        order = history.order(protect.intent_id, Action.PROTECT, protect.broker_tag)
        if not strategy.protective_stop or intent.run != strategy.run or not position.open or order.recorded:
            self._wanted.pop(key, None)  # exited, released, or no protective stop: nothing to follow
            return
        if order.attempts == 0:
            return  # not placed (yet): it is placed at the configured stop, and the next step raises it
        gateway = await self.context.gateways(intent.user_id)
        held = self._trigger(history, order, strategy.exits.stop_price(position.entry_price))
        if order.state is not OrderState.TRIGGER_PENDING:
            held = await self._settle(gateway, protect, order, held)
            if order.state is OrderState.CANCELLED:  # cancelled by us to be replaced, before a restart
                await self._place_anew(gateway, protect, strategy, order, wanted)
            if order.state is not OrderState.TRIGGER_PENDING:
                return
        if held is not None and wanted <= held:
            return  # a later step got there first (coalesced), or a redelivery
        budget = self.context.settings.protective_stop_modifications
        modifications = self._modifications(history, order)
        if modifications < budget and order.state is OrderState.TRIGGER_PENDING:
            if await self._modify(gateway, protect, order, held, wanted, f"({modifications + 1}/{budget})"):
                return
        if order.state is OrderState.TRIGGER_PENDING:
            await self._replace(gateway, protect, strategy, order, wanted)

    # ------------------------------------------------------------------------------------------- steps

    async def _modify(
        self, gateway: OrderGateway, protect: OrderIntent, order: TrackedOrder, held: float | None, wanted: float,
        count: str,
    ) -> bool:  # fmt: skip
        """Raise the trigger by modify; False if the broker is out of modifications for it (to be replaced)."""
        before = f"{held:.2f}" if held is not None else "?"
        await self.ledger.modifying(protect, order, wanted, f"trigger {before} -> {wanted:.2f} {count}")
        try:
            async with self.rate_limiter.permit(protect.user_id, PRIORITY[Action.RAISE_STOP]):
                await gateway.modify_stop(order.order_id or "", trigger_price=wanted)
        except DayBudgetExhausted as exc:
            await self.ledger.settled_modify(protect, order, OrderEvent.TRIGGER_PENDING, held, f"not modified: {exc}")
            return True
        except BrokerUnavailable as exc:
            # Modified or not: left MODIFYING, and the next step (or the exit's release) asks the broker.
            order.apply(OrderEvent.TIMED_OUT)
            log.warning("protective stop %s: modify unanswered (%s)", order.tag, exc.message)
            return True
        except BrokerRejected as exc:
            current = await self._status(gateway, order)
            if current is None:
                order.apply(OrderEvent.TIMED_OUT)
                return True
            if current.terminal:  # it executed (or went) meanwhile: the exit's release records it
                await self.ledger.settled_modify(protect, order, broker_event(current.status), held,
                                                 f"not modified: {current.status.lower()}")  # fmt: skip
                return True
            await self.ledger.settled_modify(protect, order, OrderEvent.TRIGGER_PENDING, current.trigger_price or held,
                                             f"modify refused: {exc.message}")  # fmt: skip
            return OUT_OF_MODIFICATIONS not in exc.message
        await self.ledger.settled_modify(protect, order, OrderEvent.TRIGGER_PENDING, wanted,
                                         f"trigger {wanted:.2f} {count}")  # fmt: skip
        return True

    async def _replace(
        self, gateway: OrderGateway, protect: OrderIntent, strategy: Strategy, order: TrackedOrder, wanted: float
    ) -> None:
        """Out of modifications: cancel, and only once the broker says it is cancelled, place anew at `wanted`."""
        await self.ledger.moved(protect, order, OrderEvent.CANCEL,
                                message=f"cancel, to place anew at {wanted:.2f} (out of modifications)")  # fmt: skip
        try:
            async with self.rate_limiter.permit(protect.user_id, PRIORITY[Action.RAISE_STOP]):
                settled = await gateway.cancel_order(order.order_id or "")
        except (BrokerError, DayBudgetExhausted) as exc:
            # Left CANCELLING: the next step or the exit's release asks the broker by its tag.
            log.warning("protective stop %s: cancel to replace failed (%s)", order.tag, exc)
            return
        if settled.status != "CANCELLED":
            apply(order, broker_event(settled.status))  # executed first, or the cancel has not taken yet
            await self.context.journal.write(self.ledger.attempt_update(protect, order, f"cancel: {settled.status}"))
            return
        await self.ledger.moved(protect, order, OrderEvent.CANCELLED, message="cancelled, to be placed anew")
        await self._place_anew(gateway, protect, strategy, order, wanted)

    async def _place_anew(
        self, gateway: OrderGateway, protect: OrderIntent, strategy: Strategy, cancelled: TrackedOrder, wanted: float
    ) -> None:
        # The intent's next tag: never a second live order under one tag.
        await self.protection.send(gateway, protect, cancelled.replacement(), strategy, wanted)

    async def _settle(
        self, gateway: OrderGateway, protect: OrderIntent, order: TrackedOrder, held: float | None
    ) -> float | None:
        """An order the log leaves unclear (a modification or a cancel unanswered, a crash between steps): the
        broker's word on it, applied. The trigger it holds if it rests. An order left CANCELLED is one we were
        cancelling to place anew (the log says it rested, or that we were cancelling it); anything else leaves
        it as it is: a placement whose fate is unknown is never sent again here (the exit's release asks by tag)."""
        found = await self._status(gateway, order) if order.order_id else None
        if found is None:
            try:
                found = await self.reconciler.lookup(gateway, order.tag)
            except BrokerUnavailable:
                return None
        if found is None:
            return None
        order.order_id = found.order_id
        if found.status in RESTING:
            trigger = found.trigger_price or held
            if order.state is OrderState.MODIFYING:
                message = f"trigger {trigger}"
                await self.ledger.settled_modify(protect, order, OrderEvent.TRIGGER_PENDING, trigger, message)
            elif apply(order, OrderEvent.TRIGGER_PENDING):
                await self.context.journal.write(self.ledger.attempt_update(protect, order, f"trigger {trigger}"))
            return trigger
        ours = order.state in (OrderState.CANCELLING, OrderState.OPEN) or found.status != "CANCELLED"
        if ours and apply(order, broker_event(found.status)):
            await self.context.journal.write(self.ledger.attempt_update(protect, order, found.status.lower()))
        return None

    async def _status(self, gateway: OrderGateway, order: TrackedOrder) -> BrokerOrder | None:
        try:
            return await gateway.order_status(order.order_id or "")
        except BrokerError:
            return None

    # ------------------------------------------------------------------------------------------- the log

    @staticmethod
    def _trigger(history: RunHistory, order: TrackedOrder, configured: float | None) -> float | None:
        """The trigger the order holds, as its log says: the last settled row that names one (a modification,
        a placement anew), else the configured stop it was first placed at."""
        held = configured
        for row in history.rows:
            if (row.intent_id, row.kind, row.broker_tag) != (order.intent_id, OrderLogKind.ATTEMPT.value, order.tag):
                continue
            if row.price is not None and row.status == "resting":
                held = float(row.price)
        return held

    @staticmethod
    def _modifications(history: RunHistory, order: TrackedOrder) -> int:
        """Modifications asked of the order so far: its attempt rows after its placement (refused ones count:
        the budget errs on the side of replacing early)."""
        rows = [row for row in history.rows
                if row.intent_id == order.intent_id and row.kind == OrderLogKind.ATTEMPT.value
                and row.broker_tag == order.tag]  # fmt: skip
        return max(len(rows) - 1, 0)

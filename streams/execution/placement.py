"""Placing one order at the broker: attempts with retries, the user's rate budget, and a BUY held until its time.

Each attempt moves the order's state machine and is logged before the call. Transient failures (timeout, 5xx,
429) retry with exponential backoff and jitter up to `order_max_attempts`; an attempt whose answer was lost
leaves the order UNKNOWN, and the next try asks the broker by tag before it may send again. Permanent refusals
do not retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC

from redis.exceptions import RedisError

from connectors.broker import (
    SEND_AT_LEAD_SECONDS,
    BrokerCallLate,
    BrokerEgressDown,
    BrokerError,
    BrokerNotSent,
    BrokerThrottled,
    BrokerTokenExpired,
    BrokerUnavailable,
)
from connectors.orders import BrokerOrder, OrderGateway
from connectors.retrying import NOT_SENT_TRIES, broker_retries
from core.metrics import INTENT_LAG_SECONDS, ORDER_RETRIES, RATE_LIMIT_WAIT_SECONDS
from schemas.events import Action, NotificationKind, OrderIntent
from storage.batched_script import BatchedScript
from storage.models import Strategy
from storage.runtime import RuntimeState, buys_held_key, runtime_key, strategy_key
from streams.execution.context import EngineContext
from streams.execution.gates import PriorityGate
from streams.execution.ledger import SEND_WINDOW, Ledger
from streams.execution.limits import BrokerRateLimiter, DayBudgetExhausted
from streams.execution.order_lifecycle import OrderEvent, OrderState, TrackedOrder
from streams.execution.priority import PRIORITY
from streams.execution.reconcile import EXITS, Reconciler

log = logging.getLogger(__name__)

STEP_ASIDE_SECONDS = 2.0  # per checkpoint: how long a BUY (or SELL) waits for exits of higher priority
CALL_START_SECONDS = 0.25  # kept of a held BUY's window for its call to start once it has stepped aside
# A crossed stop's (or target's) attempt row is written while its rate-limit grant is waited for once the grant is
# expected within this share of its send window (`SEND_WINDOW`): the rest is margin for the grant coming later than
# expected. Past its window the call is not made (BrokerCallLate) and the exit is sent again under a new row, that
# one written only once its grant is in hand, or a grant that keeps coming later than expected keeps the exit from
# ever leaving (crash matrix: after a worker restart, a trader's stops sent again every 2 s for 30 s, each call a
# second late). Only the first priority: a lower one's grant can be taken by a stop arriving meanwhile (crash
# matrix: square-off EXITs sent again, past their window, behind the trader's stops).
ROW_LEAD = 0.5
ROW_AHEAD_PRIORITY = PRIORITY[Action.STOPLOSS]

# A BUY falling due: its strategy's run is still the one loaded (not stopped, not restarted) -> mark it buying.
_BUYING_IF_LOADED = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
if redis.call('HGET', KEYS[1], 'run') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'state', ARGV[2])
  return 1
end
return 0
"""


class Withdrawn(Exception):
    """A BUY whose strategy was stopped before it was sent (while held until due, or waiting for its turn)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OverBudget(Withdrawn):
    """A BUY the trader's day of orders has no room for (its last orders are kept for exits): nothing was sent."""


class Placement:
    def __init__(self, context: EngineContext, ledger: Ledger, reconciler: Reconciler) -> None:
        self.context = context
        self.ledger = ledger
        self.reconciler = reconciler
        settings = context.settings
        self.rate_limiter = BrokerRateLimiter(
            context.redis, settings.broker_orders_per_second, per_minute=settings.broker_orders_per_minute,
            per_day=settings.broker_orders_per_day, exit_reserve=settings.broker_exit_reserve,
            hand_over_early=SEND_AT_LEAD_SECONDS,  # its blocks' calls are KiteBroker's, which wait for SEND_AT
        )  # fmt: skip
        self._buying_if_loaded = BatchedScript(context.redis, _BUYING_IF_LOADED)  # every BUY of the instant at once
        self.gate: PriorityGate | None = None  # set by the lanes that run the engine

    async def step_aside(self, intent: OrderIntent, at_most: float = STEP_ASIDE_SECONDS) -> None:
        """Let higher-priority intents in this worker go first. Called outside any database session: waiting
        while holding a connection could starve them of one."""
        if self.gate is not None and at_most > 0:
            await self.gate.yield_to_higher(PRIORITY[intent.action], at_most)

    def early(self, intent: OrderIntent) -> bool:
        return intent.action is Action.BUY and self.context.clock.seconds_until(intent.due_at) > 0

    async def place(
        self,
        gateway: OrderGateway,
        intent: OrderIntent,
        strategy: Strategy,
        order: TrackedOrder,
        turn: Callable[[], None],
    ) -> tuple[BrokerOrder, bool]:
        """The broker's order, and whether this delivery's own attempt placed it (rather than finding it). `turn`
        gives the user's turn back (`UserPace`) as its first broker call is made."""
        retrying = broker_retries(
            self.context.settings.order_max_attempts, initial=0.2, most=2.0, jitter=0.1, not_sent_tries=NOT_SENT_TRIES
        )
        try:
            async for try_ in retrying:
                if try_.retry_state.attempt_number > 1:
                    ORDER_RETRIES.labels(intent.action.value).inc()
                with try_:
                    if order.state is not OrderState.INTENDED:
                        # An earlier attempt's fate is unknown to us, not to the broker: ask before sending again.
                        # One try: a transient failure counts as this attempt's failure, and the retries go on.
                        await self._let_arrive(order)
                        asked = time.monotonic()
                        found = await self.reconciler.ask(gateway, order, tries=1)
                        if found is not None:
                            log.info("intent %s: broker already has order %s (asked for %.2fs)", intent.intent_id,
                                     found.order_id, time.monotonic() - asked)  # fmt: skip
                            return found, False
                    return await self._send(gateway, intent, strategy, order, turn), True
        except BrokerUnavailable:
            if order.state is OrderState.INTENDED:
                raise
            # The last attempt's answer was lost: the broker may hold the order. Ask once more before declaring
            # failure, or a filled order would be left as an untracked open position.
            await self._let_arrive(order)
            try:
                found = await self.reconciler.ask(gateway, order)
            except BrokerUnavailable:
                found = None
            if found is None:
                raise
            log.warning("intent %s: the last attempt did reach the broker (order %s)", intent.intent_id, found.order_id)
            return found, False
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _let_arrive(self, order: TrackedOrder) -> None:
        """A send that failed in transit, before the broker answered (an egress proxy killed mid-request, a
        connection reset), may still be on its way to the broker; asked too soon, the broker knows nothing of it
        and the order would be placed twice (crash matrix: the same BUY twice after an egress died). Wait until
        it is as old as the broker timeout, as the call itself would have waited for its answer."""
        if order.in_transit_since is None:
            return
        remaining = self.context.settings.broker_timeout_seconds - (time.monotonic() - order.in_transit_since)
        order.in_transit_since = None
        if remaining > 0:
            log.info("intent %s: its last attempt failed in transit; %.1fs for it to arrive before asking",
                     order.intent_id, remaining)  # fmt: skip
            await asyncio.sleep(remaining)

    async def _send(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy, order: TrackedOrder,
        turn: Callable[[], None],
    ) -> BrokerOrder:  # fmt: skip
        priority = PRIORITY[intent.action]
        held, waited_from = self.early(intent), time.perf_counter()
        logged = False
        if held:
            # A BUY held until its time has its row now, dated when it is to be sent, so that only the call is
            # left at that instant (a successor finding it unanswered gives it the broker timeout from then).
            await self.ledger.sent(intent, order, max(self.context.clock.now(), intent.due_at.astimezone(UTC)))
            logged = True
        sent = time.monotonic()  # re-read just before the call

        async def log_attempt() -> None:
            # Written after every other wait, just before the call (or while its grant is waited for, once the
            # grant is near: `ROW_LEAD`), and dated as it is committed: another delivery finding it unanswered
            # gives it the broker timeout from when it really left. Dated before a long rate-limit wait, or
            # before a slow commit, a second worker (its lock lost with a Redis restart) asked the broker too
            # soon, found nothing and sent the same BUY again. The attempt number is unique per intent: two
            # processes sending at once cannot both claim it, and the one refused sends nothing.
            nonlocal logged
            if not logged:
                await self.ledger.sent(intent, order)
                logged = True

        lead = self.context.settings.broker_timeout_seconds * SEND_WINDOW * ROW_LEAD
        try:
            async with (
                self._held_until_due(intent, order) as reserved,
                (
                    self.rate_limiter.dated(intent.user_id, reserved)
                    if reserved
                    else self.rate_limiter.permit(
                        intent.user_id,
                        priority,
                        ready=log_attempt if priority == ROW_AHEAD_PRIORITY and not order.late_call else None,
                        lead=lead,
                    )
                ),
            ):
                if not held:  # a BUY held until its time waited for the clock, not for the rate limit
                    RATE_LIMIT_WAIT_SECONDS.labels(intent.action.value).observe(time.perf_counter() - waited_from)
                    if intent.action is Action.BUY:
                        # Its checks were made before its turn and the rate limit's wait: a STOP, the kill switch
                        # or a loss limit may have stopped the strategy since (crash matrix: BUYs seconds after
                        # the daily loss limit). Exits go whatever happened: they close a position.
                        await self._still_running(intent, "strategy stopped before its BUY was sent")
                await log_attempt()
                INTENT_LAG_SECONDS.labels(intent.action.value).observe(
                    max(-self.context.clock.seconds_until(intent.due_at), 0.0)
                )
                sent = time.monotonic()
                # The work before the call is done: the turn goes to the user's next order now. Held through the
                # call, ten calls hanging on a slow broker kept the user's crossed stops waiting 5 s for a turn
                # (crash matrix), though the broker's rate counts arrivals, not calls in flight.
                turn()
                order_id = await gateway.place_market_order(
                    exchange=strategy.exchange, tradingsymbol=strategy.tradingsymbol, side=intent.action.side,
                    quantity=strategy.quantity, product=strategy.product, tag=order.tag, leave_by=order.leave_by,
                )  # fmt: skip
        except Withdrawn as withdrawn:
            await self._skipped(intent, order, logged, withdrawn.reason)
            raise
        except DayBudgetExhausted as exhausted:
            reason = f"BUY skipped: {exhausted}"
            await self._skipped(intent, order, logged, reason)
            raise OverBudget(reason) from exhausted
        except RedisError as exc:
            if logged and order.state is OrderState.SENDING:
                # Its row was written, but the rate limiter failed it before the call: nothing left.
                await self.ledger.moved(intent, order, OrderEvent.UNSENT, message=f"rate limit not reachable: {exc}")
            raise
        except BrokerNotSent as exc:  # nothing placed: nothing to ask about, sent again (once the budget allows)
            order.late_call = order.late_call or isinstance(exc, BrokerCallLate)
            await self.ledger.not_sent(intent, order, exc)
            if not isinstance(exc, BrokerThrottled):
                log.warning("intent %s: %s; sent again", intent.intent_id, exc.message)
            raise
        except BrokerUnavailable as exc:
            # No HTTP answer at all: the request may still be in transit (a timed-out call has waited already).
            order.in_transit_since = sent if exc.http_status is None else None
            await self.ledger.moved(intent, order, OrderEvent.TIMED_OUT, message=exc.message)
            if isinstance(exc, BrokerEgressDown) and intent.action.is_exit:
                # The position is at risk while the exit cannot leave: the trader hears now, not after the retries.
                # Once per intent (the notice's id is the intent's); failing to tell must not stop the retries.
                try:
                    await self.ledger.notify(intent, NotificationKind.EGRESS_DOWN, "Exit delayed – egress down",
                                             f"{intent.action.value}: {exc.message}; retrying")  # fmt: skip
                except Exception:
                    log.exception("intent %s: egress-down notice not delivered", intent.intent_id)
            raise
        except BrokerError as exc:
            order.session_expired = isinstance(exc, BrokerTokenExpired)
            await self.ledger.moved(intent, order, OrderEvent.REJECTED, message=exc.message)
            raise
        # The broker has it now: should confirming fail, a retry must find it, never place again.
        order.order_id = order_id
        try:
            # The attempt row learns the order id with the result, in one transaction.
            # An exit still open after `exit_rest_seconds` rests: its chase begins rather than wait out the deadline.
            resting_after = self.context.settings.exit_rest_seconds if intent.action in EXITS else None
            return await self.reconciler.confirm(gateway, order_id, None, order, within=resting_after)
        except BrokerError as exc:
            if order.state is OrderState.SENDING:  # no answer to the status reads: it is at the broker, open
                order.apply(OrderEvent.ACKNOWLEDGED)
            await self.context.journal.write(self.ledger.attempt_update(intent, order, exc.message))
            raise

    async def _skipped(self, intent: OrderIntent, order: TrackedOrder, logged: bool, reason: str) -> None:
        """Nothing was sent: the attempt row says so where it was written; without one the order just moves."""
        if logged:
            await self.ledger.moved(intent, order, OrderEvent.SKIP, message=reason)
        else:
            order.apply(OrderEvent.SKIP)

    @asynccontextmanager
    async def _held_until_due(self, intent: OrderIntent, order: TrackedOrder) -> AsyncIterator[str | None]:
        """A BUY handed over before its time (`buy_lead_seconds`) is held here, its checks and attempt row done,
        until it is due; then only the broker call is left. It waits and is placed outside the worker's execution
        slots: the BUYs of one instant are all sent at that instant, and a STOPLOSS never waits for a slot
        behind them. The trader may have stopped the strategy meanwhile: then nothing is sent.

        Yields the user's rate-limit grant for the due instant if one was reserved while waiting (if not, the
        order takes one the usual way)."""
        if not self.early(intent):
            yield None
            return
        clock = self.context.clock
        priority = PRIORITY[intent.action]
        async with self.gate.stepped_out(priority) if self.gate is not None else contextlib.nullcontext():
            reserved = await self.rate_limiter.reserve(intent.user_id, time.time() + clock.seconds_until(intent.due_at))
            await clock.sleep_until(intent.due_at)
            await self._still_running(intent, "strategy stopped before its buy time")
            # Its row says it leaves at its due instant: it steps aside only as long as its window allows.
            window = (order.leave_by or 0.0) - time.monotonic() - CALL_START_SECONDS
            await self.step_aside(intent, min(window, STEP_ASIDE_SECONDS))
            yield reserved

    async def _still_running(self, intent: OrderIntent, reason: str) -> None:
        """Raise Withdrawn unless the BUY's strategy is still running this run (and mark it buying). Redis answers,
        in one round trip for every BUY of the instant; only if Redis does not know the strategy (stopped,
        restarted empty, unreachable) does the database decide."""
        try:
            # Redis knows the strategy on this run and the user's BUYs are not held (then it is marked buying).
            loaded = bool(await self._buying_if_loaded(
                [strategy_key(intent.strategy_id), runtime_key(intent.strategy_id), buys_held_key(intent.user_id)],
                [str(intent.run), RuntimeState.BUYING.value],
            ))  # fmt: skip
        except RedisError:
            loaded = False
        if not loaded:
            if not await self.context.still_running(intent):
                raise Withdrawn(reason)
            await self.context.set_runtime(intent.strategy_id, state=RuntimeState.BUYING.value)

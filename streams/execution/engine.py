"""The execution engine (seed sequences 5, 6, 7, 9): one order intent -> at most one live broker order.

An intent is handled under its strategy's lock. Its order's state (`order_lifecycle`) is read from the order log
(`ledger`), and decides what happens:
- settled already (a result row): a duplicate; only its lost follow-ups are repaired;
- unclear (sent, no answer): the broker is asked by tag first (`reconcile`), and only "not found" lets it go again;
- an exit first settles the run's other orders whose fate the log does not know, then releases a protective stop;
- an intent that does not fit the strategy (stopped, no position, BUY time missed) is skipped;
- otherwise it is placed (`placement`: attempts logged before the call, retries, the rate budget) and its outcome
  recorded and announced (`outcomes`), or, after its retries, failed: the strategy is stopped safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.broker import BrokerError, BrokerRejected, BrokerTokenExpired, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from core.clock import Clock
from core.logs import log_outcome
from core.market import MarketCalendar
from core.metrics import ORDERS
from core.settings import Settings
from manager.reentries import awaiting_reentry
from manager.strategy_manager import StrategyManager
from schemas.events import Action, NotificationKind, OrderIntent, OrderResult, Product
from storage.journal import GroupCommit
from storage.locks import ProcessLease, kept_alive_lock
from storage.models import Strategy, StrategyStatus
from storage.positions import RunPosition
from storage.runtime import lock_key
from streams.execution.context import EngineContext, GatewayFactory, Publisher
from streams.execution.cycles import FLAT_AT_SELL, REENTRY_CUTOFF, for_current_cycle, reentry_misfit
from streams.execution.gates import PriorityGate, UserPace
from streams.execution.ledger import Ledger, RunHistory
from streams.execution.order_lifecycle import OrderEvent, OrderState, Refused, TrackedOrder, strategy_state
from streams.execution.outcomes import Outcomes
from streams.execution.placement import OverBudget, Placement, Withdrawn
from streams.execution.priority import PRIORITY, RECONCILE_PRIORITY, raise_current, urgent
from streams.execution.protective import ProtectiveStops
from streams.execution.reconcile import Reconciler, RestingOrder
from streams.execution.resting import CHASED, RestingOrders
from streams.execution.stop_follow import StopFollower

log = logging.getLogger(__name__)

LOCK_SECONDS = 10.0
# With a process lease a dead holder's lock is taken over as soon as the lease lapses, so the TTL only bounds a
# holder that is alive but stalled, and a longer one means fewer renewals: during a burst hundreds of lanes
# hold their lock for many seconds, and renewing every LOCK_SECONDS / 3 cost about 5 % of the worker's CPU. At 60 s
# a BUY handed over early (`buy_lead_seconds`) is placed and recorded before its lock's first renewal.
LEASED_LOCK_SECONDS = 60.0
LOCK_WAIT_SECONDS = 120.0
MISSED_BUY = "BUY time missed"
MARKET_CLOSED = "market closed"


def _no_turn() -> None:
    return None


SLOW_EXIT_SECONDS = 1.0


def slow_exit(intent: OrderIntent, what: str, seconds: float) -> None:
    """An exit (or a BUY being reconciled, which decides whether there is a position to protect) held up on its way
    to the broker says where: what an operator needs when a stop exits late."""
    if (intent.action.is_exit or urgent()) and seconds >= SLOW_EXIT_SECONDS:
        log.warning("intent %s %s: %.1fs", intent.intent_id, what, seconds)


class ExecutionStalled(RuntimeError):
    """An intent ran past `execution_deadline_seconds`; it is retried (safe: one order per intent)."""


class Executor:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        session_factory: async_sessionmaker[AsyncSession],
        redis: Redis,
        publisher: Publisher,
        gateways: GatewayFactory,
        manager: StrategyManager,
        lease: ProcessLease | None = None,
        journal: GroupCommit | None = None,
    ) -> None:
        self.context = EngineContext(
            settings, clock, session_factory, journal or GroupCommit(session_factory), redis, publisher, gateways,
            manager,
        )  # fmt: skip
        self.lease = lease
        self.ledger = Ledger(self.context)
        self.reconciler = Reconciler(self.context, self.ledger)
        self.placement = Placement(self.context, self.ledger, self.reconciler)
        self.resting = RestingOrders(self.context, self.ledger, self.placement)
        self.calendar = MarketCalendar(settings)
        self.protection = ProtectiveStops(self.context, self.ledger, self.reconciler, self.placement.rate_limiter)
        self.follower = StopFollower(
            self.context, self.ledger, self.reconciler, self.placement.rate_limiter, self.protection
        )
        self.outcomes = Outcomes(self.context, self.ledger, self.protection)
        self.pace = UserPace(self.placement.rate_limiter.limit)

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.context.settings = settings

    @property
    def manager(self) -> StrategyManager:
        return self.context.manager

    @property
    def gate(self) -> PriorityGate | None:
        return self.placement.gate

    @gate.setter
    def gate(self, gate: PriorityGate | None) -> None:
        self.placement.gate = gate

    async def _turn(self, intent: OrderIntent) -> Callable[[], None]:
        """The user's turn for the work between the decision and the broker call (`UserPace`), waited for outside
        the worker's execution slot. Taken once the intent is decided, so waits before it (an earlier attempt given
        time to land, lookups of the run's unclear orders) never hold a turn: after a restart a user's dozens of
        redelivered BUYs each wait out such an attempt, and in turns of ten they missed their BUY time. A BUY handed
        over early needs none: its grant is reserved and it waits for its time anyway."""
        if self.placement.early(intent):
            return _no_turn
        priority = PRIORITY[intent.action]
        gate = self.placement.gate
        async with gate.stepped_out(priority) if gate is not None else contextlib.nullcontext():
            return await self.pace.turn(intent.user_id, priority)

    async def execute(self, intent: OrderIntent) -> OrderResult | None:
        """Handle one intent under the strategy's runtime lock. Returns the result, None if a duplicate.

        The lock is short-lived and kept alive while we work: a worker killed mid-order leaves it behind for at
        most LOCK_SECONDS (its lease's few seconds when it has one), while a slow order (retries, backoff) never
        outlives its own lock.
        """
        ttl = LOCK_SECONDS if self.lease is None else LEASED_LOCK_SECONDS
        asked = time.monotonic()
        async with kept_alive_lock(
            self.context.redis, lock_key(intent.strategy_id), ttl, LOCK_WAIT_SECONDS, self.lease
        ):
            slow_exit(intent, "waited for its strategy's lock", time.monotonic() - asked)
            deadline = asyncio.timeout(self.settings.execution_deadline_seconds)
            try:
                async with deadline:
                    result = await self._execute_locked(intent)
                    if result is not None:
                        ORDERS.labels(intent.action.value, result.status.value).inc()
                        log_outcome(result)
                    return result
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                # The traceback shows where it stalled; the lane retries the intent like a redelivery.
                raise ExecutionStalled(
                    f"intent {intent.intent_id} unfinished after {self.settings.execution_deadline_seconds:.0f}s"
                ) from exc
            except Refused as refused:
                # A bug, not a broker's answer: nothing was applied, and sending anything now could double it.
                log.error("intent %s: %s; the intent is left as it is", intent.intent_id, refused)
                return None

    async def _execute_locked(self, intent: OrderIntent) -> OrderResult | None:
        locked = time.monotonic()
        # The strategy and every order-log row of its run (a handful) decide the intent.
        strategy, history = await self.ledger.read_run(intent.strategy_id, intent.run)
        if strategy is None:
            log.warning("intent %s for unknown strategy dropped", intent.intent_id)
            return None
        if intent.action is Action.RAISE_STOP:
            # Not an order of its own: the protective SL-M's trigger follows the risen stop (no result row).
            await self.placement.step_aside(intent)
            await self.follower.follow(intent, strategy, history)
            return None
        position = history.position
        intent = for_current_cycle(intent, position)
        order = history.order(intent.intent_id, intent.action, intent.broker_tag)
        if order.state is OrderState.CANCELLED and not order.recorded and intent.action in CHASED:
            # Our chase cancelled its resting order and the worker died before placing the next: that one is due.
            order = order.replacement()
        if order.recorded:
            log.info("intent %s already settled (%s): duplicate dropped", intent.intent_id, order.state.value)
            await self.outcomes.repair_followups(intent, strategy, order, position)
            return None
        if intent.action is Action.BUY and order.state is not OrderState.INTENDED:
            raise_current(RECONCILE_PRIORITY)  # sent before: whether a position is open is the question now
        await self.placement.step_aside(intent)
        if order.final:
            # Refused or withdrawn, and the worker died before the result row: settle it as it ended.
            if order.state is OrderState.SKIPPED:
                return await self.outcomes.skip(intent, order, "withdrawn before it was sent")
            refusal = BrokerTokenExpired("session expired") if order.session_expired else None
            return await self.outcomes.fail(intent, strategy, order, refusal or BrokerRejected("refused by the broker"))
        await self.reconciler.let_settle(order)
        settled = await self.reconciler.settle_run(intent, strategy, history)
        if settled.resting is not None:
            await self._settle_resting(strategy, settled.resting)
        if settled.adopted or settled.resting is not None:
            _, history = await self.ledger.read_run(intent.strategy_id, intent.run)
            position = history.position

        skip_reason = self._does_not_fit(intent, strategy, position)
        if skip_reason is not None and order.state is not OrderState.INTENDED:
            # An earlier delivery sent this order: the broker may hold it, whatever has happened to the strategy
            # since (stopped, late, restarted). Adopt it if so; skip only if it never arrived. (If the broker
            # cannot be asked now, the lane retries the intent later.)
            adopted = await self._adopt_sent(intent, strategy, order, position)
            if adopted is not None:
                return adopted
        if skip_reason is not None:
            return await self._skip(intent, strategy, order, skip_reason)

        await self.placement.step_aside(intent)
        found = None
        unclear = order.state in (OrderState.SENDING, OrderState.UNKNOWN)
        if (intent.action is Action.BUY and order.state is not OrderState.INTENDED) or unclear:
            # Sent by an earlier delivery: asked about before a turn is taken, for only a send needs one. Holding
            # turns through these lookups (and their retries), a trader's dozens of redelivered BUYs kept its
            # crossed stops waiting 6 s for a turn after a restart, and so did nine redelivered stops of one
            # trader whose order-book reads were failing, 7.6 s (crash matrix).
            gateway = await self.context.gateways(intent.user_id)
            try:
                found = await self.reconciler.ask(gateway, order, tries=2)
            except BrokerUnavailable:
                pass  # asked again with its turn, as any unclear order is before it is sent
            except BrokerRejected as exc:
                return await self.outcomes.fail(intent, strategy, order, exc)
        slow_exit(intent, "took to be decided (reads, earlier orders settled)", time.monotonic() - locked)
        # The decision is made: from here to the broker call, the order takes one of its user's turns.
        asked = time.monotonic()
        turn = _no_turn if found is not None else await self._turn(intent)
        slow_exit(intent, "waited for its user's turn", time.monotonic() - asked)
        try:
            return await self._place(intent, strategy, order, history, turn, found)
        finally:
            turn()

    async def _place(
        self, intent: OrderIntent, strategy: Strategy, order: TrackedOrder, history: RunHistory,
        turn: Callable[[], None], found: BrokerOrder | None = None,
    ) -> OrderResult:  # fmt: skip
        """Place the intent's order, or settle `found`, the broker's order for it that an earlier delivery sent."""
        told: asyncio.Future[object] | None = None
        if not self.placement.early(intent):  # a BUY handed over early says "buying" once it is due
            sending = {intent.action: OrderState.SENDING} | (
                {Action.BUY: OrderState.FILLED} if intent.action.is_exit else {}
            )
            # The status API's cache: written beside the call, not before it (the outcome's update is queued after).
            told = self.context.runtime_soon(intent.strategy_id, state=strategy_state(sending).value)
        try:
            gateway = await self.context.gateways(intent.user_id)
            # An exit first takes the protective SL-M off the book; if the broker already executed it, that
            # order *is* this exit and nothing more is sent.
            executed = (
                await self.protection.release(gateway, intent, strategy, history) if intent.action.is_exit else None
            )
            if executed is None and intent.action in CHASED:
                executed = await self._squared_off_by_broker(gateway, intent, strategy)
            if executed is not None:
                broker_order, placed_here = executed, False
            elif found is not None:
                log.info("intent %s: broker already has order %s", intent.intent_id, found.order_id)
                broker_order, placed_here = found, False
            elif order.state is OrderState.CANCELLING and intent.action in CHASED:
                # Redelivered mid-chase: the order being cancelled was ours to replace.
                broker_order, order = await self.resting.resume(gateway, intent, strategy, order)
                placed_here = True
            else:
                broker_order, placed_here = await self.placement.place(gateway, intent, strategy, order, turn)
            if not broker_order.terminal and intent.action in CHASED:
                # Left resting (a protected market order in a fast move): never left so, chased until it fills.
                broker_order, order = await self.resting.chase(
                    gateway, intent, strategy, order, broker_order, fresh=placed_here
                )
                placed_here = True
            elif not broker_order.terminal and intent.action is Action.BUY:
                broker_order = await self.resting.cancel_resting_buy(gateway, intent, order, broker_order)
        except BrokerError as exc:
            return await self.outcomes.fail(intent, strategy, order, exc)
        except OverBudget as over:
            # Nothing is left to do in this run: the trader is told and the run stopped, as for a missed BUY.
            result = await self.outcomes.skip(intent, order, over.reason)
            await self.ledger.notify(intent, NotificationKind.BUY_SKIPPED, "BUY skipped", over.reason)
            # The budget is the day's: a daily strategy runs again the next trading day.
            await self.context.manager.stop(strategy.id, square_off=False, reason=over.reason, end_repetition=False)
            return result
        except Withdrawn as withdrawn:
            log.info("intent %s withdrawn before it was due: %s", intent.intent_id, withdrawn.reason)
            return await self.outcomes.skip(intent, order, withdrawn.reason)
        if told is not None:
            await told  # raises what the outcome's own Redis writes would (the lane retries, and finds the order)
        return await self.outcomes.complete(
            intent, strategy, order, broker_order, history.position, placed_here=placed_here
        )

    async def _settle_resting(self, strategy: Strategy, resting: RestingOrder) -> None:
        """Another order of the run rests unfilled at the broker and its own delivery is gone (its worker died): end
        it under its own intent, as that delivery would have, before this exit decides anything. Another exit is
        chased to its fill (the position keeps one exit, and this one then finds it closed); a BUY is cancelled
        once its rest time is up (what it filled is the position this exit sells). Refused or cancelled with
        nothing filled, the order is failed as its own delivery would have failed it."""
        other, order = resting.intent, resting.order
        gateway = await self.context.gateways(other.user_id)
        try:
            if other.action is Action.BUY:
                broker_order = await self.resting.cancel_resting_buy(gateway, other, order, resting.broker_order)
            else:
                broker_order, order = await self.resting.chase(
                    gateway, other, strategy, order, resting.broker_order, fresh=False
                )
        except BrokerRejected as exc:
            await self.outcomes.fail(other, strategy, order, exc)
            return
        _, history = await self.ledger.read_run(strategy.id, other.run)
        await self.outcomes.complete(other, strategy, order, broker_order, history.position, placed_here=True)

    async def _squared_off_by_broker(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy
    ) -> BrokerOrder | None:
        """Past the broker's MIS cut-off, the broker's own square-off is this exit: no SELL into a flat position."""
        if strategy.product != Product.MIS.value:
            return None
        cutoff = self.settings.broker_mis_square_off
        if self.calendar.local(self.context.clock.now()).time() < cutoff:
            return None
        found = await gateway.find_square_off(strategy.exchange, strategy.tradingsymbol, strategy.product)
        if found is not None:
            log.warning("intent %s: the broker squared the position off itself (order %s)", intent.intent_id,
                        found.order_id)  # fmt: skip
            await self.ledger.notify(
                intent, NotificationKind.SQUARED_OFF_BY_BROKER, "Squared off by the broker",
                f"The broker closed the {strategy.instrument} MIS position at its {cutoff:%H:%M} square-off "
                f"(at {found.average_price}): no {intent.action.value} was sent",
            )  # fmt: skip
        return found

    async def _adopt_sent(
        self, intent: OrderIntent, strategy: Strategy, order: TrackedOrder, position: RunPosition
    ) -> OrderResult | None:
        """The broker's order for an intent that no longer fits but was sent before: its result if the broker
        has it (followed up only if the run is still the strategy's), None if not. Found resting unfilled, it is
        cancelled first: a BUY of a stopped strategy or an exit of a closed position must not fill later (a
        resting BUY recorded as placed read as a position held, and the square-off sold what was never bought).
        A transient failure propagates: the lane asks again later."""
        gateway = await self.context.gateways(intent.user_id)
        try:
            broker_order = await self.reconciler.ask(gateway, order)
        except BrokerRejected as exc:  # the session expired meanwhile, or the order ended rejected: fail, never loop
            return await self.outcomes.fail(intent, strategy, order, exc)
        if broker_order is None:
            return None
        if not broker_order.terminal:
            broker_order = await self.resting.cancel_unwanted(gateway, intent, order, broker_order)
            if broker_order.status != "COMPLETE":
                return await self.outcomes.skip(intent, order, "rested unfilled once no longer wanted: cancelled")
        if intent.run != strategy.run:
            # A run the strategy has left: record what the broker did, arm nothing.
            return await self.reconciler.record_found(intent, order, broker_order)
        return await self.outcomes.complete(intent, strategy, order, broker_order, position)

    async def _skip(self, intent: OrderIntent, strategy: Strategy, order: TrackedOrder, reason: str) -> OrderResult:
        log.info("intent %s skipped: %s", intent.intent_id, reason)
        if intent.action is Action.BUY and order.state is OrderState.INTENDED:
            # The BUY's next attempt is claimed as withdrawn before the skip: a process still holding this intent
            # (its lock gone with a Redis restart) can then never send it after the skip, for the attempt it would
            # send under is taken; refused, this skip is retried and finds that attempt. (Crash matrix: a BUY
            # skipped as missed here, sent by the other worker a moment later, its position left with no exit.)
            await self.ledger.sent(intent, order)
            await self.ledger.moved(intent, order, OrderEvent.SKIP, message=reason)
        result = await self.outcomes.skip(intent, order, reason)
        if reason.startswith((REENTRY_CUTOFF, FLAT_AT_SELL)):
            # Waiting to buy again, and no longer allowed to: the strategy's day ends here.
            await self.outcomes.end_day(intent, strategy, reason)
        if reason.startswith(MARKET_CLOSED):
            await self.ledger.notify(intent, NotificationKind.MARKET_CLOSED, f"{intent.action.value} not sent",
                                     reason)  # fmt: skip
        if reason.startswith(MISSED_BUY):
            await self.ledger.notify(intent, NotificationKind.BUY_SKIPPED, "BUY skipped", reason)
            # Nothing is left to do in this run: stop it (its SELL job is cancelled) rather than leave it
            # "running" all day with no position.
            await self.context.manager.stop(strategy.id, square_off=False, reason=reason, end_repetition=False)
        return result

    def _does_not_fit(self, intent: OrderIntent, strategy: Strategy, position: RunPosition) -> str | None:
        if intent.run != strategy.run:
            return f"intent is for run {intent.run}, the strategy is on run {strategy.run}"
        if intent.action in (Action.BUY, Action.SELL) and not self.calendar.is_open(self.context.clock.now()):
            # Kite takes regular orders only in market hours: a time event due outside them is not placed.
            return f"{MARKET_CLOSED}: {intent.action.value} not sent outside market hours"
        if intent.action is Action.BUY:
            if strategy.status != StrategyStatus.RUNNING.value:
                return f"strategy is {strategy.status}"
            if intent.cycle > 1:
                return reentry_misfit(intent, strategy, position, self.calendar.local(self.context.clock.now()).time())
            if position.bought:
                return "already bought in this run"
            late = (self.context.clock.now() - intent.due_at).total_seconds()
            grace = self.settings.missed_buy_grace_seconds
            if late > grace:
                return f"{MISSED_BUY} by {late:.0f}s (grace {grace:.0f}s)"
            return None
        if not position.open:
            if intent.action is Action.SELL and awaiting_reentry(strategy, position):
                return f"{FLAT_AT_SELL}: the re-entry did not happen before sell_time"
            return "no open position to exit"
        return None

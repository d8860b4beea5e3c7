"""What a settled order changes: the result, the strategy's runtime and status, the trader's notice, the
lifecycle event that arms or disarms the stop, and the auto-stop when an order fails.

A fill is recorded (one transaction) before anything is announced; every announcement is idempotent, so a
worker that dies in between is repaired by the intent's redelivery (`repair_followups`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from sqlalchemy.exc import IntegrityError

from connectors.broker import BrokerError, BrokerTokenExpired, BrokerUnavailable
from connectors.orders import BrokerOrder
from core.market import MarketCalendar
from core.metrics import AUTO_STOPS
from core.reentry import loss_left
from manager.reentries import awaiting_reentry, follow_ups
from manager.run_specs import armed_event, price_exit, spec_for
from manager.strategy_manager import ORDERS_TOPIC
from schemas.events import (
    Action,
    Event,
    ExitKind,
    LifecycleKind,
    NotificationKind,
    OrderIntent,
    OrderResult,
    OrderStatus,
    StrategyLifecycle,
    Trigger,
    UserNotification,
)
from storage.journal import Rows
from storage.models import Strategy, StrategyStatus
from storage.positions import RunPosition
from storage.runtime import RuntimeState, symbol_key
from streams.execution.context import LIFECYCLE_TOPIC, NOTIFICATIONS_TOPIC, ORDER_RESULTS_TOPIC, EngineContext
from streams.execution.ledger import Ledger, Told
from streams.execution.order_lifecycle import OrderEvent, OrderState, TrackedOrder, strategy_state
from streams.execution.protective import ProtectiveStops

log = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 15.0


class Outcomes:
    def __init__(self, context: EngineContext, ledger: Ledger, protection: ProtectiveStops) -> None:
        self.context = context
        self.ledger = ledger
        self.protection = protection
        self.calendar = MarketCalendar(context.settings)

    async def complete(
        self,
        intent: OrderIntent,
        strategy: Strategy,
        order: TrackedOrder,
        broker_order: BrokerOrder,
        position: RunPosition,
        *,
        placed_here: bool = False,
    ) -> OrderResult:
        """Record a broker order's outcome and tell everyone. `placed_here`: this delivery's attempt placed it."""
        # (The broker order is this order's, or the protective stop's, adopted as this exit.)
        filled = broker_order.status == "COMPLETE"
        held = OrderState.FILLED if filled else OrderState.OPEN
        status = OrderStatus.FILLED if filled else OrderStatus.PLACED
        result = self.ledger.result(intent, order, status, broker_order_id=broker_order.order_id,
                                    price=broker_order.average_price)  # fmt: skip
        now = self.context.clock.now()
        spec = spec_for(strategy)
        placed = self.ledger.attempt_update(intent, order) if placed_here else None
        if intent.action is Action.BUY:
            await self.context.set_runtime(
                intent.strategy_id, state=strategy_state({Action.BUY: held}).value, position="bought",
                quantity=str(strategy.quantity), last_action=Action.BUY.value, last_buy_order=broker_order.order_id,
                last_order_status=status.value, last_order_message="",
                entry_price=f"{broker_order.average_price or 0:.2f}", entry_at=now.isoformat(), cycle=str(intent.cycle),
            )  # fmt: skip
            notice = self.ledger.notice(
                intent,
                NotificationKind.ORDER_FILLED,
                "BUY filled",
                f"Bought {strategy.quantity} {spec.instrument} at {broker_order.average_price}",
            )
            told = await self._record(intent, result, placed, notice)
            if filled and not await self.context.still_running(intent):
                # The trader stopped the strategy while this BUY was in flight (or before a lost BUY was adopted):
                # the STOP saw no position, so nobody would manage this one. Square it off at once rather than arm
                # a stop for a stopped strategy. The square-off is requested before the fill is announced:
                # announcing may wait on Kafka for seconds, and a worker killed meanwhile left the shares with
                # nobody to sell them.
                await self.context.manager.square_off_orphan(strategy, intent.trading_day)
                await self.announce(intent, told)
                return result
            if strategy.protective_stop and filled:
                gateway = await self.context.gateways(intent.user_id)
                await self.protection.place(gateway, intent, strategy, broker_order.average_price)
            armed = armed_event(spec, intent.run, intent.trading_day, now, broker_order.average_price, intent.due_at,
                                cycle=intent.cycle, realised=position.realised(strategy.quantity))  # fmt: skip
            # Filled through its stop already (a stop given as a price the market fell under before the BUY, or
            # a BUY found at the broker only after a restart): the exit goes with the fill, not a lifecycle round
            # trip and a sweep later (crash matrix: 2 to 3 s on a worker busy after a restart). The stop index
            # fires the same intent id too; whichever comes second is a duplicate.
            through = (
                price_exit(armed, broker_order.average_price, armed.stop_price, now, Trigger.PRICE)
                if filled and broker_order.average_price is not None
                else None
            )
            exits = [(ORDERS_TOPIC, intent.strategy_id, through)] if through is not None else []
            await self.announce(intent, told, armed, *exits)
            if through is not None:
                log.warning("intent %s: filled at %s, through its %s at %s: %s sent", intent.intent_id,
                            broker_order.average_price, through.exit_kind, through.exit_level,
                            through.action.value)  # fmt: skip
            return result

        runtime = strategy_state({Action.BUY: OrderState.FILLED, intent.action: held})
        await self.context.set_runtime(
            intent.strategy_id, state=runtime.value, position=runtime.value, last_action=intent.action.value,
            last_sell_order=broker_order.order_id, last_order_status=status.value, last_order_message="",
            exit_price=f"{broker_order.average_price or 0:.2f}", exit_at=now.isoformat(),
        )  # fmt: skip
        sold = f"Sold {strategy.quantity} {spec.instrument} at {broker_order.average_price}"
        if intent.action is Action.STOPLOSS and intent.exit_kind is ExitKind.LOSS_LIMIT:
            notice = self.ledger.notice(
                intent, NotificationKind.LOSS_LIMIT_REACHED, "Loss Limit Reached – Strategy Done for the Day",
                f"{sold} (loss limit {spec.max_loss} reached at {intent.exit_level})",
            )  # fmt: skip
        elif intent.action is Action.STOPLOSS:
            # The stop the price reached: a trailing stop, or one moved to cost, is above the one configured.
            stop = intent.exit_level or spec.exits.stop_price(position.entry_price) or spec.exits.describe_stop()
            if intent.exit_kind is not None and intent.exit_kind is not ExitKind.STOP:
                stop = f"{intent.exit_kind.value.replace('_', ' ')} {stop}"
            notice = self.ledger.notice(intent, NotificationKind.STOPLOSS_TRIGGERED, "STOP-LOSS Triggered",
                                        f"{sold} (stop {stop})")  # fmt: skip
        elif intent.action is Action.TARGET:
            notice = self.ledger.notice(intent, NotificationKind.TARGET_REACHED, "TARGET Reached",
                                        f"{sold} (target {spec.exits.target_price(position.entry_price)})")  # fmt: skip
        else:
            notice = self.ledger.notice(intent, NotificationKind.ORDER_FILLED, f"{intent.action.value} filled", sold)
        # The one place a re-entry is decided: recorded with this exit's result, as the status it leaves.
        again = filled and self._reenters(intent, strategy, position, broker_order.average_price)
        if again:
            notice = notice.model_copy(update={"message": f"{notice.message}; buying again (re-entry "
                                                          f"{intent.cycle} of {spec.reentry_max})"})  # fmt: skip
        # A SELL or STOPLOSS ends the strategy's day (an EXIT is the trader's STOP, which sets its own status),
        # unless the strategy buys again.
        finish = (strategy, StrategyStatus.COMPLETED, f"exited by {intent.action.value}")
        ends_day = intent.action is not Action.EXIT and not again
        told = await self._record(intent, result, placed, notice, finish if ends_day else None)
        if again:
            await self.announce(intent, told, None, *follow_ups(
                spec, intent.run, intent.trading_day, intent.cycle + 1, now, position.entry_price, Trigger.PRICE
            ))  # fmt: skip
            return result
        exited = StrategyLifecycle(
            kind=LifecycleKind.EXITED, spec=spec, run=intent.run, cycle=intent.cycle, trading_day=intent.trading_day,
            occurred_at=now, entry_price=position.entry_price, reason=intent.action.value,
        )  # fmt: skip
        await self.announce(intent, told, exited)
        if intent.action is not Action.EXIT:
            # The strategy is done for the day: it leaves the symbol set (no more ticks needed for it).
            await self.context.redis.srem(symbol_key(strategy.instrument), str(strategy.id))
            await self.context.set_runtime(strategy.id, strategy_status=StrategyStatus.COMPLETED.value)
        return result

    async def end_day(self, intent: OrderIntent, strategy: Strategy, reason: str) -> None:
        """A strategy waiting to buy again that may no longer (past the cut-off, or flat at sell_time) is done for
        the day, as after a final exit: completed, its jobs and watch dropped, off the symbol set."""
        await self.context.journal.write(*self.ledger.end_rows(strategy, StrategyStatus.COMPLETED, reason))
        spec = spec_for(strategy)
        exited = StrategyLifecycle(
            kind=LifecycleKind.EXITED, spec=spec, run=intent.run, cycle=intent.cycle, trading_day=intent.trading_day,
            occurred_at=self.context.clock.now(), reason=reason,
        )  # fmt: skip
        await self.context.publisher.publish(LIFECYCLE_TOPIC, spec.instrument, exited)
        await self.context.redis.srem(symbol_key(strategy.instrument), str(strategy.id))
        await self.context.set_runtime(strategy.id, strategy_status=StrategyStatus.COMPLETED.value)

    def _reenters(self, intent: OrderIntent, strategy: Strategy, position: RunPosition, price: float | None) -> bool:
        """Whether this filled exit is followed by the next cycle's BUY (core/reentry.py): a STOPLOSS other than
        the loss limit, re-entries left, before the cut-off, and loss limit left after what has been realised."""
        if intent.action is not Action.STOPLOSS or intent.exit_kind is ExitKind.LOSS_LIMIT:
            return False
        realised = position.realised(strategy.quantity)
        if position.entry_price is not None and price is not None:
            realised += (price - position.entry_price) * strategy.quantity
        local_now = self.calendar.local(self.context.clock.now()).time()
        refusal = strategy.reentry.refusal(intent.cycle, local_now, loss_left(spec_for(strategy).max_loss, realised))
        if refusal is not None and strategy.reentry.max_reentries > 0:
            log.info("strategy %s cycle %s: no re-entry (%s)", strategy.id, intent.cycle, refusal)
        return refusal is None

    async def fail(self, intent: OrderIntent, strategy: Strategy, order: TrackedOrder, exc: BrokerError) -> OrderResult:
        """Settle the order as failed (given up after retries) or rejected, stop the strategy, tell the trader."""
        expired = isinstance(exc, BrokerTokenExpired)
        given_up = isinstance(exc, BrokerUnavailable) or expired
        if not order.final:  # a refusal already moved it; a send given up, or one never made, moves now
            order.apply(OrderEvent.GIVE_UP if given_up else OrderEvent.REJECTED)
        status = OrderStatus.FAILED if given_up else OrderStatus.REJECTED
        message = "broker session expired, reconnect" if expired else exc.message
        log.warning("order failed: intent %s after %d attempt(s): %s", intent.intent_id, order.attempts, message)
        result = self.ledger.result(intent, order, status, message=message)
        await self.context.set_runtime(
            intent.strategy_id, state=RuntimeState.FAILED.value, strategy_status=StrategyStatus.FAILED.value,
            last_order_status=status.value, last_order_message=message,
        )  # fmt: skip
        # Every follow-up is idempotent and comes before the result row: a crash in between is repaired by the
        # redelivery, which finds no result yet and fails the intent again.
        kind = NotificationKind.BROKER_SESSION_EXPIRED if expired else NotificationKind.ORDER_FAILED
        await self.ledger.notify(intent, kind, "Order Failed – Strategy Stopped", f"{intent.action.value}: {message}")
        if strategy.status == StrategyStatus.RUNNING.value and strategy.run == intent.run:
            AUTO_STOPS.labels(intent.action.value).inc()
            # The auto-stop is sequence 8's STOP: an exit the broker could not be reached for leaves the shares
            # held, so the stop squares them off, as a trader's STOP would (its EXIT first asks the broker about
            # the exit given up here). A refusal (the broker answered no) or an expired session would refuse the
            # square-off too: the trader is told and acts.
            await self.context.manager.stop(
                strategy.id, square_off=intent.action.is_exit and isinstance(exc, BrokerUnavailable),
                reason=f"order failed: {message}", final_status=StrategyStatus.FAILED, trigger=Trigger.RECOVERY,
            )  # fmt: skip
        await self.ledger.record_result(result, intent)
        return result

    async def skip(self, intent: OrderIntent, order: TrackedOrder, reason: str) -> OrderResult:
        if not order.final:
            order.apply(OrderEvent.SKIP)
        result = self.ledger.result(intent, order, OrderStatus.SKIPPED, message=reason)
        await self.ledger.record_result(result, intent)
        return result

    async def repair_followups(self, intent: OrderIntent, strategy: Strategy, order: TrackedOrder,
                               position: RunPosition) -> None:  # fmt: skip
        """A fill is recorded before its lifecycle event goes out: if the worker died in between, the redelivered
        intent re-announces it (idempotent), or a bought position would stay without its stop."""
        if intent.run != strategy.run or order.state is not OrderState.FILLED:
            return
        if intent.action is Action.BUY and position.open and strategy.status == StrategyStatus.STOPPED.value:
            # The worker died between recording this fill and squaring off the position of a strategy the trader
            # had already stopped: finish it. Idempotent, like the STOP's own EXIT (same intent id).
            await self.context.manager.square_off_orphan(strategy, intent.trading_day)
            return
        if intent.action is Action.BUY and position.open and strategy.status == StrategyStatus.RUNNING.value:
            kind, reason = LifecycleKind.ARMED, None
        elif intent.action.is_exit and position.exited and position.cycle == intent.cycle:
            kind, reason = LifecycleKind.EXITED, intent.action.value
            if awaiting_reentry(strategy, position):  # the re-entry decided with this exit: announced again
                spec, now = spec_for(strategy), self.context.clock.now()
                await asyncio.gather(*(self.context.publisher.publish(topic, key, event) for topic, key, event in
                                       follow_ups(spec, intent.run, intent.trading_day, intent.cycle + 1, now,
                                                  position.entry_price, Trigger.RECOVERY)))  # fmt: skip
                return
        else:
            return
        spec = spec_for(strategy)
        now = self.context.clock.now()
        await self.context.publisher.publish(LIFECYCLE_TOPIC, spec.instrument, (
            armed_event(spec, intent.run, intent.trading_day, now, position.entry_price, intent.due_at,
                        cycle=position.cycle, realised=position.realised(strategy.quantity))
            if kind is LifecycleKind.ARMED
            else StrategyLifecycle(kind=kind, spec=spec, run=intent.run, cycle=position.cycle,
                                   trading_day=intent.trading_day, occurred_at=now, entry_price=position.entry_price,
                                   reason=reason)
        ))  # fmt: skip

    async def announce(
        self, intent: OrderIntent, told: Told, lifecycle: StrategyLifecycle | None = None,
        *more: tuple[str, str | int, Event],
    ) -> None:  # fmt: skip
        """The order result, the lifecycle event (or a re-entry's events, `more`) and the notice, sent together
        and acknowledged together.

        Bounded: if Kafka does not acknowledge them in time, the intent fails here and its redelivery (which finds
        the result recorded) announces again, instead of the strategy's lane waiting on Kafka."""
        publisher = self.context.publisher
        sends: list[Awaitable[None]] = [publisher.publish(topic, key, event) for topic, key, event in more]
        if told.result is not None:
            sends.append(publisher.publish(ORDER_RESULTS_TOPIC, intent.strategy_id, told.result))
        if lifecycle is not None:
            sends.append(publisher.publish(LIFECYCLE_TOPIC, lifecycle.spec.instrument, lifecycle))
        if told.notice is not None:
            sends.append(publisher.publish(NOTIFICATIONS_TOPIC, intent.user_id, told.notice))
        async with asyncio.timeout(ANNOUNCE_SECONDS):
            await asyncio.gather(*sends)

    async def _record(
        self,
        intent: OrderIntent,
        result: OrderResult,
        placed: Rows | None,
        notice: UserNotification,
        finish: tuple[Strategy, StrategyStatus, str] | None = None,
    ) -> Told:
        """What a finished order changes in the database, in one transaction (one commit per order instead of
        four): the attempt's broker order id, the result row, the trader's notice, the strategy's end.

        Should any of it be there already (a redelivery racing its twin, a notice given before a crash), each part
        is retried on its own and what was already there is left as it is."""
        steps: dict[str, tuple[Rows, ...]] = {}
        if placed is not None:
            steps["placed"] = (placed,)
        steps["result"] = (self.ledger.result_row(intent, result),)
        steps["notice"] = (self.ledger.notice_row(notice),)
        if finish is not None:
            steps["finish"] = self.ledger.end_rows(*finish)
        try:
            await self.context.journal.write(*(row for rows in steps.values() for row in rows))
            return Told(result, notice)
        except IntegrityError:
            pass
        done: dict[str, bool] = {}
        for name, step in steps.items():
            try:
                await self.context.journal.write(*step)
                done[name] = True
            except IntegrityError:
                done[name] = False
        if not done["result"]:
            log.info("intent %s result already recorded", intent.intent_id)
        return Told(result if done["result"] else None, notice if done["notice"] else None)

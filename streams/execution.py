"""The execution engine (seed sequences 5, 6, 7, 9): one order intent -> at most one broker order.

Integrity rules (DESIGN.md section 6), and where each is enforced:
- Deterministic intent ids and broker tags (schemas.events); the order log is unique per (intent, attempt)
  and has one result row per intent: an intent that already has a result is never executed again.
- Each attempt is logged *before* the broker call; when an attempt exists whose outcome is unclear
  (timeout, crash, redelivery), the broker's order book is searched for the tag before anything is sent.
- The position comes from the order log (the database is the source of truth), so an EXIT still finds it
  after STOP removed the Redis keys; an intent that does not fit the state is logged and skipped.
- Transient failures retry (tenacity, exponential backoff with jitter) up to `order_max_attempts`;
  permanent ones do not. Then: "order failed" logged, runtime failed, strategy auto-stopped, timers
  cancelled (FAILED lifecycle event), "Order Failed – Strategy Stopped" sent to the trader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from connectors.broker import BrokerError, BrokerRejected, BrokerTokenExpired, BrokerUnavailable
from connectors.orders import BrokerOrder, OrderGateway
from core.clock import Clock
from core.coalesce import Coalesced
from core.settings import Settings
from manager.strategy_manager import StrategyManager, spec_for
from schemas.events import (
    Action,
    Event,
    LifecycleKind,
    NotificationKind,
    OrderIntent,
    OrderResult,
    OrderStatus,
    StrategyLifecycle,
    Trigger,
    UserNotification,
    intent_id_for,
)
from storage.journal import GroupCommit, Rows, Step
from storage.locks import ProcessLease, kept_alive_lock
from storage.models import (
    Notification,
    OrderLog,
    OrderLogKind,
    Strategy,
    StrategyStatus,
    StrategyStatusChange,
)
from storage.positions import RunHistory, RunPosition, run_history
from storage.runtime import RuntimeState, lock_key, runtime_key, strategy_key, symbol_key
from streams.limits import PRIORITY, BrokerRateLimiter, PriorityGate

log = logging.getLogger(__name__)

ORDER_RESULTS_TOPIC = "order-results"
NOTIFICATIONS_TOPIC = "notifications"
LIFECYCLE_TOPIC = "strategy-lifecycle"

# Update runtime:{id} only while it exists: a stopped strategy's keys must not be resurrected.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
"""

# A BUY falling due: its strategy's run is still the one loaded (not stopped, not restarted) -> mark it buying.
_BUYING_IF_LOADED = """
if redis.call('HGET', KEYS[1], 'run') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'state', ARGV[2])
  return 1
end
return 0
"""

_EXIT_STATE = {
    Action.SELL: RuntimeState.SOLD,
    Action.STOPLOSS: RuntimeState.EXITED_BY_SL,
    Action.EXIT: RuntimeState.SOLD,
}


ORDER_LOGS = cast(Table, OrderLog.__table__)
NOTIFICATIONS = cast(Table, Notification.__table__)
# Core statements on the tables, not the ORM's unit of work: nothing reads these rows back through a session,
# and object state, flush and identity map were about a tenth of the worker's CPU per order. Shared objects, so
# the group commit runs each once (executemany) for every order in its batch.
INSERT_ORDER_LOG = insert(ORDER_LOGS)
INSERT_NOTIFICATION = insert(NOTIFICATIONS)
UPDATE_ATTEMPT = (
    update(ORDER_LOGS)
    .where(
        ORDER_LOGS.c.intent_id == bindparam("match_intent_id"),
        ORDER_LOGS.c.kind == OrderLogKind.ATTEMPT.value,
        ORDER_LOGS.c.attempt == bindparam("match_attempt"),
    )
    .values(status=bindparam("new_status"), broker_order_id=bindparam("new_order_id"), message=bindparam("new_message"))
)
# A failed result the broker contradicts (an exit given up whose order did arrive): the one result row is corrected.
CORRECT_RESULT = (
    update(ORDER_LOGS)
    .where(ORDER_LOGS.c.intent_id == bindparam("match_intent_id"), ORDER_LOGS.c.kind == OrderLogKind.RESULT.value)
    .values(
        status=bindparam("new_status"),
        broker_order_id=bindparam("new_order_id"),
        price=bindparam("new_price"),
        message=bindparam("new_message"),
    )
)

LOCK_SECONDS = 10.0
# With a process lease a dead holder's lock is taken over as soon as the lease lapses, so the TTL only bounds a
# holder that is alive but stalled, and a longer one means fewer renewals: during a burst hundreds of lanes
# hold their lock for many seconds, and renewing every LOCK_SECONDS / 3 cost about 5 % of the worker's CPU. At 60 s
# a BUY handed over early (`buy_lead_seconds`) is placed and recorded before its lock's first renewal.
LEASED_LOCK_SECONDS = 60.0
STEP_ASIDE_SECONDS = 2.0  # per checkpoint: how long a BUY (or SELL) waits for exits of higher priority
MISSED_BUY = "BUY time missed"
LOCK_WAIT_SECONDS = 120.0
ANNOUNCE_SECONDS = 15.0


GatewayFactory = Callable[[int], Awaitable[OrderGateway]]


class Publisher(Protocol):
    """What the engine needs from Kafka (core.kafka.EventProducer satisfies it)."""

    async def publish(self, topic: str, key: str | int, event: Event) -> None: ...


class Withdrawn(Exception):
    """A BUY handed over early whose strategy was stopped before it fell due: nothing was sent."""

    def __init__(self, attempt: int, reason: str) -> None:
        super().__init__(reason)
        self.attempt = attempt
        self.reason = reason


class ExecutionStalled(RuntimeError):
    """An intent ran past `execution_deadline_seconds`; it is retried (safe: one order per intent)."""


@dataclass(frozen=True)
class Told:
    """What `_record_outcome` wrote for the first time, and so is still to be published."""

    result: OrderResult | None
    notice: UserNotification | None


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
        self.settings = settings
        self.clock = clock
        self.sessions = session_factory
        # The order path's writes, committed together across orders (by default on the shared sessions).
        self.journal = journal or GroupCommit(session_factory)
        self.redis = redis
        self.publisher = publisher
        self.gateways = gateways
        self.manager = manager
        self.lease = lease
        self.rate_limiter = BrokerRateLimiter(redis, settings.broker_orders_per_second)
        self._hset_if_exists = redis.register_script(_HSET_IF_EXISTS)
        self._buying_if_loaded = redis.register_script(_BUYING_IF_LOADED)
        self._loaded_checks: Coalesced[tuple[int, int], bool] = Coalesced(self._mark_buying_if_loaded)
        self.confirm_timeout = max(settings.broker_timeout_seconds, 5.0)
        self.protection = ProtectiveStops(self)
        self.gate: PriorityGate | None = None  # set by the lanes that run this executor

    async def _step_aside(self, intent: OrderIntent) -> None:
        """Let higher-priority intents in this worker go first. Called outside any database session: waiting
        while holding a connection could starve them of one."""
        if self.gate is not None:
            await self.gate.yield_to_higher(PRIORITY[intent.action], STEP_ASIDE_SECONDS)

    # --------------------------------------------------------------------------------------------- entry

    async def execute(self, intent: OrderIntent) -> OrderResult | None:
        """Handle one intent under the strategy's runtime lock. Returns the result, None if a duplicate.

        The lock is short-lived and kept alive while we work: a worker killed mid-order leaves it behind
        for at most LOCK_SECONDS (its lease's few seconds when it has one), while a slow order (retries,
        backoff) never outlives its own lock.
        """
        key = lock_key(intent.strategy_id)
        ttl = LOCK_SECONDS if self.lease is None else LEASED_LOCK_SECONDS
        async with kept_alive_lock(self.redis, key, ttl, LOCK_WAIT_SECONDS, self.lease):
            deadline = asyncio.timeout(self.settings.execution_deadline_seconds)
            try:
                async with deadline:
                    return await self._execute_locked(intent)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                # The traceback shows where it stalled; the lane retries the intent like a redelivery.
                raise ExecutionStalled(
                    f"intent {intent.intent_id} unfinished after {self.settings.execution_deadline_seconds:.0f}s"
                ) from exc

    async def _execute_locked(self, intent: OrderIntent) -> OrderResult | None:
        await self._step_aside(intent)
        # Two queries decide the intent: the strategy, and every order-log row of its run (a handful).
        async with self.sessions() as session:
            strategy = await session.get(Strategy, intent.strategy_id)
            if strategy is None:
                log.warning("intent %s for unknown strategy dropped", intent.intent_id)
                return None
            history = await run_history(session, intent.strategy_id, intent.run)
        existing = history.result_of(intent.intent_id)
        position = history.position
        attempts_so_far = history.attempts_of(intent.intent_id)
        if existing is not None:
            log.info("intent %s already has a result (%s): duplicate dropped", intent.intent_id, existing.status)
            await self._repair_followups(intent, strategy, existing, position)
            return None
        if attempts_so_far > 0:
            await self._let_settle(history, intent)

        # An exit must know which of its run's orders reached the broker unrecorded (usually none): a worker
        # that died mid-order leaves its attempt row without a result.
        unrecorded = {Action(action) for action in history.unrecorded_actions()} if intent.action.is_exit else set()
        # And an exit that follows one given up after its retries (the auto-stop's square-off) asks the broker about
        # that one first: an answer lost on the way may still have been an order, and selling again would double it.
        given_up = (
            {Action(action) for action in history.given_up_exits()} - {intent.action}
            if intent.action.is_exit and position.open
            else set()
        )
        if (unrecorded or given_up) and intent.run == strategy.run:
            # "No position" may only mean the BUY's outcome was never recorded (a worker died mid-BUY), and
            # "still open" that another exit's was (its STOPLOSS reached the broker, and now the SELL is
            # due): ask the broker about those first, or the position is left unsold or sold twice (crash
            # matrix seeds 4 and 16).
            # (A resting protective stop, PROTECT, has no result by design: it is released, not adopted.)
            candidates = {Action.BUY} if not position.open else {Action.STOPLOSS, Action.SELL, Action.EXIT}
            adopted = False
            for action in sorted(unrecorded & candidates - {intent.action}):
                adopted = await self._adopt_unrecorded(intent, action, history) or adopted
            for action in sorted(given_up):
                adopted = await self._adopt_unrecorded(intent, action, history, given_up=True) or adopted
            if adopted:
                async with self.sessions() as session:
                    position = (await run_history(session, intent.strategy_id, intent.run)).position
        skip_reason = self._does_not_fit(intent, strategy, position)
        if skip_reason is not None and attempts_so_far > 0 and intent.run == strategy.run:
            # An earlier delivery sent this order before a crash: the broker may hold it, whatever has
            # happened to the strategy since (stopped, late). Adopt it if so; skip only if it never arrived.
            # (If the broker cannot be asked now, the lane retries the intent later.)
            try:
                gateway = await self.gateways(intent.user_id)
                found = await self._lookup(gateway, intent.broker_tag)
            except BrokerRejected as exc:  # e.g. the session expired meanwhile: fail cleanly, never loop
                return await self._fail(intent, strategy, exc, attempts_so_far)
            if found is not None:
                try:
                    order = await self._confirm(gateway, found.order_id, found)
                except BrokerError as exc:
                    return await self._fail(intent, strategy, exc, attempts_so_far)
                return await self._complete(intent, strategy, order, attempts_so_far, position)
        if skip_reason is not None:
            log.info("intent %s skipped: %s", intent.intent_id, skip_reason)
            result = self._result(intent, OrderStatus.SKIPPED, attempts_so_far, message=skip_reason)
            await self._record_result(result, intent)
            if skip_reason.startswith(MISSED_BUY):
                await self._notify(intent, NotificationKind.BUY_SKIPPED, "BUY skipped", skip_reason)
                # Nothing is left to do in this run: stop it (its SELL job is cancelled) rather than leave it
                # "running" all day with no position.
                await self.manager.stop(strategy.id, square_off=False, reason=skip_reason)
            return result

        await self._step_aside(intent)
        if not self._early(intent):  # a BUY handed over early says "buying" once it is due (_held_until_due)
            await self._set_runtime(
                intent.strategy_id,
                state=(RuntimeState.BUYING if intent.action is Action.BUY else RuntimeState.SELLING).value,
            )
        try:
            gateway = await self.gateways(intent.user_id)
            # An exit first takes the protective SL-M off the book; if the broker already executed it, that
            # order *is* this exit and nothing more is sent (the two never both execute).
            executed = await self.protection.release(gateway, intent, strategy) if intent.action.is_exit else None
            placed: int | None = None
            if executed is not None:
                order, attempts = executed, attempts_so_far
            else:
                order, attempts, placed = await self._place_with_retries(gateway, intent, strategy, attempts_so_far)
        except BrokerError as exc:
            attempts = await self._attempts_after_failure(intent)
            return await self._fail(intent, strategy, exc, attempts)
        except Withdrawn as withdrawn:
            log.info("intent %s withdrawn before it was due: %s", intent.intent_id, withdrawn.reason)
            result = self._result(intent, OrderStatus.SKIPPED, withdrawn.attempt, message=withdrawn.reason)
            await self._record_result(result, intent)
            return result
        return await self._complete(intent, strategy, order, attempts, position, placed_attempt=placed)

    async def _adopt_unrecorded(
        self, intent: OrderIntent, action: Action, history: RunHistory, *, given_up: bool = False
    ) -> bool:
        """Record what the broker says of this run's `action`, attempted with no result (or, `given_up`, with a
        failed one, which the broker's order then corrects); False if the broker has none."""
        other = intent.model_copy(
            update={
                "intent_id": intent_id_for(intent.strategy_id, intent.trading_day, intent.run, action),
                "action": action,
            }
        )
        attempts = history.attempts_of(other.intent_id)
        await self._let_settle(history, other)
        # A transient failure propagates (the lane retries the exit shortly); a refusal means nothing to adopt.
        try:
            gateway = await self.gateways(intent.user_id)
            found = await self._lookup(gateway, other.broker_tag)
            if found is None:
                return False
            order = await self._confirm(gateway, found.order_id, found)
        except BrokerRejected:
            return False
        log.warning("intent %s: adopting %s order %s that was %s", intent.intent_id, action.value, order.order_id,
                    "given up as failed" if given_up else "never recorded")  # fmt: skip
        status = OrderStatus.FILLED if order.status == "COMPLETE" else OrderStatus.PLACED
        result = self._result(other, status, attempts, broker_order_id=order.order_id, price=order.average_price)
        if given_up:
            result = result.model_copy(update={"message": "found at the broker after it was given up"})
            await self.journal.write(Rows(CORRECT_RESULT, {
                "match_intent_id": other.intent_id, "new_status": result.status.value,
                "new_order_id": result.broker_order_id, "new_price": _money(result.price),
                "new_message": result.message,
            }))  # fmt: skip
            await self.publisher.publish(ORDER_RESULTS_TOPIC, other.strategy_id, result)
            return True
        await self._record_result(result, other)
        return True

    async def _repair_followups(
        self, intent: OrderIntent, strategy: Strategy, existing: OrderLog, position: RunPosition
    ) -> None:
        """A fill is recorded before its lifecycle event goes out: if the worker died in between, the
        redelivered intent re-announces it (idempotent), or a bought position would stay without its stop."""
        if intent.run != strategy.run or existing.status != OrderStatus.FILLED.value:
            return
        if intent.action is Action.BUY and position.open and strategy.status == StrategyStatus.STOPPED.value:
            # The worker died between recording this fill and squaring off the position of a strategy the
            # trader had already stopped (crash matrix seed 6): finish it. Idempotent, like the STOP's own
            # EXIT (same intent id): if that one went out, this copy is dropped.
            await self.manager.square_off_orphan(strategy, intent.trading_day)
            return
        spec = spec_for(strategy)
        now = self.clock.now()
        if intent.action is Action.BUY and position.open and strategy.status == StrategyStatus.RUNNING.value:
            kind, reason = LifecycleKind.ARMED, None
        elif intent.action.is_exit and position.exited:
            kind, reason = LifecycleKind.EXITED, intent.action.value
        else:
            return
        await self.publisher.publish(
            LIFECYCLE_TOPIC,
            spec.instrument,
            StrategyLifecycle(kind=kind, spec=spec, run=intent.run, trading_day=intent.trading_day, occurred_at=now,
                              entry_price=position.entry_price, reason=reason,
                              opened_at=intent.due_at if kind is LifecycleKind.ARMED else None),
        )  # fmt: skip

    async def _let_settle(self, history: RunHistory, intent: OrderIntent) -> None:
        """Give an order that a dead delivery may have sent time to reach the broker before asking about it.

        An attempt still marked "sending" belongs to a delivery that never heard back: its worker died mid-call
        (or lost its lock to a Redis restart). The request may still be on its way; asked too soon, the broker
        knows nothing of it and the order would be placed twice. So wait until that attempt is as old as the
        broker timeout, as long as its sender would have waited for the answer itself. Once a dead holder's lock
        is taken over as soon as its lease lapses, this wait is what keeps that early takeover safe."""
        sent = history.sending_since(intent.intent_id)
        if sent is None:
            return
        remaining = self.settings.broker_timeout_seconds + self.clock.seconds_until(sent)
        if remaining > 0:
            log.info("intent %s: an earlier attempt got no answer; %.1fs for it to reach the broker before asking",
                     intent.intent_id, remaining)  # fmt: skip
            await asyncio.sleep(min(remaining, self.settings.broker_timeout_seconds))

    # ----------------------------------------------------------------------------------------- the state

    def _does_not_fit(self, intent: OrderIntent, strategy: Strategy, position: RunPosition) -> str | None:
        if intent.run != strategy.run:
            return f"intent is for run {intent.run}, the strategy is on run {strategy.run}"
        if intent.action is Action.BUY:
            if strategy.status != StrategyStatus.RUNNING.value:
                return f"strategy is {strategy.status}"
            if position.bought:
                return "already bought in this run"
            late = (self.clock.now() - intent.due_at).total_seconds()
            if late > self.settings.missed_buy_grace_seconds:
                return f"{MISSED_BUY} by {late:.0f}s (grace {self.settings.missed_buy_grace_seconds:.0f}s)"
            return None
        if not position.open:
            return "no open position to exit"
        return None

    async def _still_running(self, intent: OrderIntent) -> bool:
        """The strategy's status now, read afresh: a STOP may have landed since this intent was picked up."""
        async with self.sessions() as session:
            current = (
                await session.execute(select(Strategy.status, Strategy.run).where(Strategy.id == intent.strategy_id))
            ).first()
        return current is not None and current.status == StrategyStatus.RUNNING.value and current.run == intent.run

    async def _attempts_after_failure(self, intent: OrderIntent) -> int:
        async with self.sessions() as session:
            return (await run_history(session, intent.strategy_id, intent.run)).attempts_of(intent.intent_id)

    # ----------------------------------------------------------------------------------------- the broker

    async def _place_with_retries(
        self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy, attempts_so_far: int
    ) -> tuple[BrokerOrder, int, int | None]:
        """The order, the attempts made in all, and the attempt that placed it if this delivery did."""
        attempt = attempts_so_far
        # A previous delivery got as far as an attempt: its outcome is unknown to us, not to the broker.
        unclear = attempts_so_far > 0
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(BrokerUnavailable),
            stop=stop_after_attempt(self.settings.order_max_attempts),
            wait=wait_exponential_jitter(initial=0.2, max=2.0, jitter=0.1),
            reraise=True,
        )
        try:
            async for try_ in retrying:
                with try_:
                    if unclear:
                        found = await gateway.find_by_tag(intent.broker_tag)
                        if found is not None:
                            log.info("intent %s: broker already has order %s", intent.intent_id, found.order_id)
                            return await self._confirm(gateway, found.order_id, found), attempt, None
                    attempt += 1
                    # Dated when it is sent: a successor that finds it unanswered gives it that long to arrive.
                    sent_at = max(self.clock.now(), intent.due_at.astimezone(UTC))
                    await self._log_attempt(intent, attempt, "sending", at=sent_at)
                    try:
                        async with (
                            self._held_until_due(intent, attempt) as reserved,
                            contextlib.nullcontext()
                            if reserved
                            else self.rate_limiter.permit(intent.user_id, PRIORITY[intent.action]),
                        ):
                            order_id = await gateway.place_market_order(
                                exchange=strategy.exchange,
                                tradingsymbol=strategy.tradingsymbol,
                                side=intent.action.side,
                                quantity=strategy.quantity,
                                product=strategy.product,
                                tag=intent.broker_tag,
                            )
                    except Withdrawn as withdrawn:
                        await self._log_attempt(intent, attempt, "withdrawn", message=withdrawn.reason,
                                                update_only=True)  # fmt: skip
                        raise
                    except BrokerUnavailable as exc:
                        unclear = True
                        await self._log_attempt(intent, attempt, "unclear", message=exc.message, update_only=True)
                        raise
                    except BrokerError as exc:
                        await self._log_attempt(intent, attempt, "refused", message=exc.message, update_only=True)
                        raise
                    # The broker has it now: should confirming fail, a retry must find it, never place again.
                    unclear = True
                    try:
                        # The attempt row learns the order id with the result, in one transaction.
                        return await self._confirm(gateway, order_id), attempt, attempt
                    except BrokerError:
                        await self._log_attempt(intent, attempt, "placed", order_id=order_id, update_only=True)
                        raise
        except BrokerUnavailable:
            if not unclear:
                raise
            # The last attempt's answer was lost: the broker may hold the order. Ask once more before
            # declaring failure, or a filled order would be left as an untracked open position.
            found = await self._find_after_retries(gateway, intent.broker_tag)
            if found is None:
                raise
            log.warning("intent %s: the last attempt did reach the broker (order %s)", intent.intent_id, found.order_id)
            return await self._confirm(gateway, found.order_id, found), attempt, None
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _early(self, intent: OrderIntent) -> bool:
        return intent.action is Action.BUY and self.clock.seconds_until(intent.due_at) > 0

    @asynccontextmanager
    async def _held_until_due(self, intent: OrderIntent, attempt: int) -> AsyncIterator[bool]:
        """A BUY handed over before its time (`buy_lead_seconds`) is held here, its checks and attempt row done,
        until it is due; then only the broker call is left. It waits and is placed outside the worker's execution
        slots: the BUYs of one instant are all sent at that instant, and a STOPLOSS never waits for a slot
        behind them. The trader may have stopped the strategy meanwhile: then nothing is sent.

        Yields whether the user's rate-limit grant for the due instant was reserved while waiting (if not, the
        order takes one the usual way)."""
        if not self._early(intent):
            yield False
            return
        priority = PRIORITY[intent.action]
        async with self.gate.stepped_out(priority) if self.gate is not None else contextlib.nullcontext():
            reserved = await self.rate_limiter.reserve(
                intent.user_id, time.time() + self.clock.seconds_until(intent.due_at)
            )
            await self.clock.sleep_until(intent.due_at)
            # Redis says "still this run" and marks it buying, in one round trip for every BUY of the instant; only
            # if Redis does not know the strategy (stopped, restarted empty, unreachable) does the database decide.
            try:
                loaded = await self._loaded_checks((intent.strategy_id, intent.run))
            except RedisError:
                loaded = False
            if not loaded:
                if not await self._still_running(intent):
                    raise Withdrawn(attempt, "strategy stopped before its buy time")
                await self._set_runtime(intent.strategy_id, state=RuntimeState.BUYING.value)
            await self._step_aside(intent)
            yield reserved

    async def _mark_buying_if_loaded(self, strategies: list[tuple[int, int]]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for strategy_id, run in strategies:
                await self._buying_if_loaded(
                    keys=[strategy_key(strategy_id), runtime_key(strategy_id)],
                    args=[str(run), RuntimeState.BUYING.value],
                    client=pipe,
                )
            return [bool(loaded) for loaded in await pipe.execute()]

    async def _lookup(self, gateway: OrderGateway, tag: str) -> BrokerOrder | None:
        """The broker's order for `tag`, retrying transient failures briefly (a STOPLOSS may queue behind)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(BrokerUnavailable),
            stop=stop_after_attempt(4),
            wait=wait_exponential_jitter(initial=0.1, max=1.0, jitter=0.05),
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                return await gateway.find_by_tag(tag)
        return None  # pragma: no cover - tenacity either returns or reraises

    async def _find_after_retries(self, gateway: OrderGateway, tag: str) -> BrokerOrder | None:
        try:
            return await self._lookup(gateway, tag)
        except BrokerUnavailable:
            return None

    async def _confirm(self, gateway: OrderGateway, order_id: str, known: BrokerOrder | None = None) -> BrokerOrder:
        """Follow the order to a terminal status (MARKET orders fill in milliseconds)."""
        order = known
        delay = 0.02
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        while order is None or not order.terminal:
            if order is not None:
                if loop.time() > deadline:
                    return order  # still open: recorded as placed, reconciled later
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            try:
                order = await gateway.order_status(order_id)
            except BrokerUnavailable:
                if loop.time() > deadline:
                    raise
                order = None
                await asyncio.sleep(delay)
        if order.status in ("REJECTED", "CANCELLED"):
            raise BrokerRejected(order.status_message or f"order {order.status.lower()} by the broker")
        return order

    # -------------------------------------------------------------------------------------------- outcomes

    async def _complete(
        self,
        intent: OrderIntent,
        strategy: Strategy,
        order: BrokerOrder,
        attempts: int,
        position: RunPosition,
        *,
        placed_attempt: int | None = None,
    ) -> OrderResult:
        """Record a broker order's outcome and tell everyone. `placed_attempt`: the attempt this delivery sent."""
        filled = order.status == "COMPLETE"
        status = OrderStatus.FILLED if filled else OrderStatus.PLACED
        result = self._result(
            intent, status, attempts, broker_order_id=order.order_id, price=order.average_price,
        )  # fmt: skip
        now = self.clock.now()
        spec = spec_for(strategy)
        if intent.action is Action.BUY:
            await self._set_runtime(
                intent.strategy_id,
                state=RuntimeState.BOUGHT.value,
                position="bought",
                quantity=str(strategy.quantity),
                last_action=Action.BUY.value,
                last_buy_order=order.order_id,
                last_order_status=status.value,
                last_order_message="",
                entry_price=f"{order.average_price or 0:.2f}",
                entry_at=now.isoformat(),
            )
            notice = self._notice(
                intent, NotificationKind.ORDER_FILLED, "BUY filled",
                f"Bought {strategy.quantity} {spec.instrument} at {order.average_price}",
            )  # fmt: skip
            told = await self._record_outcome(intent, result, placed_attempt, notice)
            if filled and not await self._still_running(intent):
                # The trader stopped the strategy while this BUY was in flight (or before a lost BUY was
                # adopted): the STOP saw no position, so nobody would manage this one. Square it off at
                # once rather than arm a stop for a stopped strategy (crash matrix seed 9). The square-off is
                # requested before the fill is announced: announcing may wait on Kafka for seconds, and a worker
                # killed meanwhile left the shares with nobody to sell them (seed 20).
                await self.manager.square_off_orphan(strategy, intent.trading_day)
                await self._announce(intent, told)
                return result
            if strategy.protective_stop and filled:
                await self.protection.place(await self.gateways(intent.user_id), intent, strategy)
            armed = StrategyLifecycle(
                kind=LifecycleKind.ARMED, spec=spec, run=intent.run, trading_day=intent.trading_day,
                occurred_at=now, entry_price=order.average_price, opened_at=intent.due_at,
            )  # fmt: skip
            await self._announce(intent, told, armed)
            return result

        exit_state = _EXIT_STATE[intent.action]
        await self._set_runtime(
            intent.strategy_id,
            state=exit_state.value,
            position=exit_state.value,
            last_action=intent.action.value,
            last_sell_order=order.order_id,
            last_order_status=status.value,
            last_order_message="",
            exit_price=f"{order.average_price or 0:.2f}",
            exit_at=now.isoformat(),
        )
        if intent.action is Action.STOPLOSS:
            notice = self._notice(
                intent, NotificationKind.STOPLOSS_TRIGGERED, "STOP-LOSS Triggered",
                f"Sold {strategy.quantity} {spec.instrument} at {order.average_price} (stop {spec.stop_loss})",
            )  # fmt: skip
        else:
            notice = self._notice(
                intent, NotificationKind.ORDER_FILLED, f"{intent.action.value} filled",
                f"Sold {strategy.quantity} {spec.instrument} at {order.average_price}",
            )  # fmt: skip
        # A SELL or STOPLOSS ends the strategy's day (an EXIT is the trader's STOP, which sets its own status).
        finish = (strategy, StrategyStatus.COMPLETED, f"exited by {intent.action.value}")
        told = await self._record_outcome(
            intent, result, placed_attempt, notice, finish if intent.action is not Action.EXIT else None
        )
        exited = StrategyLifecycle(
            kind=LifecycleKind.EXITED, spec=spec, run=intent.run, trading_day=intent.trading_day,
            occurred_at=now, entry_price=position.entry_price, reason=intent.action.value,
        )  # fmt: skip
        await self._announce(intent, told, exited)
        if intent.action is not Action.EXIT:
            await self._left_the_day(strategy, StrategyStatus.COMPLETED)
        return result

    async def _record_outcome(
        self,
        intent: OrderIntent,
        result: OrderResult,
        placed_attempt: int | None,
        notice: UserNotification,
        finish: tuple[Strategy, StrategyStatus, str] | None = None,
    ) -> Told:
        """What a finished order changes in the database, in one transaction (one commit per order instead of
        four): the attempt's broker order id, the result row, the trader's notice, the strategy's end.

        Should any of it be there already (a redelivery racing its twin, a notice given before a crash), each
        part is retried on its own and what was already there is left as it is."""
        steps: dict[str, Rows | Step] = {}
        if placed_attempt is not None:
            steps["placed"] = self._attempt_update(intent, placed_attempt, "placed", result.broker_order_id)
        steps["result"] = Rows(INSERT_ORDER_LOG, self._result_log_row(intent, result))
        steps["notice"] = Rows(INSERT_NOTIFICATION, self._notification_row(notice))
        if finish is not None:
            steps["finish"] = lambda session: self._finish_in(session, *finish)
        try:
            await self.journal.write(*steps.values())
            return Told(result, notice)
        except IntegrityError:
            pass
        done: dict[str, bool] = {}
        for name, step in steps.items():
            try:
                await self.journal.write(step)
                done[name] = True
            except IntegrityError:
                done[name] = False
        if not done["result"]:
            log.info("intent %s result already recorded", intent.intent_id)
        return Told(result if done["result"] else None, notice if done["notice"] else None)

    async def _announce(self, intent: OrderIntent, told: Told, lifecycle: StrategyLifecycle | None = None) -> None:
        """The order result, the lifecycle event and the notice, sent together and acknowledged together.

        Bounded: if Kafka does not acknowledge them in time, the intent fails here and its redelivery (which
        finds the result recorded) announces again, instead of the strategy's lane waiting on Kafka."""
        sends: list[Awaitable[None]] = []
        if told.result is not None:
            sends.append(self.publisher.publish(ORDER_RESULTS_TOPIC, intent.strategy_id, told.result))
        if lifecycle is not None:
            sends.append(self.publisher.publish(LIFECYCLE_TOPIC, lifecycle.spec.instrument, lifecycle))
        if told.notice is not None:
            sends.append(self.publisher.publish(NOTIFICATIONS_TOPIC, intent.user_id, told.notice))
        async with asyncio.timeout(ANNOUNCE_SECONDS):
            await asyncio.gather(*sends)

    async def _fail(self, intent: OrderIntent, strategy: Strategy, exc: BrokerError, attempts: int) -> OrderResult:
        expired = isinstance(exc, BrokerTokenExpired)
        status = OrderStatus.FAILED if isinstance(exc, BrokerUnavailable) or expired else OrderStatus.REJECTED
        message = "broker session expired, reconnect" if expired else exc.message
        log.warning("order failed: intent %s after %d attempt(s): %s", intent.intent_id, attempts, message)
        result = self._result(intent, status, attempts, message=message)
        await self._set_runtime(
            intent.strategy_id,
            state=RuntimeState.FAILED.value,
            strategy_status=StrategyStatus.FAILED.value,
            last_order_status=status.value,
            last_order_message=message,
        )
        # Every follow-up is idempotent and comes before the result row: a crash in between is repaired by
        # the redelivery, which finds no result yet and fails the intent again.
        kind = NotificationKind.BROKER_SESSION_EXPIRED if expired else NotificationKind.ORDER_FAILED
        await self._notify(intent, kind, "Order Failed – Strategy Stopped", f"{intent.action.value}: {message}")
        if strategy.status == StrategyStatus.RUNNING.value and strategy.run == intent.run:
            # The auto-stop is sequence 8's STOP: an exit the broker could not be reached for leaves the shares
            # held, so the stop squares them off, as a trader's STOP would (crash matrix seed 9: a SELL failed on
            # a timeout, a 429 and a 5xx, and the position was left open). A refusal (the broker answered no) or
            # an expired session would refuse the square-off too: the trader is told and acts.
            square_off = intent.action.is_exit and isinstance(exc, BrokerUnavailable)
            await self.manager.stop(
                strategy.id,
                square_off=square_off,
                reason=f"order failed: {message}",
                final_status=StrategyStatus.FAILED,
                trigger=Trigger.RECOVERY,
            )
        await self._record_result(result, intent)
        return result

    async def _finish_in(self, session: AsyncSession, strategy: Strategy, status: StrategyStatus, reason: str) -> None:
        now = self.clock.now()
        changed = await session.execute(
            update(Strategy)
            .where(
                Strategy.id == strategy.id,
                Strategy.run == strategy.run,
                Strategy.status == StrategyStatus.RUNNING.value,
            )
            .values(status=status.value, status_reason=reason, updated_at=now)
            .returning(Strategy.id)
        )
        if changed.scalar_one_or_none() is not None:
            session.add(StrategyStatusChange(strategy_id=strategy.id, status=status.value, reason=reason, at=now))

    async def _left_the_day(self, strategy: Strategy, status: StrategyStatus) -> None:
        # The strategy is done for the day: it leaves the symbol set (no more ticks needed for it).
        await self.redis.srem(symbol_key(strategy.instrument), str(strategy.id))
        await self._set_runtime(strategy.id, strategy_status=status.value)

    # ------------------------------------------------------------------------------------------- records

    def _result(
        self,
        intent: OrderIntent,
        status: OrderStatus,
        attempts: int,
        *,
        broker_order_id: str | None = None,
        price: float | None = None,
        message: str | None = None,
    ) -> OrderResult:
        return OrderResult(
            intent_id=intent.intent_id,
            strategy_id=intent.strategy_id,
            user_id=intent.user_id,
            action=intent.action,
            status=status,
            broker_order_id=broker_order_id,
            broker_tag=intent.broker_tag,
            price=price,
            quantity=intent.quantity,
            attempts=attempts,
            message=message,
            occurred_at=self.clock.now(),
        )

    async def _log_attempt(
        self,
        intent: OrderIntent,
        attempt: int,
        status: str,
        *,
        order_id: str | None = None,
        message: str | None = None,
        update_only: bool = False,
        at: datetime | None = None,
    ) -> None:
        if update_only:
            await self.journal.write(self._attempt_update(intent, attempt, status, order_id, message))
        else:
            row = self._log_row(intent, OrderLogKind.ATTEMPT, attempt, status, order_id, None, message, at=at)
            await self.journal.write(Rows(INSERT_ORDER_LOG, row))

    def _log_row(
        self,
        intent: OrderIntent,
        kind: OrderLogKind,
        attempt: int,
        status: str,
        order_id: str | None,
        price: float | None,
        message: str | None,
        *,
        at: datetime | None = None,
    ) -> dict[str, object]:
        return {
            "intent_id": intent.intent_id,
            "strategy_id": intent.strategy_id,
            "user_id": intent.user_id,
            "run": intent.run,
            "action": intent.action.value,
            "kind": kind.value,
            "attempt": attempt,
            "status": status,
            "broker_tag": intent.broker_tag,
            "broker_order_id": order_id,
            "price": _money(price),
            "quantity": intent.quantity,
            "message": message,
            # In UTC: SQLite keeps no offset, and a time event's due instant is in exchange time.
            "created_at": (at or self.clock.now()).astimezone(UTC),
        }

    def _result_log_row(self, intent: OrderIntent, result: OrderResult) -> dict[str, object]:
        return self._log_row(
            intent, OrderLogKind.RESULT, 0, result.status.value, result.broker_order_id, result.price, result.message
        )

    async def _record_result(self, result: OrderResult, intent: OrderIntent) -> None:
        """The result row (at most one per intent), then the event analysts and the app consume."""
        try:
            await self.journal.write(Rows(INSERT_ORDER_LOG, self._result_log_row(intent, result)))
        except IntegrityError:
            log.info("intent %s result already recorded", intent.intent_id)
            return
        await self.publisher.publish(ORDER_RESULTS_TOPIC, intent.strategy_id, result)

    @staticmethod
    def _attempt_update(
        intent: OrderIntent, attempt: int, status: str, order_id: str | None, message: str | None = None
    ) -> Rows:
        """The attempt row's outcome. Its message is set too (None once placed): one statement for every kind of
        update, so a batch of them is one executemany."""
        return Rows(UPDATE_ATTEMPT, {
            "match_intent_id": intent.intent_id, "match_attempt": attempt,
            "new_status": status, "new_order_id": order_id, "new_message": message,
        })  # fmt: skip

    def _notice(self, intent: OrderIntent, kind: NotificationKind, title: str, message: str) -> UserNotification:
        return UserNotification(
            notification_id=f"{intent.intent_id}:{kind.value}",
            user_id=intent.user_id,
            strategy_id=intent.strategy_id,
            kind=kind,
            title=title,
            message=message,
            occurred_at=self.clock.now(),
        )

    @staticmethod
    def _notification_row(notice: UserNotification) -> dict[str, object]:
        return {
            "notification_id": notice.notification_id, "user_id": notice.user_id, "strategy_id": notice.strategy_id,
            "kind": notice.kind.value, "title": notice.title, "message": notice.message,
            "created_at": notice.occurred_at,
        }  # fmt: skip

    async def _notify(self, intent: OrderIntent, kind: NotificationKind, title: str, message: str) -> None:
        notice = self._notice(intent, kind, title, message)
        try:
            await self.journal.write(Rows(INSERT_NOTIFICATION, self._notification_row(notice)))
        except IntegrityError:
            return  # already told
        await self.publisher.publish(NOTIFICATIONS_TOPIC, intent.user_id, notice)

    async def _set_runtime(self, strategy_id: int, **fields: str) -> None:
        flat: list[str] = []
        for key, value in {**fields, "updated_at": self.clock.now().isoformat()}.items():
            flat.extend((key, value))
        await self._hset_if_exists(keys=[runtime_key(strategy_id)], args=flat)


def _money(price: float | None) -> Decimal | None:
    return Decimal(f"{price:.2f}") if price is not None else None


class ProtectiveStops:
    """The optional SL-M order at the broker that guards a position while this system is down.

    Placed after the BUY fills (intent id `{strategy}:{day}:{run}:PROTECT`, logged like any order); released
    before any other exit: cancelled, or, if the broker already executed it, adopted as that exit.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def intent_id(self, intent: OrderIntent) -> str:
        return intent_id_for(intent.strategy_id, intent.trading_day, intent.run, Action.PROTECT)

    def _protect_intent(self, intent: OrderIntent) -> OrderIntent:
        return intent.model_copy(update={"intent_id": self.intent_id(intent), "action": Action.PROTECT})

    async def place(self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy) -> None:
        protect = self._protect_intent(intent)
        await self.executor._log_attempt(protect, 1, "sending")
        try:
            order_id = await gateway.place_stop_order(
                exchange=strategy.exchange, tradingsymbol=strategy.tradingsymbol, quantity=strategy.quantity,
                product=strategy.product, trigger_price=float(strategy.stop_loss), tag=protect.broker_tag,
            )  # fmt: skip
        except BrokerError as exc:
            # The pipeline's own stop still guards the position; the trader is told the broker-side one is off.
            await self.executor._log_attempt(protect, 1, "refused", message=exc.message, update_only=True)
            log.warning("protective stop for strategy %s not placed: %s", strategy.id, exc.message)
            return
        await self.executor._log_attempt(protect, 1, "placed", order_id=order_id, update_only=True)
        await self.executor._set_runtime(strategy.id, protective_order=order_id)

    async def release(self, gateway: OrderGateway, intent: OrderIntent, strategy: Strategy) -> BrokerOrder | None:
        """Cancel the protective order; returns it if the broker had already executed it."""
        if not strategy.protective_stop:
            return None
        protect = self._protect_intent(intent)
        async with self.executor.sessions() as session:
            history = await run_history(session, intent.strategy_id, intent.run)
        attempt = next((row for row in history.rows if row.intent_id == protect.intent_id and row.attempt == 1), None)
        done = history.result_of(protect.intent_id)
        if done is not None:
            if done.status == OrderStatus.FILLED.value and done.broker_order_id:
                return await gateway.order_status(done.broker_order_id)
            return None
        found = await gateway.find_by_tag(protect.broker_tag)
        if found is None:
            if attempt is not None and attempt.status == "sending":
                log.warning("protective stop of strategy %s was never received by the broker", strategy.id)
            return None
        order = found
        if not order.terminal:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(BrokerUnavailable), stop=stop_after_attempt(4),
                wait=wait_exponential_jitter(initial=0.2, max=2.0, jitter=0.1), reraise=True,
            )  # fmt: skip
            async for try_ in retrying:
                with try_:
                    order = await gateway.cancel_order(order.order_id)
        status = OrderStatus.FILLED if order.status == "COMPLETE" else OrderStatus.SKIPPED
        result = self.executor._result(protect, status, 1, broker_order_id=order.order_id, price=order.average_price,
                                       message=f"protective stop {order.status.lower()}")  # fmt: skip
        await self.executor._record_result(result, protect)
        return order if status is OrderStatus.FILLED else None

"""The Strategy Manager: sequence 4 (start: load into Redis, announce) and sequence 8 (stop).

Independent of FastAPI: the API, the execution engine's auto-stop and the recovery code all drive it.

Consistency rules, because Redis, Kafka and the database cannot share a transaction:

- START commits the database first (status running, run + 1) with a compare-and-set, so two concurrent
  STARTs make one run. It then writes Redis and publishes STARTED; if either fails, it undoes the Redis
  keys and marks the run stopped with the reason, and raises `ManagerUnavailable` (nothing half-started).
- STOP does its Kafka and Redis side effects first and commits the database last. Every side effect is
  idempotent (the EXIT intent has a deterministic id, unloading twice is harmless, consumers dedupe
  STOPPED), so a STOP that failed halfway is simply retried: the database still says running.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Protocol

from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.clock import Clock
from core.market import MarketCalendar
from manager.run_specs import initial_runtime, spec_for
from schemas.events import (
    Action,
    Event,
    LifecycleKind,
    OrderIntent,
    Repeat,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    cycle_of,
    intent_id_for,
)
from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus, StrategyStatusChange
from storage.positions import positions_of
from storage.runtime import RuntimeState, RuntimeStore, runtime_key

log = logging.getLogger(__name__)

LIFECYCLE_TOPIC = "strategy-lifecycle"
ORDERS_TOPIC = "orders"

# Runtime states in which the strategy holds (or is acquiring) shares: a stop squares them off.
OPEN_POSITION_STATES = frozenset({RuntimeState.BOUGHT.value, RuntimeState.BUYING.value})


class EventPublisher(Protocol):
    """What the manager needs from Kafka: `core.kafka.EventProducer` (or a lazily started wrapper)."""

    async def publish(self, topic: str, key: str | int, event: Event) -> None: ...


class StrategyNotFound(LookupError):
    """No such strategy, or it belongs to another user (deliberately indistinguishable)."""


class ManagerUnavailable(RuntimeError):
    """Redis or Kafka failed; the strategy is left as it was before the call. Safe to retry."""


class StrategyArchived(RuntimeError):
    """The trader archived the strategy: it is never started again (unarchive it first)."""


@dataclass(frozen=True, slots=True)
class StartOutcome:
    strategy_id: int
    status: str
    run: int
    trading_day: date
    trading_day_is_today: bool
    buy_at: datetime
    sell_at: datetime
    already_running: bool


@dataclass(frozen=True, slots=True)
class StopOutcome:
    strategy_id: int
    status: str
    squared_off: bool
    already_stopped: bool


class StrategyManager:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        runtime: RuntimeStore,
        publisher: EventPublisher,
        clock: Clock,
        calendar: MarketCalendar,
    ) -> None:
        self.session_factory = session_factory
        self.runtime = runtime
        self.publisher = publisher
        self.clock = clock
        self.calendar = calendar

    # ------------------------------------------------------------------------------------------ queries

    def next_run_day(self, repeat: str, trading_day: date) -> date | None:
        """The trading day after `trading_day` for a daily strategy (weekends and NSE holidays skipped), else None."""
        if repeat != Repeat.DAILY.value:
            return None
        return self.calendar.next_trading_day(trading_day + timedelta(days=1))

    def trading_day_for(self, sell_time: time, now: datetime | None = None) -> tuple[date, bool]:
        """Today (exchange time) if it trades and sell_time is still ahead, else the next trading day.

        Returns (day, is_today).
        """
        local = self.calendar.local(now or self.clock.now())
        today = local.date()
        if self.calendar.is_trading_day(today) and local.time() < sell_time:
            return today, True
        return self.calendar.next_trading_day(today + timedelta(days=1)), False

    async def get(self, session: AsyncSession, strategy_id: int, user_id: int | None) -> Strategy:
        query = select(Strategy).where(Strategy.id == strategy_id)
        if user_id is not None:
            query = query.where(Strategy.user_id == user_id)
        strategy = (await session.execute(query)).scalar_one_or_none()
        if strategy is None:
            raise StrategyNotFound(strategy_id)
        return strategy

    async def position_open(self, strategy: Strategy) -> bool:
        """Does the current run hold (or is it buying) shares? Redis knows a BUY in flight before its result is
        written; the order log is the source of truth. Either saying so is enough.

        Redis alone is not: rebuilt from the order log after a restart while a BUY was being recorded, it said
        "waiting" for a position bought a second earlier, the trader's STOP sent no EXIT, and the shares stayed
        at the broker (crash matrix seed 34)."""
        runtime = await self.runtime.runtime(strategy.id)
        if runtime.get("state") in OPEN_POSITION_STATES:
            return True
        async with self.session_factory() as session:
            return (await positions_of(session, [(strategy.id, strategy.run)]))[strategy.id].open

    # ------------------------------------------------------------------------------------------- start

    async def start(self, strategy_id: int, *, user_id: int | None = None) -> StartOutcome:
        """Sequence 4. Idempotent: starting a running strategy changes nothing and reports its state."""
        outcome = await self._start_run(strategy_id, user_id=user_id)
        assert outcome is not None  # noqa: S101 - only a daily run's compare-and-set gives way
        return outcome

    async def start_day(self, strategy_id: int, day: date, after_run: int) -> StartOutcome | None:
        """A daily strategy's run for `day`, started by itself (`manager.daily_runs`). Compare-and-set on the run it
        follows and on `next_run_day == day`: of several workers trying at once, exactly one starts it, and a
        trader's STOP or START in between wins. None: someone else already moved it on."""
        return await self._start_run(strategy_id, day=day, after_run=after_run)

    async def _start_run(
        self, strategy_id: int, *, user_id: int | None = None, day: date | None = None, after_run: int | None = None
    ) -> StartOutcome | None:
        now = self.clock.now()
        async with self.session_factory() as session:
            strategy = await self.get(session, strategy_id, user_id)
            if strategy.status == StrategyStatus.RUNNING.value:
                return self._start_outcome(strategy, already_running=True, now=now) if day is None else None
            if strategy.archived_at is not None:
                if day is not None:
                    return None
                raise StrategyArchived(strategy.id)
            trading_day = day or self.trading_day_for(strategy.sell_time, now)[0]
            next_day = self.next_run_day(strategy.repeat, trading_day)
            # Compare-and-set: of two concurrent STARTs exactly one matches `status != running`.
            query = update(Strategy).where(
                Strategy.id == strategy.id,
                Strategy.status != StrategyStatus.RUNNING.value,
                Strategy.archived_at.is_(None),  # an archive racing this START wins
            )
            if day is not None:
                query = query.where(Strategy.run == after_run, Strategy.next_run_day == day)
            new_run = (
                await session.execute(
                    query.values(
                        status=StrategyStatus.RUNNING.value,
                        run=Strategy.run + 1,
                        trading_day=trading_day,
                        next_run_day=next_day,
                        status_reason=None,
                        updated_at=now,
                    ).returning(Strategy.run)
                )
            ).scalar_one_or_none()
            if new_run is None:
                await session.rollback()
                if day is not None:
                    return None
                await session.refresh(strategy)
                if strategy.archived_at is not None:
                    raise StrategyArchived(strategy.id)
                return self._start_outcome(strategy, already_running=True, now=now)
            reason = "started" if day is None else f"daily run for {day}"
            session.add(StrategyStatusChange(strategy_id=strategy.id, status=StrategyStatus.RUNNING.value,
                                             reason=reason, at=now))  # fmt: skip
            await session.commit()
            await session.refresh(strategy)

        spec = spec_for(strategy)
        try:
            runtime = initial_runtime(new_run, trading_day, now, next_day)
            await self.runtime.load(spec, new_run, trading_day, runtime)
            await self.publisher.publish(
                LIFECYCLE_TOPIC,
                spec.instrument,
                StrategyLifecycle(
                    kind=LifecycleKind.STARTED,
                    spec=spec,
                    run=new_run,
                    trading_day=trading_day,
                    occurred_at=now,
                    next_run_day=next_day,
                ),
            )
        except Exception as exc:
            await self._undo_start(strategy, spec, new_run, exc, end_repetition=day is None)
            raise ManagerUnavailable(f"could not start strategy {strategy.id}: {_reason(exc)}") from exc
        log.info("strategy %s started: run %s for %s", strategy.id, new_run, trading_day)
        return self._start_outcome(strategy, already_running=False, now=now)

    async def _undo_start(
        self, strategy: Strategy, spec: StrategySpec, run: int, exc: BaseException, *, end_repetition: bool
    ) -> None:
        reason = f"start failed: {_reason(exc)}"
        log.warning("strategy %s run %s: %s; rolling back", strategy.id, run, reason)
        try:
            await self.runtime.unload(strategy.id, spec.instrument)
        except RedisError:
            log.exception("strategy %s: could not remove runtime keys after a failed start", strategy.id)
        await self._set_final_status(strategy.id, run, StrategyStatus.STOPPED, reason, end_repetition)

    def _start_outcome(self, strategy: Strategy, *, already_running: bool, now: datetime) -> StartOutcome:
        trading_day = strategy.trading_day or self.trading_day_for(strategy.sell_time, now)[0]
        return StartOutcome(
            strategy_id=strategy.id,
            status=strategy.status,
            run=strategy.run,
            trading_day=trading_day,
            trading_day_is_today=trading_day == self.calendar.local(now).date(),
            buy_at=self.calendar.at(trading_day, strategy.buy_time),
            sell_at=self.calendar.at(trading_day, strategy.sell_time),
            already_running=already_running,
        )

    # -------------------------------------------------------------------------------------------- stop

    async def stop(
        self,
        strategy_id: int,
        *,
        user_id: int | None = None,
        square_off: bool = True,
        reason: str = "stopped by user",
        final_status: StrategyStatus = StrategyStatus.STOPPED,
        trigger: Trigger = Trigger.USER,
        end_repetition: bool = True,
    ) -> StopOutcome:
        """Sequence 8, any time. A strategy that is not running is left alone (no side effects), except that a
        daily strategy waiting for its next day stops repeating.

        `final_status` FAILED (the execution engine's auto-stop) publishes a FAILED lifecycle event instead.
        `end_repetition` False (kill switch, daily loss limit: they hold for one day) keeps a daily strategy's
        next run; a trader's STOP, a failure or an auto-stop ends it.
        """
        now = self.clock.now()
        async with self.session_factory() as session:
            strategy = await self.get(session, strategy_id, user_id)
        if strategy.status != StrategyStatus.RUNNING.value:
            if end_repetition and strategy.next_run_day is not None:
                if await self._end_waiting_repetition(strategy.id, reason):
                    return StopOutcome(strategy.id, StrategyStatus.STOPPED.value, squared_off=False,
                                       already_stopped=False)  # fmt: skip
                async with self.session_factory() as session:  # its next run started meanwhile: stop that
                    strategy = await self.get(session, strategy_id, user_id)
            if strategy.status != StrategyStatus.RUNNING.value:
                return StopOutcome(strategy.id, strategy.status, squared_off=False, already_stopped=True)

        spec = spec_for(strategy)
        trading_day = strategy.trading_day or self.calendar.trading_day_of(now)
        squared_off = False
        try:
            # The EXIT goes out before the keys are deleted: the engine still finds the runtime it needs.
            if square_off and await self.position_open(strategy):
                await self._send_exit(strategy, trading_day, trigger)
                squared_off = True
            await self.runtime.unload(strategy.id, spec.instrument)
            kind = LifecycleKind.FAILED if final_status is StrategyStatus.FAILED else LifecycleKind.STOPPED
            await self.publisher.publish(
                LIFECYCLE_TOPIC,
                spec.instrument,
                StrategyLifecycle(
                    kind=kind,
                    spec=spec,
                    run=strategy.run,
                    trading_day=trading_day,
                    occurred_at=now,
                    reason=reason,
                    next_run_day=None if end_repetition else strategy.next_run_day,
                ),
            )
        except Exception as exc:
            raise ManagerUnavailable(f"could not stop strategy {strategy.id}: {_reason(exc)}") from exc

        changed = await self._set_final_status(strategy.id, strategy.run, final_status, reason, end_repetition)
        log.info("strategy %s run %s %s (squared_off=%s)", strategy.id, strategy.run, final_status, squared_off)
        return StopOutcome(
            strategy.id, final_status.value if changed else StrategyStatus.STOPPED.value, squared_off, not changed
        )

    async def square_off_orphan(self, strategy: Strategy, trading_day: date) -> None:
        """Exit a position found at the broker after its strategy stopped (the engine adopted a lost BUY)."""
        log.warning("strategy %s is stopped but holds a position at the broker: squaring it off", strategy.id)
        await self._send_exit(strategy, trading_day, Trigger.RECOVERY)

    async def _send_exit(self, strategy: Strategy, trading_day: date, trigger: Trigger) -> None:
        now = self.clock.now()
        # The cycle whose position this EXIT closes: the latest BUY's, filled or still on its way. A re-entry BUY
        # in flight as the strategy stops is the position to close (the cycle before it was stopped out, or it
        # would not have been sent); named for the cycle before, the EXIT would be that cycle's second exit.
        async with self.session_factory() as session:
            cycle = (await positions_of(session, [(strategy.id, strategy.run)]))[strategy.id].cycle
            buys = await session.scalars(
                select(OrderLog.intent_id).distinct().where(
                    OrderLog.strategy_id == strategy.id, OrderLog.run == strategy.run,
                    OrderLog.action == Action.BUY.value,
                )
            )  # fmt: skip
            cycle = max([cycle, *(cycle_of(intent_id) for intent_id in buys)])
        exit_intent = OrderIntent(
            intent_id=intent_id_for(strategy.id, trading_day, strategy.run, Action.EXIT, cycle),
            strategy_id=strategy.id,
            user_id=strategy.user_id,
            run=strategy.run,
            cycle=cycle,
            action=Action.EXIT,
            trigger=trigger,
            trading_day=trading_day,
            instrument=strategy.instrument,
            quantity=strategy.quantity,
            due_at=now,
            created_at=now,
        )
        # Recorded before it is sent: should the message be lost with a Kafka broker, recovery finds the
        # request in the database and sends it again (the strategy is no longer running).
        await self._record_exit_request(exit_intent)
        await self.publisher.publish(ORDERS_TOPIC, strategy.id, exit_intent)

    async def _record_exit_request(self, intent: OrderIntent) -> None:
        """Attempt 0, status "requested": the engine's own attempts count from 1, so nothing looks unclear."""
        try:
            async with self.session_factory() as session:
                session.add(
                    OrderLog(
                        intent_id=intent.intent_id, strategy_id=intent.strategy_id, user_id=intent.user_id,
                        run=intent.run, action=intent.action.value, kind=OrderLogKind.ATTEMPT.value, attempt=0,
                        status="requested", broker_tag=intent.broker_tag, quantity=intent.quantity,
                        created_at=intent.created_at,
                    )
                )  # fmt: skip
                await session.commit()
        except IntegrityError:
            pass  # a repeated STOP: already requested

    async def _end_waiting_repetition(self, strategy_id: int, reason: str) -> bool:
        """A daily strategy between two runs: no next run. False if a run started meanwhile (or it had ended)."""
        now = self.clock.now()
        async with self.session_factory() as session:
            result = await session.execute(
                update(Strategy)
                .where(Strategy.id == strategy_id, Strategy.status != StrategyStatus.RUNNING.value,
                       Strategy.next_run_day.is_not(None))
                .values(status=StrategyStatus.STOPPED.value, status_reason=reason, next_run_day=None, updated_at=now)
                .returning(Strategy.id)
            )  # fmt: skip
            if result.scalar_one_or_none() is None:
                await session.rollback()
                return False
            session.add(StrategyStatusChange(strategy_id=strategy_id, status=StrategyStatus.STOPPED.value,
                                             reason=reason, at=now))  # fmt: skip
            await session.commit()
        if await self.runtime.redis.exists(runtime_key(strategy_id)):  # the status shows it at once
            await self.runtime.redis.hset(runtime_key(strategy_id), mapping={
                "strategy_status": StrategyStatus.STOPPED.value, "next_run_day": ""})  # fmt: skip
        log.info("strategy %s: daily repetition ended (%s)", strategy_id, reason)
        return True

    async def _set_final_status(
        self, strategy_id: int, run: int, status: StrategyStatus, reason: str, end_repetition: bool = True
    ) -> bool:
        """Running -> `status` for this run only (a newer START must not be undone). True if it changed."""
        now = self.clock.now()
        values: dict[str, object] = {"status": status.value, "status_reason": reason, "updated_at": now}
        if end_repetition:
            values["next_run_day"] = None
        async with self.session_factory() as session:
            result = await session.execute(
                update(Strategy)
                .where(
                    Strategy.id == strategy_id,
                    Strategy.run == run,
                    Strategy.status == StrategyStatus.RUNNING.value,
                )
                .values(**values)
                .returning(Strategy.id)
            )
            if result.scalar_one_or_none() is None:
                await session.rollback()
                return False
            session.add(StrategyStatusChange(strategy_id=strategy_id, status=status.value, reason=reason, at=now))
            await session.commit()
            return True

    # ---------------------------------------------------------------------------------------- recovery

    async def load(self, strategy: Strategy, runtime_fields: Mapping[str, str] | None = None) -> None:
        """Recreate the Redis keys of a running strategy's current run (sequence 10), without a new run.

        `runtime_fields` overrides the initial runtime (e.g. the position rebuilt from the order log).
        """
        trading_day = strategy.trading_day or self.calendar.trading_day_of(self.clock.now())
        runtime = initial_runtime(strategy.run, trading_day, strategy.updated_at)
        runtime.update(runtime_fields or {})
        await self.runtime.load(spec_for(strategy), strategy.run, trading_day, runtime)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""Seed sequence 10: after a restart, a Redis flush or a Kafka broker that lost its data, rebuild everything
from the database (the source of truth) and leave no open position unprotected.

1. Redis: `strategy:{id}`, `runtime:{id}`, `symbol:{sym}:strategies` for every running strategy, the
   runtime position derived from the order log.
2. Kafka: STARTED for every running strategy (the scheduler re-registers its jobs; a SELL whose time has
   passed fires at once) and ARMED for every open position (the stop-loss agent re-arms it).
3. Broker: every intent with an attempt but no result is published again; the execution engine looks it
   up by its tag at the broker and adopts what the broker says (never a blind re-send).
4. Stops crossed while down: the broker's last price of each open position's instrument is checked and a
   STOPLOSS intent goes out at once where price <= stop.
The marker key `recovery:epoch` says Redis has been rebuilt; its absence (a flushed or new Redis) or a
lifecycle topic whose data the broker lost (`manager.broker_loss`) triggers recovery again. Steps 2 and 3 run
only when the broker lost its data (or an operator forces them): with the topics intact, the lifecycle events
and the unfinished intents are still there for their consumers, and publishing them again would only repeat
them (one ARMED per arming, one exit intent per exit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Protocol

from redis.asyncio import Redis
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from connectors.broker import QUOTE_PACE, BrokerError, BrokerUnavailable, KiteBroker
from core.crypto import SecretBox
from core.settings import Settings
from manager.broker_loss import LifecycleWatch
from manager.reentries import awaiting_reentry, follow_ups
from manager.run_specs import armed_event, initial_runtime, price_exit, spec_for
from manager.strategy_manager import LIFECYCLE_TOPIC, ORDERS_TOPIC, StrategyManager
from schemas.events import (
    Action,
    Event,
    LifecycleKind,
    OrderIntent,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    cycle_of,
    intent_id_for,
)
from storage.db import aware
from storage.locks import ProcessLease, kept_alive_lock
from storage.models import BrokerAccount, OrderLog, OrderLogKind, Strategy, StrategyStatus, User
from storage.positions import RunPosition, positions_by_status, positions_of, running_positions
from storage.runtime import connect_redis
from streams.execution.order_lifecycle import OrderState, strategy_state
from streams.exit_index import position_stop
from streams.price_highs import ARMED_AT_KEY, highest_since, read_highs

log = logging.getLogger(__name__)

MARKER_KEY = "recovery:epoch"
LOCK_KEY = "lock:recovery"
# Short, unlike a strategy's order lock: recovery is idempotent (two at once only repeat each other's writes),
# so nothing is risked by a lock that lapses while its holder is slow, and a lot by one that outlives a killed
# holder. With 10 s, a worker restarted with the Kafka broker waited 6 s for the lock of the worker killed
# mid-recovery, with stops crossed meanwhile waiting on that recovery (crash matrix seed 3).
LOCK_SECONDS = 3.0
RECOVERY_SECONDS = 60.0
BATCH = 100  # concurrent Redis/Kafka calls per step: recovery shares the pool with the order lanes
LTP_ACCOUNTS = 5  # broker sessions tried for last prices (some may have expired)
LTP_ATTEMPTS = 3
OVERDUE_RESEND_SECONDS = 30.0  # an overdue SELL sent by the safety net is not sent again sooner


class BulkPublisher(Protocol):
    """`core.kafka.EventProducer`: recovery queues thousands of events and waits for their acks once."""

    async def publish(self, topic: str, key: str | int, event: Event) -> None: ...

    async def publish_nowait(self, topic: str, key: str | int, event: Event) -> Awaitable[object]: ...


@dataclass(frozen=True)
class RecoveryReport:
    strategies: int
    open_positions: int
    reconciled_intents: int
    stoploss_exits: int
    seconds: float


def runtime_fields(position: RunPosition) -> dict[str, str]:
    orders = {Action.BUY: OrderState.FILLED} if position.bought else {}
    if position.exited and position.exit_action is not None:
        orders[Action(position.exit_action)] = OrderState.FILLED
    state = strategy_state(orders)
    fields = {
        "state": state.value,
        "position": "bought" if position.open else state.value,
        "cycle": str(position.cycle),
    }
    if position.last_action:
        fields["last_action"] = position.last_action
    if position.entry_price is not None:
        fields["entry_price"] = f"{position.entry_price:.2f}"
    if position.buy_order_id:
        fields["last_buy_order"] = position.buy_order_id
    if position.exit_order_id:
        fields["last_sell_order"] = position.exit_order_id
    return fields


class Recovery:
    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        redis: Redis,
        publisher: BulkPublisher,
        manager: StrategyManager,
        lease: ProcessLease | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.redis = redis
        self.publisher = publisher
        self.manager = manager
        self.lease = lease
        self.lifecycle = LifecycleWatch(settings, session_factory, LIFECYCLE_TOPIC)
        self._overdue_sent: dict[tuple[int, int], float] = {}  # (strategy, run) -> not again before (monotonic)

    async def needed(self) -> tuple[str, bool] | None:
        """Why recovery must run now, and whether the broker lost its data; None if it need not run."""
        lost = await self.lifecycle.lost()
        if lost is not None:
            return lost, True
        if not await self.redis.exists(MARKER_KEY):
            return "redis has no recovery marker (new, restarted or flushed)", False
        return None

    async def epoch(self) -> str:
        """When Redis was last rebuilt (the recovery marker's value); "" if it has not been since it lost its data.
        A changed epoch means Redis lost whatever only the processes held, such as the last prices."""
        return str(await self.redis.get(MARKER_KEY) or "")

    async def ensure(self) -> RecoveryReport | None:
        """Run recovery if needed, once across every process that asks at the same time."""
        if await self.needed() is None:
            return None
        async with kept_alive_lock(self.redis, LOCK_KEY, LOCK_SECONDS, RECOVERY_SECONDS, self.lease):
            if (why := await self.needed()) is None:
                return None  # another process just did it
            reason, kafka_lost = why
            log.warning("recovery needed: %s", reason)
            # Bounded: Kafka or Redis going away mid-recovery must not wedge it; the next check retries.
            return await asyncio.wait_for(self.run(republish=kafka_lost), RECOVERY_SECONDS)

    async def run(self, republish: bool = True) -> RecoveryReport:
        """Rebuild Redis from the database; with `republish`, the topics' lifecycle events and unfinished
        intents too (the broker lost them)."""
        started = time.perf_counter()
        now = self.manager.clock.now()
        today = self.manager.calendar.local(now).date()
        async with self.sessions() as session:
            # Traders whose kill switch (or daily loss limit) is engaged today: their BUYs stay held.
            held = list(await session.scalars(select(User.id).where(User.kill_switch_day >= today)))
            strategies = list(
                (await session.execute(select(Strategy).where(Strategy.status == StrategyStatus.RUNNING.value)))
                .scalars()
                .all()
            )
            positions = await running_positions(session)
            unresolved = await self._unresolved_intents(session)
            orphans = await self._orphaned_positions(session)

        loads: list[tuple[StrategySpec, int, date, dict[str, str]]] = []
        events: list[StrategyLifecycle] = []
        open_positions = [s for s in strategies if positions.get(s.id, RunPosition()).open]
        for strategy in strategies:
            spec = spec_for(strategy)
            day = strategy.trading_day or self.manager.calendar.trading_day_of(now)
            position = positions.get(strategy.id, RunPosition())
            runtime = initial_runtime(strategy.run, day, aware(strategy.updated_at)) | runtime_fields(position)
            loads.append((spec, strategy.run, day, runtime))
            if not republish:
                continue
            events.append(StrategyLifecycle(kind=LifecycleKind.STARTED, spec=spec, run=strategy.run, trading_day=day,
                                            occurred_at=now, reason="recovery"))  # fmt: skip
            if position.open:
                events.append(
                    armed_event(
                        spec,
                        strategy.run,
                        day,
                        now,
                        position.entry_price,
                        self.manager.calendar.at(day, strategy.buy_time),
                        reason="recovery",
                        cycle=position.cycle,
                        realised=position.realised(strategy.quantity),
                    )
                )
        # Held before the strategies are loaded: a BUY finding its strategy in Redis goes without asking the
        # database, and the hold went with the Redis that restarted (crash matrix: two BUYs of a trader 3.2 s
        # after the daily loss limit, their strategies not yet stopped, Redis restarted and recovered meanwhile).
        for user_id in held:
            await self.manager.runtime.hold_buys(user_id)
        # One pipelined round trip per thousand strategies, on one connection: the lanes keep the rest.
        await self.manager.runtime.load_many(loads)
        await self._publish_all([(LIFECYCLE_TOPIC, e.spec.instrument, e) for e in events])
        if not republish:
            unresolved = []  # still on `orders`: the intent feed delivers them again (it commits none unfinished)
        await self._publish_all([(ORDERS_TOPIC, i.strategy_id, i) for i in unresolved])
        await self._square_off(orphans)
        # Only now: a recovery cut short (Kafka away, timeout, crash) leaves no marker and runs again.
        await self.redis.set(MARKER_KEY, str(time.time()))

        if republish:
            await self.lifecycle.rebase()  # the republished topic is the new baseline for "went back"
        await self.resume_reentries(strategies, positions)
        exits = await self._exit_crossed_stops(open_positions, positions)
        report = RecoveryReport(len(strategies), len(open_positions), len(unresolved), exits,
                                time.perf_counter() - started)  # fmt: skip
        log.warning(
            "Recovery Complete: %d running strategies, %d open positions, %d intents reconciled, "
            "%d stop-loss exits, in %.2fs",
            report.strategies, report.open_positions, report.reconciled_intents, report.stoploss_exits,
            report.seconds,
        )  # fmt: skip
        return report

    async def exit_crossed_stops(self) -> int:
        """For a process that restarts while Redis survived: stops crossed while it was down exit now, and
        intents whose outcome nobody recorded (their messages may be gone) are sent again (idempotent)."""
        async with self.sessions() as session:
            unresolved = await self._unresolved_intents(session)
            strategies = list(
                (await session.execute(select(Strategy).where(Strategy.status == StrategyStatus.RUNNING.value)))
                .scalars()
                .all()
            )
            positions = await running_positions(session)
            orphans = await self._orphaned_positions(session)
        await self._publish_all([(ORDERS_TOPIC, i.strategy_id, i) for i in unresolved])
        await self._square_off(orphans)
        await self.resume_reentries(strategies, positions)
        holding = [s for s in strategies if positions.get(s.id, RunPosition()).open]
        exits = await self._exit_crossed_stops(holding, positions)
        if exits:
            log.warning("%d stop-loss crossings found at start: exits sent", exits)
        return exits

    async def resume_reentries(self, strategies: list[Strategy], positions: dict[int, RunPosition]) -> int:
        """Strategies between a stop exit and their next cycle's BUY (manager/reentries.py): the decision's
        follow-ups again, for a crash or a lost topic in between. Idempotent: the BUY's id names its cycle, and the
        engine skips it past the cut-off."""
        now = self.manager.clock.now()
        items: list[tuple[str, str | int, Event]] = []
        for strategy in strategies:
            position = positions.get(strategy.id, RunPosition())
            if awaiting_reentry(strategy, position):
                day = strategy.trading_day or self.manager.calendar.trading_day_of(now)
                items += follow_ups(spec_for(strategy), strategy.run, day, position.cycle + 1, now,
                                    position.entry_price, Trigger.RECOVERY)  # fmt: skip
        await self._publish_all(items)
        return len(items)

    async def exit_overdue_sells(self) -> int:
        """Open positions whose SELL is overdue get it now, from the database.

        The scheduler fires each SELL and recovery re-registers the jobs, but a time event can still be lost
        between the scheduler and the execution engine (crash matrix seed 9: a worker started right after a
        broker restart never received most of a burst of time events, and positions stayed open past their
        sell time). A position must not be left naked, so every worker looks every few seconds. The intent
        id is the SELL's own: if the scheduler's SELL arrives as well, execution carries out only one.
        """
        now = self.manager.clock.now()
        calendar = self.manager.calendar
        day = calendar.trading_day_of(now)
        overdue_before = (calendar.local(now) - timedelta(seconds=self.settings.sell_overdue_seconds)).time()
        async with self.sessions() as session:
            rows = (
                (
                    await session.execute(
                        select(Strategy).where(
                            Strategy.status == StrategyStatus.RUNNING.value,
                            Strategy.trading_day == day,
                            Strategy.sell_time <= overdue_before,
                        )
                    )
                )
                .scalars()
                .all()
            )
            candidates = [s for s in rows if self._overdue_sent.get((s.id, s.run), 0.0) < time.monotonic()]
            positions = await positions_of(session, [(s.id, s.run) for s in candidates])
        intents = []
        for strategy in candidates:
            position = positions.get(strategy.id, RunPosition())
            if not position.open:
                continue
            # Once sent, not again for a while: the engine may be retrying it (the lane serialises repeats).
            self._overdue_sent[(strategy.id, strategy.run)] = time.monotonic() + OVERDUE_RESEND_SECONDS
            intents.append(
                OrderIntent(
                    intent_id=intent_id_for(strategy.id, day, strategy.run, Action.SELL, position.cycle),
                    strategy_id=strategy.id, user_id=strategy.user_id, run=strategy.run, cycle=position.cycle,
                    action=Action.SELL, trigger=Trigger.RECOVERY,
                    trading_day=day, instrument=strategy.instrument, quantity=strategy.quantity,
                    due_at=calendar.at(day, strategy.sell_time), created_at=now,
                )
            )  # fmt: skip
        await self._publish_all([(ORDERS_TOPIC, i.strategy_id, i) for i in intents])
        if intents:
            log.warning("%d open positions past their sell time without a SELL: sent (strategies %s)",
                        len(intents), [i.strategy_id for i in intents][:20])  # fmt: skip
        return len(intents)

    async def _publish_all(self, items: Sequence[tuple[str, str | int, Event]]) -> None:
        """Queue everything, then wait for the broker's acknowledgements once (not wave by wave)."""
        acks = [await self.publisher.publish_nowait(topic, key, event) for topic, key, event in items]
        await asyncio.gather(*acks)

    async def _unresolved_intents(self, session: AsyncSession) -> list[OrderIntent]:
        """Intents of running strategies' current runs with an attempt logged and no result: the broker knows.

        A resting protective stop (PROTECT) has no result by design and is not an intent to re-send.
        """
        attempt, result = aliased(OrderLog), aliased(OrderLog)
        rows = await session.execute(
            select(attempt, Strategy.exchange, Strategy.tradingsymbol)
            .join(Strategy, and_(Strategy.id == attempt.strategy_id, Strategy.run == attempt.run))
            .outerjoin(result, and_(result.intent_id == attempt.intent_id, result.kind == OrderLogKind.RESULT.value))
            .where(
                # Whatever the strategy's status now: an order sent before it stopped may be at the broker.
                attempt.kind == OrderLogKind.ATTEMPT.value,
                attempt.action != Action.PROTECT.value,
                result.id.is_(None),
            )
        )
        intents: dict[str, OrderIntent] = {}
        now = self.manager.clock.now()
        for row, exchange, tradingsymbol in rows.tuples():
            if row.intent_id in intents:
                continue
            day = date.fromisoformat(row.intent_id.split(":")[1])
            intents[row.intent_id] = OrderIntent(
                intent_id=row.intent_id, strategy_id=row.strategy_id, user_id=row.user_id, run=row.run,
                cycle=cycle_of(row.intent_id), action=Action(row.action), trigger=Trigger.RECOVERY, trading_day=day,
                instrument=f"{exchange}:{tradingsymbol}", quantity=row.quantity, due_at=aware(row.created_at),
                created_at=now,
            )  # fmt: skip
        return list(intents.values())

    async def exit_orphaned_positions(self) -> int:
        """Today's stopped strategies still holding shares get their EXIT now (every worker, every few seconds).

        The check at start covers every day; this one covers the races a running system can still lose: a STOP
        that read a stale "no position" (crash matrix seed 34), or a fill recorded just as the STOP landed.
        """
        day = self.manager.calendar.trading_day_of(self.manager.clock.now())
        async with self.sessions() as session:
            orphans = await self._orphaned_positions(session, trading_day=day)
        await self._square_off(orphans)
        return len(orphans)

    async def _orphaned_positions(self, session: AsyncSession, trading_day: date | None = None) -> list[Strategy]:
        """Stopped strategies whose current run holds a position and never asked for its EXIT.

        A BUY that fills after the trader's STOP is squared off by the engine as soon as it records the fill
        (`Executor._complete`); a worker that dies between the two leaves the shares at the broker with no
        EXIT requested. A redelivered BUY repairs that (`Executor._repair_followups`), but a Kafka broker that
        restarted empty redelivers nothing (crash matrix seed 5): the database is what remembers it.
        """
        positions = await positions_by_status(session, StrategyStatus.STOPPED, trading_day)
        holding = [strategy_id for strategy_id, position in positions.items() if position.open]
        if not holding:
            return []
        asked = set(
            (
                await session.execute(
                    select(OrderLog.strategy_id)
                    .join(Strategy, and_(Strategy.id == OrderLog.strategy_id, Strategy.run == OrderLog.run))
                    .where(OrderLog.strategy_id.in_(holding), OrderLog.action == Action.EXIT.value)
                )
            ).scalars()
        )
        orphaned = [strategy_id for strategy_id in holding if strategy_id not in asked]
        if not orphaned:
            return []
        return list((await session.execute(select(Strategy).where(Strategy.id.in_(orphaned)))).scalars())

    async def _square_off(self, orphans: list[Strategy]) -> None:
        today = self.manager.calendar.trading_day_of(self.manager.clock.now())
        for strategy in orphans:
            # Recorded before it is sent, under the EXIT's own intent id: a STOP's EXIT racing it is the same.
            await self.manager.square_off_orphan(strategy, strategy.trading_day or today)

    async def _exit_crossed_stops(self, open_positions: list[Strategy], positions: dict[int, RunPosition]) -> int:
        """A STOPLOSS for each position whose stop the broker's last price is at or under, a TARGET for each whose
        target it is at or above (stops and targets in points or percent resolved from the recorded entry)."""
        if not open_positions:
            return 0
        prices = await self.last_prices(sorted({s.instrument for s in open_positions}))
        highs = await self._seen_highs(open_positions)
        now = self.manager.clock.now()
        intents = []
        for strategy in open_positions:
            price = prices.get(strategy.instrument)
            position = positions.get(strategy.id, RunPosition())
            entry = position.entry_price
            if price is None:
                continue
            day = strategy.trading_day or self.manager.calendar.trading_day_of(now)
            # With the cycle's own loss limit.
            armed = armed_event(
                spec_for(strategy), strategy.run, day, now, entry, None, cycle=position.cycle,
                realised=position.realised(strategy.quantity),
            )  # fmt: skip
            # The stop as the workers' index held it: risen (trailing, moved to cost) where the highs are known.
            stop = position_stop(strategy.exits, entry, strategy.quantity, highs.get(strategy.id))
            if (intent := price_exit(armed, price, stop, now, Trigger.RECOVERY)) is not None:
                intents.append(intent)
        await self._publish_all([(ORDERS_TOPIC, i.strategy_id, i) for i in intents])
        return len(intents)

    async def _seen_highs(self, strategies: list[Strategy]) -> dict[int, float]:
        """Per position whose stop can rise, the highest price the workers read since they armed it, as they left
        it in Redis (`streams/price_highs.py`); none for a Redis that was flushed or rebuilt."""
        rising = [
            s for s in strategies
            if s.exits.trails or s.exits.move_to_cost_points is not None or s.exits.move_to_cost_percent is not None
        ]  # fmt: skip
        if not rising:
            return {}
        try:
            armed_at = await self.redis.hmget(ARMED_AT_KEY, [str(s.id) for s in rising])
            pairs = await read_highs(self.redis, sorted({s.instrument for s in rising}))
        except Exception:
            log.warning("recovery: trailing highs not readable: stops checked at their configured levels")
            return {}
        highs: dict[int, float] = {}
        for strategy, since in zip(rising, armed_at, strict=True):
            seen = highest_since(pairs.get(strategy.instrument, []), float(since)) if since is not None else None
            if seen is not None:
                highs[strategy.id] = seen
        return highs

    async def last_prices(self, instruments: list[str]) -> dict[str, float]:
        """The broker's last traded prices, through any working session (market data is not per user).

        The most recently connected session first; one whose token expired is skipped for the next, and a
        transient failure (timeout, 5xx, 429) is retried: ticks are sent only when a price changes, so a
        stop crossed while the system was down and not seen here may not be seen again (crash matrix).
        """
        async with self.sessions() as session:
            accounts = list(
                (
                    await session.execute(
                        select(BrokerAccount).order_by(BrokerAccount.updated_at.desc()).limit(LTP_ACCOUNTS)
                    )
                )
                .scalars()
                .all()
            )
        box = SecretBox(self.settings)
        for account in accounts:
            broker = KiteBroker(
                self.settings, box.decrypt(account.api_key_encrypted), box.decrypt(account.access_token_encrypted)
            )
            prices: dict[str, float] = {}
            for attempt in range(1, LTP_ATTEMPTS + 1):
                try:
                    for offset in range(0, len(instruments), 500):  # Kite answers up to 1,000 instruments a call
                        await QUOTE_PACE.turn(broker.client.api_key)  # one quote call a second per api_key
                        quotes = await broker.call(broker.client.ltp, instruments[offset : offset + 500])
                        prices.update({key: float(q["last_price"]) for key, q in quotes.items()})
                    return prices
                except BrokerUnavailable as exc:
                    log.warning("recovery: last prices failed (%s), attempt %d/%d", exc.message, attempt, LTP_ATTEMPTS)
                    await asyncio.sleep(0.2 * attempt)  # after a 429 the pace waits out the rest of the second
                except BrokerError as exc:
                    log.warning("recovery: broker session of user %s refused last prices (%s): trying another",
                                account.user_id, exc.message)  # fmt: skip
                    break
        log.warning("recovery could not read last prices: stops are checked on the next tick")
        return {}

    async def close(self) -> None:
        await self.lifecycle.close()


async def run_recovery(settings: Settings, *, force: bool) -> RecoveryReport | None:
    """Recovery as a one-off (`algo recover`): with `force`, even when nothing says it is needed."""
    from core.clock import get_clock
    from core.kafka import EventProducer
    from core.market import MarketCalendar
    from storage.db import create_engine, session_factory
    from storage.runtime import RuntimeStore

    engine = create_engine(settings.database_url)
    redis = connect_redis(settings.redis_url)
    producer = EventProducer(settings)
    sessions = session_factory(engine)
    manager = StrategyManager(sessions, RuntimeStore(redis), producer, get_clock(), MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, producer, manager)
    await producer.start()
    try:
        if force:
            async with kept_alive_lock(redis, LOCK_KEY, ttl=LOCK_SECONDS, wait=RECOVERY_SECONDS):
                return await recovery.run(republish=True)
        return await recovery.ensure()
    finally:
        await recovery.close()
        await producer.stop()
        await redis.aclose()
        await engine.dispose()

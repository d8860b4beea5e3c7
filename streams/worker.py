"""The Faust worker: the stop-loss agent (seed sequence 7), the time-event agent and the execution agent.

Run one or several (`algo worker`); partitions spread over them. Agents:
- `lifecycle`  (strategy-lifecycle, key instrument): arms/disarms stops in the `armed-stops` table
- the tick feed (ticks, key instrument, co-partitioned with lifecycle): price <= stop -> one STOPLOSS
  intent; a plain consumer on this worker's tick partitions rather than an agent (streams/tick_feed.py)
- time events (time-events, key strategy): the scheduler's BUY/SELL -> order intents, and
- the execution agent (orders, key strategy): one lane per strategy, lanes run concurrently; both read by
  a plain consumer group that never commits past an unfinished intent (streams/intent_feed.py)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from typing import Any

import faust
import mode
import orjson
from aiokafka import ConsumerRecord
from pydantic import ValidationError

from connectors.directory import BrokerDirectory
from core import metrics
from core.clock import Clock, get_clock
from core.kafka import EventProducer, ensure_topics
from core.market import MarketCalendar
from core.settings import Settings
from manager.daily_loss import DailyLossLimits
from manager.daily_runs import DailyRuns
from manager.recovery import Recovery
from manager.reentries import reentry_intent
from manager.strategy_manager import StrategyManager
from schemas.events import (
    Action,
    LifecycleKind,
    OrderIntent,
    StrategyLifecycle,
    TimeEvent,
    Trigger,
    intent_id_for,
    raise_stop_id_for,
)
from storage.db import create_engine, session_factory
from storage.journal import GroupCommit
from storage.locks import ProcessLease
from storage.runtime import LTP_KEY, RuntimeStore, connect_redis
from streams.broker_prices import BrokerPrices
from streams.execution import Executor
from streams.execution.lanes import StrategyLanes
from streams.execution.limits import BrokerRateLimiter
from streams.exit_index import ExitHit, ExitIndex, Trail
from streams.faust_app import ServiceWorker, build_faust_app, raw_topic
from streams.intent_feed import IntentFeed
from streams.price_highs import ARMED_AT_KEY, PriceHighs
from streams.rebalance_watch import RebalanceWatch
from streams.reentry_watch import reentry_watch, stale_cycle
from streams.stop_steps import StopSteps
from streams.tick_feed import LATE_AFTER_MS, TickFeed

log = logging.getLogger(__name__)

LAST_PRICE_FLUSH_SECONDS = 0.25
RECOVERY_CHECK_SECONDS = 2.0
DAILY_LOSS_CHECK_SECONDS = 1.0  # a trader's loss across strategies, from the order log and the last prices
METRICS_SECONDS = 5.0  # gauges sampled this often (Prometheus scrapes every 15 s by default)


BROKER_THREADS = 64


def broker_threads() -> ThreadPoolExecutor:
    """kiteconnect is synchronous: a burst of orders needs more threads than asyncio's default pool. Not more
    than this: every thread shares the interpreter with the event loop, and fewer did not place faster (8 and 16
    threads against 64 in the 1,000-BUY burst)."""
    return ThreadPoolExecutor(max_workers=BROKER_THREADS, thread_name_prefix="broker")


class WorkerServices:
    """Connections and engines shared by the agents, opened when the worker starts."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.calendar = MarketCalendar(settings)
        self.ready = asyncio.Event()
        self.index = ExitIndex()
        self.index_stale = True
        self.highs = PriceHighs()  # what trailing highs and moves to cost depend on, kept across restarts
        self.steps = StopSteps(settings.protective_stop_step_ticks)  # protected stops rising a step
        self.latest: dict[str, float] = {}  # instrument -> last price this worker knows
        # ... and when it was seen (the tick's received_at, ISO, project clock): parsed only for a crossing
        self.latest_seen: dict[str, str] = {}
        self.unflushed: dict[str, float] = {}  # ... not yet written to Redis
        self.price_asked_at: dict[str, float] = {}  # instrument -> when its price was asked of the broker
        self.marked_behind: set[str] = set()  # instruments whose status says their prices are read late
        self.checked_stops_at_start = False
        self.prices_restored_epoch: str | None = None  # the recovery epoch the last prices were put back in
        self.recovery_lock = asyncio.Lock()

    async def start(self) -> None:
        asyncio.get_running_loop().set_default_executor(broker_threads())
        # No ping per checkout: a lane retries an intent whose connection died with a database restart.
        self.engine = create_engine(self.settings.database_url, pre_ping=False)
        self.sessions = session_factory(self.engine)
        # The group commit's own connection: in a burst hundreds of lanes queue for the shared pool's, and the
        # one writer that commits for all of them must not wait behind their reads.
        self.journal_engine = create_engine(self.settings.database_url, pre_ping=False, connections=1)
        self.journal = GroupCommit(session_factory(self.journal_engine))
        self.redis = connect_redis(self.settings.redis_url)
        # Names this process in its locks, so a successor takes them over as soon as it is dead.
        self.lease = ProcessLease(self.settings.redis_url)
        await asyncio.to_thread(self.lease.start)
        self.producer = EventProducer(self.settings)
        await self.producer.start()
        self.runtime = RuntimeStore(self.redis)
        self.manager = StrategyManager(self.sessions, self.runtime, self.producer, self.clock, self.calendar)
        book_reads = BrokerRateLimiter(
            self.redis,
            self.settings.broker_book_reads_per_second,
            key_prefix="ratelimit:book-reads:",
            per_minute=int(self.settings.broker_book_reads_per_second * 60),
            exit_reserve=0,
        )
        self.directory = BrokerDirectory(
            self.settings, self.sessions, self.redis, self.clock, lambda user_id: book_reads.permit(user_id, 0)
        )
        self.executor = Executor(
            self.settings,
            self.clock,
            self.sessions,
            self.redis,
            self.producer,
            self.directory.gateway,
            self.manager,
            self.lease,
            self.journal,
        )
        self.lanes = StrategyLanes(self.executor, self.settings.execution_concurrency)
        self.recovery = Recovery(self.settings, self.sessions, self.redis, self.producer, self.manager, self.lease)
        self.broker_prices = BrokerPrices(self.recovery.last_prices, self.broker_price)
        self.daily_loss = DailyLossLimits(self.sessions, self.manager, self.producer, self.redis_prices)
        self.daily_runs = DailyRuns(self.settings, self.sessions, self.manager, self.producer)
        self.ready.set()

    async def redis_prices(self, instruments: list[str]) -> dict[str, float]:
        """The last prices the workers wrote to Redis (every LAST_PRICE_FLUSH_SECONDS)."""
        return await self.runtime.last_prices(instruments)

    def remember_price(self, instrument: str, price: float) -> None:
        """A price of unknown age (Redis's last price), unless a tick already told this worker one: it
        triggers no stop armed after it could have been seen (`seen_at` is -inf)."""
        if instrument not in self.latest:
            self.latest[instrument] = price
            self.latest_seen[instrument] = ""

    def ask_broker_price(self, instrument: str) -> None:
        """Ask the broker for the instrument's last price (answered in `broker_price`)."""
        self.price_asked_at[instrument] = self.clock.now().timestamp()
        self.broker_prices.ask(instrument)

    def broker_price(self, instrument: str, price: float) -> None:
        """The broker's last price, just asked for: the current price, seen now; unless a tick seen after the
        question came first. The answer may be older than that tick: taken for the newest price, it could be
        judged against a stop the tick's price has since raised."""
        asked_at = self.price_asked_at.pop(instrument, -math.inf)
        if self.seen_at(instrument) >= asked_at:
            return
        self.latest[instrument] = price
        self.latest_seen[instrument] = self.clock.now().isoformat()

    def seen_at(self, instrument: str) -> float:
        """When this worker's last price of the instrument was seen (unix seconds); -inf if unknown."""
        return _seconds(self.latest_seen.get(instrument))

    async def stop(self) -> None:
        if not self.ready.is_set():
            return
        await self.lanes.close()
        await self.broker_prices.close()
        await self.recovery.close()
        await asyncio.to_thread(self.lease.stop)
        await self.producer.stop()
        await self.redis.aclose()
        await self.engine.dispose()
        await self.journal.close()
        await self.journal_engine.dispose()


def build_worker(settings: Settings, clock: Clock | None = None) -> tuple[faust.App, mode.Service]:
    """The Faust app, and the service to start before it (connections, the tick and intent feeds)."""
    app = build_faust_app(settings, "algo-worker")
    services = WorkerServices(settings, clock or get_clock())
    lifecycle_topic = raw_topic(app, settings.topic("strategy-lifecycle"), settings.ticks_partitions)
    # strategy id -> the armed stop; changelogged to the partition of the lifecycle event that wrote it,
    # i.e. the instrument's partition, so it recovers on the worker that gets that instrument's ticks.
    armed = app.Table("armed-stops", default=None, partitions=settings.ticks_partitions)

    def arm(strategy_id: int, stop: dict[str, Any]) -> None:
        """Arm a position's exits as the `armed-stops` table holds them. A trailing stop's high and a move to cost
        go on from the highest price read since the position was armed (`streams/price_highs.py`): re-armed after
        a restart or a rebalance, they do not start again from the entry."""
        instrument, trail, cost_at = stop["instrument"], stop.get("trail"), stop.get("cost_at")
        rising = Trail(**trail) if trail else None
        seen_high = None
        if rising is not None or cost_at is not None:
            services.highs.follow(instrument)
            seen_high = services.highs.since(instrument, stop.get("armed_at"))
        services.index.arm(
            strategy_id, instrument, stop["stop_loss"], stop.get("target"), stop.get("opened_at"),
            trail=rising, cost_at=cost_at, entry=stop.get("entry"), loss_at=stop.get("loss_at"), seen_high=seen_high,
        )  # fmt: skip
        if stop.get("protective"):
            services.steps.follow(strategy_id, instrument, stop["stop_loss"], trail=rising, cost_at=cost_at,
                                  entry=stop.get("entry"))  # fmt: skip

    def disarm(strategy_id: int) -> None:
        services.index.disarm(strategy_id)
        services.steps.unfollow(strategy_id)

    async def rebuild_index() -> None:
        services.index.clear()
        services.steps.clear()
        records = list(armed.items())
        rising = {stop["instrument"] for _, stop in records if stop.get("trail") or stop.get("cost_at")}
        try:
            await services.highs.reload(services.redis, rising)
        except Exception:  # Redis away: the highs this worker kept, else from the entry (never no stop at all)
            log.exception("trailing highs not read from Redis; positions trail from what this worker read")
        for key, stop in records:
            arm(int(key), stop)
        services.index_stale = False
        log.info("stop-loss index rebuilt: %d armed stops (%d protective stops followed)", len(services.index),
                 len(services.steps))  # fmt: skip

    rebalances = RebalanceWatch(app, give_up=lambda: os.kill(os.getpid(), signal.SIGTERM))

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any = None, *args: Any, **kwargs: Any) -> None:
        rebalances.assigned()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _stop_reading_ticks(sender: Any = None, *args: Any, **kwargs: Any) -> None:
        # Until the rebalance says which instruments are ours; awaited, so that what this worker checked is
        # committed before another worker takes its partitions over (streams/tick_feed.py, "Handover").
        await feed.release()

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _follow_assignment(sender: Any = None, **kwargs: Any) -> None:
        # Tables are recovered by now: rebuild the index before the first tick, then read the ticks of
        # exactly the instruments whose lifecycle partitions (and so armed stops) Faust gave this worker.
        rebalances.completed()
        services.index_stale = True
        lifecycle_name = settings.topic("strategy-lifecycle")
        feed.follow({tp.partition for tp in app.consumer.assignment() if tp.topic == lifecycle_name})

    class _Resources(mode.Service):
        # Started before the Faust app and stopped after it (run_worker), not as an app service: those start
        # only once Faust has joined its group and recovered its tables, about 3 s after a restart. Reading
        # intents and the start-up recovery check need none of that, and a stop crossed while this worker
        # was down is to be exited within 5 s of its return.
        async def on_start(self) -> None:
            # `kill -USR1 <pid>` logs where every task is waiting: what an operator needs when a lane stalls.
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _log_task_stacks)
            metrics.serve(settings.worker_metrics_port, settings.metrics_host, "worker")
            await services.start()
            await feed.start()  # reads nothing until the rebalance says which instruments are ours
            await intents.start()
            self.add_future(recover_at_start())  # at once, not at the first timer tick
            self.add_future(rebalances.run())

        async def on_stop(self) -> None:
            await intents.stop()
            await feed.stop()
            await services.stop()

    resources = _Resources()

    @app.agent(lifecycle_topic)
    async def lifecycle(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for value in stream:
            await services.ready.wait()
            if services.index_stale:
                await rebuild_index()
            event = StrategyLifecycle.model_validate_json(value)
            key = str(event.spec.strategy_id)
            if stale_cycle(armed.get(key), event):
                yield None
                continue
            if event.kind is LifecycleKind.REENTRY and event.reentry_price is not None:
                # at_entry: the next cycle's BUY waits for a tick back at the previous entry (a target-like level).
                armed[key] = reentry_watch(event)
                arm(event.spec.strategy_id, armed[key])
            elif event.kind is LifecycleKind.ARMED:
                instrument = event.spec.instrument
                exits = event.spec.exits
                stop_price = event.stop_price if event.stop_price is not None else exits.stop_price(event.entry_price)
                target_price = (
                    event.target_price if event.target_price is not None else exits.target_price(event.entry_price)
                )
                if stop_price is None or (exits.has_target and target_price is None):
                    # A relative exit with no entry price (an ARMED from before the entry was known): the last
                    # price seen stands in for it rather than leaving the position unwatched.
                    stand_in = services.latest.get(instrument) or await services.runtime.last_price(instrument)
                    log.error("strategy %s armed without an entry price: exits resolved from %s", key, stand_in)
                    stop_price = exits.stop_price(stand_in) if stop_price is None else stop_price
                    target_price = exits.target_price(stand_in) if target_price is None else target_price
                entry = event.entry_price or services.latest.get(instrument)
                trail = None
                if exits.trails and entry is not None:
                    activate_at = event.trail_activation_price or exits.trail_activation_price(entry)
                    trail = {"high": entry, "points": exits.trail_points, "percent": exits.trail_percent,
                             "activate_at": activate_at}  # fmt: skip
                previous = armed.get(key)
                opened = event.opened_at.timestamp() if event.opened_at else None
                # The same position armed again (its ARMED read twice, recovery re-announcing it; the same run and
                # BUY, not a later entry): its rising stop goes on from the highs since it was first armed.
                same = (
                    previous is not None and previous.get("armed_at") and previous.get("run") == event.run
                    and previous.get("opened_at") == opened and previous.get("entry") == entry
                )  # fmt: skip
                armed[key] = {
                    "instrument": instrument,
                    "stop_loss": stop_price if stop_price is not None else 0.0,
                    "target": target_price,
                    "trail": trail,
                    "cost_at": event.move_to_cost_price or exits.move_to_cost_price(entry),
                    "entry": entry,
                    "loss_at": event.loss_limit_price or exits.loss_limit_price(entry, event.spec.quantity),
                    "user_id": event.spec.user_id,
                    "run": event.run,
                    "cycle": event.cycle,
                    "trading_day": event.trading_day.isoformat(),
                    "quantity": event.spec.quantity,
                    "opened_at": event.opened_at.timestamp() if event.opened_at else None,
                    # Wall-clock, like the price highs: the trailing high is the highest price read since then.
                    "armed_at": previous["armed_at"] if same and previous is not None else time.time(),
                    "protective": event.spec.protective_stop,
                }
                opened_at = armed[key]["opened_at"]
                arm(event.spec.strategy_id, armed[key])
                if (risen := services.steps.due(event.spec.strategy_id, services.index)) is not None:
                    await emit_raises({event.spec.strategy_id: (risen, {"last_price": entry})})
                if trail is not None or armed[key]["cost_at"] is not None:
                    # For recovery's check of stops crossed while down (streams/price_highs.py).
                    await services.redis.hset(ARMED_AT_KEY, key, armed[key]["armed_at"])
                if instrument not in services.latest and (known := await services.runtime.last_price(instrument)):
                    services.remember_price(instrument, known)
                if instrument not in services.latest or services.seen_at(instrument) < (opened_at or -math.inf):
                    # No price seen here since the position opened: the last one known may be stale (a feed
                    # reading behind, Redis after a restart) or merely unchanged since (a quiet instrument ticks
                    # only when its price moves, and may be through the stop already). The broker's last price,
                    # off the agent's path, says which; the sweep below compares it within a moment.
                    services.ask_broker_price(instrument)
            elif event.kind is not LifecycleKind.STARTED or (key in armed and armed[key]["run"] != event.run):
                # Exit, stop, failure, or a new run of a strategy whose old stop was still armed. (A STARTED of
                # the same run is recovery re-announcing it: the stop stays armed.)
                if armed.pop(key, None) is not None:
                    await services.redis.hdel(ARMED_AT_KEY, key)
                disarm(event.spec.strategy_id)
            yield None

    async def check_ticks(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """The stop-loss join for one batch of this worker's ticks (see streams/tick_feed.py). What the batch
        taught the price highs is kept once its exits are in Kafka; a failed batch is read again from scratch."""
        await services.ready.wait()
        if services.index_stale:
            await rebuild_index()
        try:
            await judge_ticks(records)
        except BaseException:
            if services.highs.revert():
                services.index_stale = True  # the index's rising stops took the batch in too
            raise
        services.highs.settle()

    async def judge_ticks(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        hits: list[tuple[ExitHit, dict[str, Any]]] = []
        raised: dict[int, tuple[float, dict[str, Any]]] = {}  # strategy id -> its stop's latest step, the tick
        read_at = time.time()  # the batch's instant for the price highs: one clock read, not one a tick
        highs = services.highs
        rereading = highs.rereading  # after a takeover only: one lookup a tick, none otherwise
        for record in records:
            value = record.value
            try:
                tick = orjson.loads(value)
                instrument, price = tick["instrument"], float(tick["last_price"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("skipping a malformed tick: %r", (value or b"")[:200])
                continue
            mark = (record.offset, record.timestamp)
            if rereading and highs.judged(instrument, mark):  # its last reader finished it (streams/price_highs.py)
                continue
            services.latest[instrument] = services.unflushed[instrument] = price
            services.latest_seen[instrument] = tick.get("received_at") or ""
            highs.take(instrument, price, read_at, mark)
            if services.index.crossed(instrument, price):
                seen_at = _seconds(tick.get("received_at"))
                hits.extend((hit, tick) for hit in services.index.trigger(instrument, price, seen_at))
            for strategy_id, level in services.steps.risen(instrument, price, services.index):
                raised[strategy_id] = (level, tick)  # coalesced: only a position's latest step in the batch
        await emit_exits(hits)
        for hit, _ in hits:
            raised.pop(hit.strategy_id, None)  # exited: its release takes the protective stop off the book
        await emit_raises(raised)

    async def emit_exits(hits: list[tuple[ExitHit, dict[str, Any]]]) -> None:
        """Publish one STOPLOSS or TARGET per hit and wait until Kafka has them all.

        The index forgot the hit stops when it returned them (one exit per position, not one per tick); if a
        publish fails they are armed again and the error propagates, so the ticks are read again and the
        sweep or the next tick retries. A position is never left unwatched because Kafka blinked.
        """
        if not hits:
            return
        metrics.STOPLOSS_TRIGGERED.inc(len(hits))
        outcomes = await asyncio.gather(
            *(_delivered(_emit_exit(hit, tick)) for hit, tick in hits), return_exceptions=True
        )
        failed = [hit.strategy_id for (hit, _), outcome in zip(hits, outcomes, strict=True) if outcome is not None]
        for strategy_id in failed:
            stop = armed.get(str(strategy_id))
            if stop is not None:
                arm(strategy_id, stop)
        if failed:
            raise RuntimeError(f"{len(failed)} exit intents not acknowledged by Kafka; their stops are re-armed")

    async def emit_raises(raised: dict[int, tuple[float, dict[str, Any]]]) -> None:
        """One RAISE_STOP per protected position whose stop rose a step: its broker SL-M follows. A failed publish
        is only logged: the SL-M stays at its last trigger (still a stop) and the next step raises it."""
        if not raised:
            return
        outcomes = await asyncio.gather(
            *(_delivered(_emit_raise(sid, level, tick)) for sid, (level, tick) in raised.items()),
            return_exceptions=True,
        )
        failed = [outcome for outcome in outcomes if outcome is not None]
        if failed:
            log.warning("%d protective stop raises not published (%s): they follow at the next step", len(failed),
                        failed[0])  # fmt: skip

    async def _emit_raise(strategy_id: int, level: float, tick: dict[str, Any]) -> Awaitable[object] | None:
        stop = armed.get(str(strategy_id))
        if stop is None:
            return None
        now = services.clock.now()
        trading_day = date.fromisoformat(stop["trading_day"])
        intent = OrderIntent(
            intent_id=raise_stop_id_for(strategy_id, trading_day, stop["run"], level, stop.get("cycle", 1)),
            strategy_id=strategy_id, cycle=stop.get("cycle", 1),
            user_id=stop["user_id"], run=stop["run"], action=Action.RAISE_STOP, trigger=Trigger.PRICE,
            trading_day=trading_day, instrument=stop["instrument"], quantity=stop["quantity"], due_at=now,
            created_at=now, trigger_price=tick["last_price"], exit_kind=services.index.kind(strategy_id),
            exit_level=level,
        )  # fmt: skip
        log.info("stop of strategy %s rose to %s: its protective SL-M follows", strategy_id, level)
        return await services.producer.publish_nowait("orders", strategy_id, intent)

    async def _delivered(queued: Awaitable[Awaitable[object] | None]) -> None:
        acknowledgement = await queued
        if acknowledgement is not None:
            await acknowledgement

    feed = TickFeed(settings, check_ticks)

    async def _emit_exit(hit: ExitHit, tick: dict[str, Any]) -> Awaitable[object] | None:
        """Queue the STOPLOSS or TARGET intent; returns Kafka's acknowledgement to await (one price may cross
        many)."""
        strategy_id, action = hit.strategy_id, hit.action
        stop = armed.get(str(strategy_id))
        if stop is None:
            return None
        now = services.clock.now()
        trading_day = date.fromisoformat(stop["trading_day"])
        cycle = stop.get("cycle", 1)
        if stop.get("reentry"):
            log.info("re-entry: strategy %s back at %s (entry %s): BUY of cycle %s", strategy_id, tick["last_price"],
                     hit.level, cycle)  # fmt: skip
            buy = reentry_intent(strategy_id, stop["user_id"], stop["instrument"], stop["quantity"], stop["run"],
                                 trading_day, cycle, now, Trigger.PRICE, tick["last_price"])  # fmt: skip
            return await services.producer.publish_nowait("orders", strategy_id, buy)
        intent = OrderIntent(
            intent_id=intent_id_for(strategy_id, trading_day, stop["run"], action, cycle),
            strategy_id=strategy_id,
            user_id=stop["user_id"],
            run=stop["run"],
            cycle=cycle,
            action=action,
            trigger=Trigger.PRICE,
            trading_day=trading_day,
            instrument=stop["instrument"],
            quantity=stop["quantity"],
            due_at=now,
            created_at=now,
            trigger_price=tick["last_price"],
            exit_kind=hit.kind,
            exit_level=hit.level,
            source_published_at=datetime.fromisoformat(tick["received_at"]) if tick.get("received_at") else None,
        )
        log.info("%s hit: strategy %s at %s (%s %s)", action.value, strategy_id, tick["last_price"], hit.kind.value,
                 hit.level)  # fmt: skip
        return await services.producer.publish_nowait("orders", strategy_id, intent)

    @app.timer(LAST_PRICE_FLUSH_SECONDS)
    async def _flush_and_sweep() -> None:
        if not services.ready.is_set():
            return
        # One Redis write per instrument per interval, never one per strategy per tick.
        try:
            await services.highs.flush(services.redis, time.time())
        except Exception:
            log.exception("trailing highs not written to Redis; retried at the next interval")
        if services.unflushed:
            prices, services.unflushed = services.unflushed, {}
            await services.runtime.set_last_prices(prices)
            # The status of a trader whose prices this worker reads late says so (and no longer, once caught up).
            behind_ms = feed.lateness.take_recent()
            if behind_ms >= LATE_AFTER_MS:
                services.marked_behind.update(prices)
                await services.runtime.set_feed_behind(prices, behind_ms, ())
            elif caught_up := services.marked_behind.intersection(prices):
                services.marked_behind -= caught_up
                await services.runtime.set_feed_behind((), 0.0, caught_up)
        # A stop armed at a price already through it (arming after the crossing tick, or a restart that saw
        # no tick yet) exits here, within one interval, even if the instrument never ticks again; prices this
        # worker has not seen come from Redis. O(instruments), not O(stops).
        unknown = sorted(services.index.instruments() - services.latest.keys())
        if unknown:
            for instrument, value in zip(unknown, await services.redis.hmget(LTP_KEY, unknown), strict=True):
                if value is not None:
                    services.remember_price(instrument, float(value))
        await emit_exits([
            (hit, {"last_price": price})
            for instrument, price in list(services.latest.items())
            if services.index.crossed(instrument, price)
            for hit in services.index.trigger(instrument, price, services.seen_at(instrument))
        ])  # fmt: skip

    async def check_recovery() -> bool:
        # Redis flushed or restarted, or the Kafka broker lost its data: rebuild from the database.
        try:
            async with services.recovery_lock:  # the start-up check and the timer must not overlap
                report = await services.recovery.ensure()
                # Redis back empty (whoever recovered it) lost the last prices too: put back the ones this worker
                # knows. Only absent ones are written, so a fresher price written since is kept. Once per rebuild
                # (a new epoch), not at every check: a write per instrument seen is a long pipeline, a stall of the
                # event loop for every tick and order in flight.
                epoch = await services.recovery.epoch()
                if epoch != services.prices_restored_epoch:
                    await services.runtime.restore_last_prices(dict(services.latest))
                    services.prices_restored_epoch = epoch
                if report is None and not services.checked_stops_at_start:
                    # Redis survived, but this worker was down: a stop may have been crossed meanwhile.
                    await services.recovery.exit_crossed_stops()
                services.checked_stops_at_start = True
                # The safety nets for a SELL lost on its way from the scheduler (crash matrix seed 9), and for a
                # stopped strategy left holding shares (seed 34).
                await services.recovery.exit_overdue_sells()
                await services.recovery.exit_orphaned_positions()
        except Exception:
            log.exception("recovery failed; retrying")
            return False
        return True

    async def recover_at_start() -> None:
        # Retried until it succeeds, and quickly: the app's timer runs only once Faust is ready, 3 s or more
        # after a restart, and a first try can fail on a Kafka broker that has just restarted (crash matrix
        # seed 25: the new broker refused recovery's events, and the next try came 5.5 s later).
        delay = 0.25
        while not await check_recovery():
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECOVERY_CHECK_SECONDS)

    @app.timer(DAILY_LOSS_CHECK_SECONDS)
    async def _check_daily_loss_limits() -> None:
        if not services.ready.is_set():
            return
        try:
            await services.daily_loss.check()
        except Exception:
            log.exception("daily loss limit check failed; retrying at the next interval")

    @app.timer(settings.daily_run_check_seconds)
    async def _start_daily_runs() -> None:
        if not services.ready.is_set():
            return
        try:
            await services.daily_runs.check()
        except Exception:
            log.exception("daily runs check failed; retrying at the next interval")

    @app.timer(RECOVERY_CHECK_SECONDS)
    async def _recover_when_needed() -> None:
        if services.ready.is_set():
            await check_recovery()

    @app.timer(METRICS_SECONDS)
    async def _gauges() -> None:
        metrics.STOPS_ARMED.set(len(services.index))
        for consumer, group in ((getattr(feed, "consumer", None), "algo-worker-ticks"),
                                (getattr(intents, "consumer", None), "algo-worker-intents")):  # fmt: skip
            if consumer is not None:  # started
                await metrics.record_consumer_lag(consumer, settings.topic(group))

    async def intents_from_time_events(values: list[bytes]) -> None:
        # A batch at a time, sent together and acknowledged together: 1,000 BUYs due in the same second must
        # not wait for each other's broker acknowledgement one by one.
        acks = []
        for value in values:
            try:
                event = TimeEvent.model_validate_json(value)
            except ValidationError as exc:
                log.error("skipping a malformed time event: %s (%r)", exc.errors()[:1], value[:200])
                continue
            intent = OrderIntent(
                intent_id=intent_id_for(event.strategy_id, event.trading_day, event.run, event.action),
                strategy_id=event.strategy_id,
                user_id=event.user_id,
                run=event.run,
                action=event.action,
                trigger=Trigger.SCHEDULE,
                trading_day=event.trading_day,
                instrument=event.instrument,
                quantity=event.quantity,
                due_at=event.due_at,
                created_at=services.clock.now(),
            )
            acks.append(await services.producer.publish_nowait("orders", event.strategy_id, intent))
        await asyncio.gather(*acks)

    async def execute_intent(value: bytes, done: Callable[[], None]) -> None:
        # The partition's offset advances only when the intent is carried out: `done` is called by its lane.
        try:
            intent = OrderIntent.model_validate_json(value)
        except ValidationError as exc:
            log.error("skipping a malformed order intent: %s (%r)", exc.errors()[:1], value[:200])
            done()
            return
        await services.lanes.submit(intent, done)

    intents = IntentFeed(settings, intents_from_time_events, execute_intent)

    return app, resources


def _seconds(iso: str | None) -> float:
    """A tick's received_at as unix seconds; -inf when unknown (a price of unknown age triggers only stops
    armed without an opening instant)."""
    if not iso:
        return -math.inf
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return -math.inf


def _log_task_stacks() -> None:
    tasks = asyncio.all_tasks()
    log.warning("%d tasks:", len(tasks))
    for task in tasks:
        # Follow the chain of awaits down to where the task is suspended (get_stack gives only the top).
        where: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(where) < 40:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        log.warning("task %s: %s", task.get_name(), " -> ".join(where) or "(not started)")


def run_worker(settings: Settings) -> None:
    # A broker that restarted empty has no topics: Faust would subscribe to nothing and sit idle.
    asyncio.run(ensure_topics(settings))
    worker_process(settings).execute_from_commandline()


def worker_process(settings: Settings) -> ServiceWorker:
    app, resources = build_worker(settings)
    # A Faust worker starts its services in the order given, and the app after them (see `_Resources`).
    return ServiceWorker(app, resources, settings=settings, service="worker")

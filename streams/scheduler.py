"""The scheduler (seed sequences 4, 5, 6): BUY at buy_time and SELL at sell_time, in exchange time.

A Faust app of its own (`algo scheduler`), consuming `strategy-lifecycle`: STARTED registers a strategy's
jobs, EXITED/STOPPED/FAILED cancel them. Jobs live in a table changelogged to the lifecycle partition, so a
job belongs to exactly one scheduler in steady state and moves with its partition on a rebalance. A job is
re-fired after a rebalance or restart if its time has passed: harmless, because the execution engine
drops an intent that already has a result. A missed job fires at once; the execution engine decides that a
BUY past its grace period is skipped (a late entry is worse than none), while a missed SELL always goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import date, time, timedelta
from typing import Any

import faust
import mode

from core import metrics
from core.clock import Clock, get_clock
from core.kafka import EventProducer, ensure_topics
from core.market import MarketCalendar
from core.settings import Settings
from schemas.events import Action, LifecycleKind, StrategyLifecycle, TimeEvent
from streams.faust_app import ServiceWorker, build_faust_app, raw_topic
from streams.job_book import Job, JobBook

log = logging.getLogger(__name__)


RETRY_SECONDS = 0.5


class SchedulerCore:
    """Due-time bookkeeping and firing, independent of Faust (unit-tested on a manual clock)."""

    def __init__(self, settings: Settings, clock: Clock, publish: Any) -> None:
        self.settings = settings
        self.clock = clock
        self.calendar = MarketCalendar(settings)
        self.book = JobBook()
        self.specs: dict[int, dict[str, Any]] = {}
        self.publish = publish
        self.wakeup = asyncio.Event()
        self.last_pass_failed = False
        # A BUY goes out early so the engine has done everything but the broker call when it falls due (it holds
        # the order until then): at 09:30:00 a thousand entries are a thousand broker calls, not a thousand
        # times the checks and the writes. A SELL is never early: it would hold its strategy's lane, and a stop
        # crossed meanwhile must not wait behind it.
        self.lead = {Action.BUY: timedelta(seconds=settings.buy_lead_seconds), Action.SELL: timedelta(0)}

    def register(self, strategy_id: int, job: dict[str, Any]) -> None:
        self.cancel(strategy_id)
        self.specs[strategy_id] = job
        day = date.fromisoformat(job["trading_day"])
        for action, at in ((Action.BUY, job["buy_time"]), (Action.SELL, job["sell_time"])):
            due = self.calendar.at(day, time.fromisoformat(at))
            self.book.add(Job(due - self.lead[action], due, strategy_id, action, job["run"]))
        self.wakeup.set()

    def cancel(self, strategy_id: int) -> None:
        self.book.cancel(strategy_id)
        self.specs.pop(strategy_id, None)

    def clear(self) -> None:
        self.book.clear()
        self.specs.clear()

    async def fire_due(self) -> int:
        """Publish every job to fire now; a job whose publish fails goes back in the book for the next pass."""
        now = self.clock.now()
        fired: list[tuple[Job, TimeEvent]] = []
        for job in self.book.pop_due(now):
            spec = self.specs.get(job.strategy_id)
            if spec is None:
                continue
            event = TimeEvent(
                strategy_id=job.strategy_id,
                user_id=spec["user_id"],
                run=job.run,
                action=job.action,
                instrument=spec["instrument"],
                quantity=spec["quantity"],
                trading_day=date.fromisoformat(spec["trading_day"]),
                due_at=job.due_at,
                fired_at=now,
            )
            fired.append((job, event))
        # 10,000 jobs due in one second all go out in that second: publish concurrently, not one by one.
        outcomes = await asyncio.gather(*(self.publish(event) for _, event in fired), return_exceptions=True)
        published = 0
        self.last_pass_failed = False
        for (job, _), outcome in zip(fired, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("time event %s of strategy %s not published (%s): retrying", job.action, job.strategy_id,
                          outcome)  # fmt: skip
                self.book.add(job)
                self.last_pass_failed = True
                continue
            published += 1
            if job.action is Action.SELL:
                self.specs.pop(job.strategy_id, None)
        return published

    async def run(self, refresh: Callable[[], None] = lambda: None) -> None:
        """Fire jobs as they fall due; `refresh` runs before each look at the book (rebuild after rebalance)."""
        while True:
            refresh()
            next_due = self.book.next_due()
            self.wakeup.clear()
            timeout = None if next_due is None else max(self.clock.seconds_until(next_due), 0.0)
            if timeout is None or timeout > 0:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=None if timeout is None else min(timeout, 1.0))
                except TimeoutError:
                    pass
            refresh()
            if await self._fire_due_safely() is None:
                await asyncio.sleep(RETRY_SECONDS)

    async def _fire_due_safely(self) -> int | None:
        """None when the pass failed or left due jobs behind (Kafka trouble): the caller backs off."""
        try:
            published = await self.fire_due()
            return None if self.last_pass_failed else published
        except Exception:
            log.exception("scheduler pass failed; retrying in %ss", RETRY_SECONDS)
            return None


def build_scheduler(settings: Settings, clock: Clock | None = None) -> faust.App:
    app = build_faust_app(settings, "algo-scheduler")
    clock = clock or get_clock()
    lifecycle_topic = raw_topic(app, settings.topic("strategy-lifecycle"), settings.ticks_partitions)
    jobs = app.Table("scheduled-jobs", default=None, partitions=settings.ticks_partitions)
    producer = EventProducer(settings)
    stale = asyncio.Event()
    stale.set()
    # Faust may start the job loop before the producer's service: a due job then failed "used before start()" and
    # was retried; it waits for the producer instead.
    producer_started = asyncio.Event()

    async def publish(event: TimeEvent) -> None:
        await producer.publish("time-events", event.strategy_id, event)
        metrics.TIME_EVENTS.labels(event.action.value).inc()

    core = SchedulerCore(settings, clock, publish)

    def refresh() -> None:
        # After a rebalance the table holds exactly this scheduler's partitions: rebuild the book from it.
        if stale.is_set():
            stale.clear()
            core.clear()
            for key, job in jobs.items():
                core.register(int(key), job)
            log.info("scheduler rebuilt: %d strategies with pending jobs", len(core.specs))

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _stale(sender: Any = None, **kwargs: Any) -> None:
        stale.set()
        core.wakeup.set()

    class _Producer(mode.Service):
        async def on_start(self) -> None:
            metrics.serve(settings.scheduler_metrics_port, settings.metrics_host, "scheduler")
            metrics.SCHEDULED_JOBS.set_function(lambda: len(core.book))
            await producer.start()
            producer_started.set()

        async def on_stop(self) -> None:
            await producer.stop()

    app.service(_Producer)

    @app.task
    async def _run() -> None:
        await producer_started.wait()
        await core.run(refresh)

    @app.agent(lifecycle_topic)
    async def lifecycle(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for value in stream:
            refresh()
            event = StrategyLifecycle.model_validate_json(value)
            key = str(event.spec.strategy_id)
            if event.kind is LifecycleKind.STARTED:
                job = {
                    "user_id": event.spec.user_id,
                    "instrument": event.spec.instrument,
                    "quantity": event.spec.quantity,
                    "buy_time": event.spec.buy_time.isoformat(),
                    "sell_time": event.spec.sell_time.isoformat(),
                    "run": event.run,
                    "trading_day": event.trading_day.isoformat(),
                }
                jobs[key] = job
                core.register(event.spec.strategy_id, job)
            elif event.kind not in (LifecycleKind.ARMED, LifecycleKind.REENTRY):  # a re-entry keeps the SELL
                jobs.pop(key, None)
                core.cancel(event.spec.strategy_id)
            yield None

    return app


def run_scheduler(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings))  # see run_worker: an emptied broker must not leave us idle
    scheduler_process(settings).execute_from_commandline()


def scheduler_process(settings: Settings) -> ServiceWorker:
    return ServiceWorker(build_scheduler(settings), settings=settings, service="scheduler")

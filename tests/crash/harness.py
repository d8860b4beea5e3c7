"""The crash matrix harness: a compressed trading day on a stack of real processes, with everything killed.

One run (`run_matrix(MatrixConfig(seed=...))`) owns its whole stack so that it can kill any part of it:

- its own Kafka broker (Apache Kafka where a JDK is present, else Tansu) and redis-server (core.embedded,
  free ports), a SQLite database file;
- the Kite simulator in-process (`RunningSimulator`), on the same sped-up pinned clock as the services,
  so its order book and audit are read directly;
- `algo api`, `algo worker`, `algo scheduler` and `algo ticker` as subprocesses (own process groups).

Hundreds of strategies of several users trade one compressed day (BUY and SELL times spread over
clock-minutes); each instrument's scripted price path rises, drops through the stops of the "hit" group and
above the stops of the "safe" group, recovers and drops again (tests/crash/exit_kinds.py). A share of the
strategies has a target, a trailing stop, a stop moved to cost, re-entries or a loss limit instead of the fixed
stop, and one user has a daily loss limit. At moments drawn from `random.Random(seed)` the harness kills
with SIGKILL and restarts the worker (also while the simulator holds an order), the scheduler, the tick
connector and the API; restarts Redis empty and the Kafka broker empty; drops the ticker socket; squares
off some positions through the API; and expires one user's broker session. Broker faults (timeouts, 5xx,
429) run at a set rate throughout. With `egress`, each user's order calls leave through a tinyproxy of its own
on its own loopback address (whitelisted at the simulator), and one user's proxy is killed and restarted.

The verdict comes from the simulator's order book and audit and from the database (`judge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import select

from connectors.kite_sim import RunningSimulator, SimConfig
from connectors.kite_sim.state import AccountCredentials
from core.apache_kafka import TEST_CONFIG
from core.clock import ScaledClock
from core.embedded import EmbeddedKafka, free_port, kill_process, redis_command, start_process
from core.environment import child_environment
from core.kafka import ensure_topics
from core.settings import Environment, Settings
from schemas.events import Action, NotificationKind, broker_tag_for, intent_id_for
from storage.db import create_engine
from storage.migrate import upgrade_engine
from storage.models import Notification, OrderLog, Strategy
from tests.crash.exit_kinds import HIT_STOP, SAFE_STOP, ExitKind, PricePath, draw_kind
from tests.crash.ownership import OwnershipProbe, Sample
from tests.crash.tick_ledger import Stint, TickCount, TickLedger
from tests.fixtures.proxies import ProxyPool

IST = ZoneInfo("Asia/Kolkata")
# Wednesday 15 January 2025, 09:40 IST: an NSE trading day, inside market hours.
DAY_START = datetime(2025, 1, 15, 9, 40, tzinfo=IST)
ROOT = Path(__file__).resolve().parents[2]

BASE_PRICES = {"NSE:INFY": 1500.0, "NSE:TCS": 4000.0, "NSE:RELIANCE": 2500.0, "NSE:WIPRO": 300.0, "NSE:ITC": 450.0}

KILLS = ("worker", "worker_mid_order", "scheduler", "ticker", "api", "redis", "kafka")
# With several workers: one killed in a BUY burst, one added while stops are crossing and one removed while BUYs
# are due (rebalances under load), one scheduler of several killed.
MULTI_KILLS = ("worker_mid_burst", "worker_mid_order", "add_worker", "remove_worker", "scheduler", "ticker", "api",
               "redis", "kafka")  # fmt: skip
OWNERSHIP_WITHIN = 15.0  # every partition has exactly one live owner this long (real s) after a rebalance's cause
OWNERSHIP_SAMPLE_SECONDS = 0.5
EXIT_WITHIN_SECONDS = 5.0  # a crossed stop exits within this long (real seconds) of the system being up
SESSION_EXPIRED = "broker session expired, reconnect"
LOSS_LIMITED_USER = 1  # the healthy user with a daily loss limit
LOSS_LIMIT_GRACE = 3.0  # real seconds: a BUY already past its checks when the limit is reached may still arrive
WORKER_READY = "Worker]: Ready"
# A chased exit is cancelled and placed anew under its intent's next tag; more than this many is a violation.
MAX_ORDERS_PER_INTENT = 8
FOLLOWS = re.compile(r"tick feed reads partitions (\[[\d, ]*\]|none)")


# ------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MatrixConfig:
    seed: int
    strategies: int = 200
    users: int = 4  # healthy users; one more user's broker session expires at the start of the day
    instruments: tuple[str, ...] = ("NSE:INFY", "NSE:TCS", "NSE:RELIANCE", "NSE:WIPRO")
    speed: float = 30.0  # clock-seconds per real second
    day_seconds: float = 45.0  # real seconds over which BUYs and SELLs are spread
    fault_rate: float = 0.02  # per broker request, for each of 5xx, 429; a third of it for timeouts
    kills: tuple[str, ...] = KILLS
    square_offs: int = 3
    expired_user_strategies: int = 6
    settle_seconds: float = 60.0  # after the last SELL time: how long the system gets to finish
    workdir: Path | None = None
    verbose: bool = True
    kafka: str = "auto"  # the broker: "apache", "tansu", or auto (Apache Kafka where a JDK is present)
    workers: int = 1
    schedulers: int = 1
    # Partitions of each topic; several workers get twice as many as workers, so that each has some to lose.
    partitions: int = 0  # 0: 2 for one worker, 2 x workers for several

    @property
    def topic_partitions(self) -> int:
        return self.partitions or (2 if self.workers == 1 else 2 * self.workers)

    egress: bool = False  # each user's orders through its own proxy (required), one proxy killed among the faults
    # The share of the healthy users' strategies with a target, trailing stop, move to cost, re-entry or loss
    # limit instead of the fixed stop (tests/crash/exit_kinds.py); and one user's daily loss limit in rupees.
    exit_kinds: float = 0.3
    daily_loss_limit: float = 800.0


# ----------------------------------------------------------------------------------------------- processes


REFUSED_TO_START = 2  # `algo` exits 2 with one line when a setting or dependency is not usable


@dataclass
class Service:
    """One `algo <command>` subprocess in its own process group; output goes to a log file and a tail."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    ready_line: str
    process: subprocess.Popen[str] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=300))
    ready: threading.Event = field(default_factory=threading.Event)
    seen: dict[str, int] = field(default_factory=dict)  # interesting line -> count
    starts: int = 0
    restarting: bool = False  # killed on purpose: the supervisor leaves it alone
    # Each line of a start's output, with that start's number: the tick audit and the partitions followed.
    on_line: Callable[[Service, int, str], None] | None = None
    # How the last start ended, once it has: "killed" (SIGKILL, or it died by itself) or "stopped" (SIGTERM).
    on_end: Callable[[Service, int, str], None] | None = None
    ended: bool = True  # the last start has ended (or there was none)

    WATCH = ("Recovery Complete", "recovery needed", "Traceback", "retrying")

    def start(self) -> None:
        # A process still running would be orphaned by the new one: it would trade on, untracked, and outlive the
        # seed (it did, when two waiters both restarted a service that had refused to start).
        self.kill()
        self.ready = threading.Event()
        self.restarting = False
        self.starts += 1
        self.ended = False
        log = (self.cwd / f"{self.name}.log").open("a", encoding="utf-8")
        log.write(f"\n===== start #{self.starts} =====\n")
        self.process = subprocess.Popen(  # noqa: S603 - our own CLI
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(self.process, self.ready, log, self.starts), daemon=True).start()

    def _pump(self, process: subprocess.Popen[str], ready: threading.Event, log: Any, start: int) -> None:
        assert process.stdout is not None
        with log:
            for line in process.stdout:
                log.write(line)
                self.tail.append(line.rstrip())
                if self.on_line is not None:
                    self.on_line(self, start, line)
                if self.ready_line in line:
                    ready.set()
                for word in self.WATCH:
                    if word in line:
                        self.seen[word] = self.seen.get(word, 0) + 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.restarting = True
        process = self.process
        if process is None or process.poll() is not None:
            self.mark_ended("killed")
            return
        self.mark_ended("killed" if sig == signal.SIGKILL else "stopped")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def mark_ended(self, how: str) -> None:
        """Called when the current start ends (the first call wins: a process that died by itself was killed)."""
        if not self.ended:
            self.ended = True
            if self.on_end is not None:
                self.on_end(self, self.starts, how)

    async def wait_ready(self, within: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not await asyncio.to_thread(self.ready.wait, 0.2):
            process = self.process
            code = process.poll() if process else None
            if code == REFUSED_TO_START and loop.time() < deadline:
                # A dependency (Redis, Kafka) was down: the service said so in one line and exited, as it
                # should. A restart policy starts it again; so does this supervisor, once, however many
                # incidents are waiting for it to be ready.
                await asyncio.sleep(0.5)
                if self.process is process:
                    self.start()
                continue
            if not self.alive() or loop.time() > deadline:
                raise RuntimeError(f"{self.name} not ready (exit code {code}):\n" + "\n".join(list(self.tail)[-15:]))


@dataclass
class Binary:
    """redis-server on a fixed port: killed with SIGKILL and started empty on the same port."""

    name: str
    command: list[str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_process(self.command, self.port, timeout=30, log=self.log)

    def kill(self) -> None:
        if self.process is not None:
            kill_process(self.process)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Planned:
    index: int
    user: int  # index into users; the last user is the one whose session expires
    instrument: str
    group: str  # "hit" | "safe"
    buy_offset: float  # real seconds after the day's start
    sell_offset: float
    stop_loss: float
    strategy_id: int = 0
    kind: ExitKind | None = None  # None: the fixed stop `stop_loss`
    buy_time: str = ""
    sell_time: str = ""


@dataclass
class Incident:
    at: float  # real seconds after the day's start
    kind: str
    detail: str = ""
    target: str = ""  # the service it kills or removes, where there are several of its kind


@dataclass
class User:
    email: str
    token: str = ""
    creds: AccountCredentials | None = None
    expired: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def api_key(self) -> str:
        assert self.creds is not None
        return self.creds.api_key


def plan_day(config: MatrixConfig, rng: random.Random) -> tuple[list[Planned], dict[str, PricePath], list[Incident]]:
    """Strategies, each instrument's price path and the incidents, all drawn from the seed."""
    day = config.day_seconds
    plans: list[Planned] = []
    healthy = config.strategies - config.expired_user_strategies
    for index in range(config.strategies):
        expired = index >= healthy
        user = config.users if expired else index % config.users
        instrument = config.instruments[rng.randrange(len(config.instruments))]
        group = "hit" if rng.random() < 0.5 else "safe"
        # The expired user's BUYs come after its session has expired (at 0.5 s).
        buy = rng.uniform(0.15 * day, 0.3 * day) if expired else rng.uniform(0.03 * day, 0.45 * day)
        sell = buy + rng.uniform(0.3 * day, 0.95 * day - buy)
        base = BASE_PRICES[instrument]
        stop = round(base * (HIT_STOP if group == "hit" else SAFE_STOP), 1)
        plans.append(Planned(index, user, instrument, group, buy, sell, stop))
    burst = 0.0
    if config.workers > 1:
        # A BUY burst: a quarter of the healthy strategies are due at the same moment (a worker dies in it).
        burst = rng.uniform(0.12 * day, 0.3 * day)
        for plan in plans:
            if plan.user < config.users and plan.sell_offset > burst + 0.2 * day and rng.random() < 0.25:
                plan.buy_offset = burst
    drops = {instrument: rng.uniform(0.2 * day, 0.75 * day) for instrument in config.instruments}
    incidents = [Incident(0.5, "expire_token")]
    workers = worker_names(config.workers)

    def down() -> str:
        return f"down {rng.uniform(0.3, 2.0):.2f}s"

    for kind in config.kills:
        if kind == "worker_mid_burst":
            incidents.append(Incident(burst + 0.1, kind, down(), rng.choice(workers)))
        elif kind == "add_worker":
            # As an instrument's price drops through its stops.
            incidents.append(Incident(rng.choice(list(drops.values())) - 0.2, kind, "", f"worker-{config.workers + 1}"))
        elif kind == "remove_worker":
            # As a strategy's BUY falls due; never the first worker (the mid-order kill's target).
            due = rng.choice([p.buy_offset for p in plans if 0.1 * day < p.buy_offset < 0.8 * day])
            incidents.append(Incident(due - 0.1, kind, "", rng.choice(workers[1:])))
        elif kind == "scheduler" and config.schedulers > 1:
            at = rng.uniform(0.1 * day, 0.85 * day)
            incidents.append(Incident(at, kind, down(), rng.choice(scheduler_names(config.schedulers))))
        elif kind == "worker_mid_order":
            # Just before a BUY is due, while the simulator holds order requests (a latency fault).
            target = rng.choice([p for p in plans if p.user < config.users and p.buy_offset > 0.1 * day])
            incidents.append(Incident(target.buy_offset - 0.3, kind, f"BUY of #{target.index} in flight"))
        else:
            at = rng.uniform(0.1 * day, 0.85 * day)
            incidents.append(Incident(at, kind, down()))
    incidents.append(Incident(rng.uniform(0.1 * day, 0.8 * day), "drop_ticker_socket"))
    if config.egress:  # drawn after everything else: a seed without egress plans the same day as before
        victim = rng.randrange(config.users)
        incidents.append(Incident(rng.uniform(0.1 * day, 0.85 * day), "egress", f"down {rng.uniform(0.3, 2.0):.2f}s "
                                  f"user {victim}"))  # fmt: skip
    candidates = [p for p in plans if p.user < config.users and p.group == "safe" and p.sell_offset - p.buy_offset > 6]
    for target in rng.sample(candidates, min(config.square_offs, len(candidates))):
        at = rng.uniform(target.buy_offset + 2, target.sell_offset - 2)
        incidents.append(Incident(at, "square_off", str(target.index)))
    incidents.sort(key=lambda i: i.at)
    # Drawn last, like the egress: the rest of the day is the one the seed planned before these existed.
    paths = {i: PricePath.draw(BASE_PRICES[i], drop, day, rng) for i, drop in drops.items()}
    squared = {int(i.detail) for i in incidents if i.kind == "square_off"}
    for plan in plans:
        if plan.user < config.users and plan.index not in squared and rng.random() < config.exit_kinds:
            plan.kind = draw_kind(rng, BASE_PRICES[plan.instrument])
            if plan.kind.reentries:  # bought early and sold late: the day's drops can stop it out twice
                plan.buy_offset = rng.uniform(0.03 * day, 0.15 * day)
                plan.sell_offset = 0.95 * day
    return plans, paths, incidents


def worker_names(count: int) -> list[str]:
    return ["worker"] + [f"worker-{n}" for n in range(2, count + 1)]


def scheduler_names(count: int) -> list[str]:
    return ["scheduler"] + [f"scheduler-{n}" for n in range(2, count + 1)]


# ------------------------------------------------------------------------------------------------ results


@dataclass
class MatrixResult:
    seed: int
    strategies: int = 0
    bought: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    broker_orders: int = 0
    faulted_requests: int = 0
    incidents: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # integrity: lost, doubled or unlogged orders
    late_exits: list[str] = field(default_factory=list)  # stop exits later than EXIT_WITHIN_SECONDS after up
    stop_exit_delays: list[float] = field(default_factory=list)  # real seconds past the allowed moment's start
    stop_exit_excess: list[float] = field(default_factory=list)  # real seconds past the bound (negative: within)
    recoveries: int = 0
    # Bought cycles per exit kind ("fixed": the fixed stop), and "re-entered": cycles after the first.
    kinds: dict[str, int] = field(default_factory=dict)
    loss_limit: str = ""  # the daily loss limit user's: when it was reached
    wall_seconds: float = 0.0
    workdir: str = ""
    # With several workers: (what moved the partitions, seconds from its cause / from its end until every partition
    # had exactly one live owner), and the ticks counted across handovers.
    rebalances: list[tuple[str, float, float]] = field(default_factory=list)
    ticks: TickCount = field(default_factory=TickCount)

    @property
    def passed(self) -> bool:
        return not self.violations

    def line(self) -> str:
        worst = max(self.stop_exit_delays, default=0.0)
        excess = max(self.stop_exit_excess, default=0.0)
        exits = ",".join(f"{k}={v}" for k, v in sorted(self.exits.items()))
        kinds = ",".join(f"{k}={v}" for k, v in sorted(self.kinds.items()))
        return (
            f"seed={self.seed} {'PASS' if self.passed else 'FAIL'} strategies={self.strategies} "
            f"bought={self.bought} exits[{exits}] kinds[{kinds}] loss_limit[{self.loss_limit}] "
            f"broker_orders={self.broker_orders} "
            f"faults={self.faulted_requests} recoveries={self.recoveries} worst_stop_exit={worst:.2f}s "
            f"worst_past_bound={excess:.2f}s "
            f"violations={len(self.violations)} late_stop_exits={len(self.late_exits)} wall={self.wall_seconds:.0f}s"
        )

    def handover_lines(self) -> list[str]:
        """The partitions' moves and the ticks across them (several workers)."""
        lines = [f"rebalance after {what}: every partition owned once {total:.1f}s after its cause "
                 f"({after_end:.1f}s after it ended)" for what, total, after_end in self.rebalances]  # fmt: skip
        t = self.ticks
        waits = sorted(h.unchecked_seconds for h in t.handovers)
        lines.append(
            f"ticks: {t.checked} checked, {len(t.lost)} partitions with ticks lost, {len(t.twice)} checked twice "
            f"across a clean handover, {t.reread} re-read after a kill; {len(waits)} handovers, unchecked "
            f"p50 {_pick(waits, 0.5):.2f}s / max {_pick(waits, 1.0):.2f}s"
        )
        lines.extend(f"  handover {h.line()}" for h in t.handovers)
        return lines


def _pick(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


# ------------------------------------------------------------------------------------------------- the run


class CrashMatrix:
    def __init__(self, config: MatrixConfig, workdir: Path) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # noqa: S311 - reproducible chaos, not crypto
        self.workdir = workdir
        self.result = MatrixResult(config.seed, workdir=str(workdir))
        self.services: dict[str, Service] = {}
        self.binaries: dict[str, Binary] = {}
        self.kafka: EmbeddedKafka | None = None
        self.down: list[tuple[str, float, float]] = []  # (component, from, to) in time.monotonic()
        self.users: list[User] = []
        self.plans: list[Planned] = []
        self.sim: RunningSimulator | None = None
        self.http: httpx.AsyncClient
        self.day_mono = 0.0  # time.monotonic() at the day's start
        self.paths: dict[str, PricePath] = {}
        # Incidents run concurrently at their seeded moments; one restart of a given part at a time.
        self.locks: dict[str, asyncio.Lock] = {}
        self.workers = worker_names(config.workers)  # the workers in service (a removed one leaves the list)
        self.schedulers = scheduler_names(config.schedulers)
        self.ledger = TickLedger()
        self.kafka_restarts: list[float] = []  # time.monotonic() of each empty broker's start: the epochs
        self.stint_started: dict[tuple[str, int], float] = {}
        self.followed: dict[int, set[int] | None] = {}  # worker pid -> tick partitions it last said it reads
        self.samples: list[Sample] = []
        self.moves: list[tuple[str, float, float]] = []  # (cause, began, ended): what moved partitions
        self.proxies: ProxyPool | None = None  # with `egress`: user i's proxy is self.proxies.proxies[i]

    def say(self, text: str) -> None:
        if self.config.verbose:
            print(f"[crash-matrix seed={self.config.seed} t={self.now_offset():6.1f}] {text}", flush=True)

    def now_offset(self) -> float:
        return time.monotonic() - self.day_mono if self.day_mono else 0.0

    # ---------------------------------------------------------------------------------------- the stack

    async def start_stack(self) -> None:
        kafka_port, redis_port, api_port = free_port(), free_port(), free_port()
        partitions = self.config.topic_partitions
        # The test broker's settings: the services here use a 3 s consumer session (a killed worker's
        # partitions must move within the day's seconds), below Apache Kafka's default minimum.
        self.kafka = EmbeddedKafka(self.workdir / "kafka", kafka_port, self.config.kafka, TEST_CONFIG)
        self.binaries["redis"] = Binary("redis", redis_command(redis_port), redis_port, self.workdir / "redis.log")
        await asyncio.to_thread(self.kafka.start)
        for binary in self.binaries.values():
            binary.start()
        database_url = f"sqlite+aiosqlite:///{self.workdir / 'algo.db'}"
        engine = create_engine(database_url)
        await upgrade_engine(engine)
        await engine.dispose()

        if self.config.egress:
            self.proxies = ProxyPool(self.workdir)
            self.proxies.start(self.config.users + 1)  # the expired user needs one too

        self.clock = ScaledClock(start=DAY_START, speed=self.config.speed)
        # Every Kite rule is on (the simulator's defaults), and fast moves too: a protected exit sent into a drop
        # can rest beyond its band and must be chased until it fills.
        self.sim = RunningSimulator(clock=self.clock, config=SimConfig(tick_interval=0.05, fast_move_slippage=True),
                                    seed=self.config.seed, walk=False)  # fmt: skip
        await asyncio.to_thread(self.sim.start)
        for instrument in self.config.instruments:
            self.sim.state.set_price(instrument, BASE_PRICES[instrument])

        self.settings = Settings.model_validate(
            {
                "environment": Environment.TEST,
                "kafka_bootstrap": f"127.0.0.1:{kafka_port}",
                "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                "database_url": database_url,
                "topic_prefix": f"cm{self.config.seed}-",
                "kite_api_root": self.sim.rest_root,
                "kite_ticker_root": self.sim.ticker_root,
                "broker_timeout_seconds": 2.0,
                "ticks_partitions": partitions,
                "orders_partitions": partitions,
                "events_partitions": partitions,
                "tick_feed_audit": True,
                "kafka_session_timeout_seconds": 3.0,
                # A BUY delayed by a crash still goes within 20 real seconds of its time.
                "missed_buy_grace_seconds": 20 * self.config.speed,
                "api_host": "127.0.0.1",
                "api_port": api_port,
                "ticker_silence_seconds": 3.0,
                "log_level": "INFO",
                "require_egress": self.config.egress,
                "egress_allowed_networks": "127.0.0.0/8",  # the proxies listen on loopback addresses
            }
        )
        await ensure_topics(self.settings)
        self.env = self._env()
        self.api_root = f"http://127.0.0.1:{api_port}"
        self.services["api"] = Service("api", [sys.executable, "-m", "cli.main", "api"], self.env, self.workdir,
                                       "api ready")  # fmt: skip
        for name in self.schedulers:
            self.services[name] = Service(name, [sys.executable, "-m", "cli.main", "scheduler"], self.env,
                                          self.workdir, WORKER_READY)  # fmt: skip
        for name in self.workers:
            self.services[name] = self._worker_service(name)
        for service in self.services.values():
            self._start(service)
        await asyncio.gather(*(s.wait_ready() for s in self.services.values()))

    def _worker_service(self, name: str) -> Service:
        service = Service(name, [sys.executable, "-m", "cli.main", "worker"], self.env, self.workdir, WORKER_READY)
        service.on_line = self._worker_line
        service.on_end = self._worker_end
        return service

    def _start(self, service: Service) -> None:
        service.start()
        self.stint_started[(service.name, service.starts)] = time.monotonic()

    def _stint(self, service: Service, start: int) -> Stint:
        started = self.stint_started.get((service.name, start), time.monotonic())
        return Stint(service.name, start, sum(1 for t in self.kafka_restarts if t <= started))

    def _worker_line(self, service: Service, start: int, line: str) -> None:
        # From the service's output thread: plain appends and assignments only.
        if "tick audit" in line:
            self.ledger.line(self._stint(service, start), line)
        elif (follows := FOLLOWS.search(line)) is not None and service.process is not None and service.starts == start:
            partitions = set() if follows[1] == "none" else set(map(int, re.findall(r"\d+", follows[1])))
            self.followed[service.process.pid] = partitions

    def _worker_end(self, service: Service, start: int, how: str) -> None:
        self.ledger.end(self._stint(service, start), how)

    def live_workers(self) -> list[Service]:
        return [self.services[name] for name in self.workers if self.services[name].alive()]

    def _env(self) -> dict[str, str]:
        env = child_environment(self.settings, self.clock)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def stop_stack(self) -> None:
        for service in self.services.values():
            service.kill(signal.SIGKILL)
        for binary in self.binaries.values():
            binary.kill()
        if self.kafka is not None:
            self.kafka.kill()
        if self.sim is not None:
            self.sim.stop()
        if self.proxies is not None:
            self.proxies.close()

    # --------------------------------------------------------------------------------------------- HTTP

    async def call(self, method: str, path: str, within: float = 60.0, **kwargs: Any) -> httpx.Response:
        """An API call that rides out an API restart (connection refused, 5xx) until `within` passes."""
        deadline = time.monotonic() + within
        while True:
            try:
                response = await self.http.request(method, path, **kwargs)
                if response.status_code < 500 or time.monotonic() > deadline:
                    return response
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def make_user(self, expired: bool) -> User:
        user = User(email=f"cm{self.config.seed}-{len(self.users)}@example.com", expired=expired)
        body = {"email": user.email, "password": "Tr4ding-passw0rd"}
        registered = await self.call("POST", "/auth/register", json=body)
        assert registered.status_code == 201, registered.text
        login = await self.call("POST", "/auth/login", json=body)
        assert login.status_code == 200, login.text
        user.token = login.json()["access_token"]
        assert self.sim is not None
        user.creds = self.sim.state.create_account(
            api_key=f"cmkey{self.config.seed}x{len(self.users)}", user_name=user.email, balance=10_000_000.0
        )
        connect = {"api_key": user.creds.api_key, "api_secret": user.creds.api_secret,
                   "request_token": user.creds.request_token}  # fmt: skip
        if self.proxies is not None:
            proxy = self.proxies.proxies[len(self.users)]
            self.sim.state.set_ip_whitelist(user.creds.api_key, [proxy.listen])
            connect["egress"] = proxy.url
        response = await self.call("POST", "/broker/connect", json=connect, headers=user.headers)
        assert response.status_code == 200, response.text
        self.users.append(user)
        return user

    # ------------------------------------------------------------------------------------------ the day

    def clock_at(self, offset: float) -> datetime:
        """The exchange time `offset` real seconds after the day's start."""
        return self.day_clock + timedelta(seconds=offset * self.config.speed)

    def mono_of_clock(self, at: datetime) -> float:
        return self.day_mono + (at - self.day_clock).total_seconds() / self.config.speed

    async def setup_day(self) -> list[Incident]:
        plans, paths, incidents = plan_day(self.config, self.rng)
        self.paths = paths
        self.plans = plans
        # Users first: the one whose session will expire connects last, so it is the "most recent" session.
        for _ in range(self.config.users):
            await self.make_user(expired=False)
        await self.make_user(expired=True)
        # The day starts once every strategy can be created; creation speed bounds it (~20 ms each).
        # Several workers and schedulers share the two cores with the API while the strategies are created.
        lead = (4.0 + 0.03 * len(plans)) * (1.0 if self.config.workers == 1 else 2.0)
        self.day_clock = (self.clock.now() + timedelta(seconds=lead * self.config.speed)).replace(microsecond=0)
        self.day_mono = time.monotonic() + self.clock.seconds_until(self.day_clock)
        gate = asyncio.Semaphore(16)

        async def create(plan: Planned) -> None:
            plan.buy_time = self.clock_at(plan.buy_offset).astimezone(IST).strftime("%H:%M:%S")
            plan.sell_time = self.clock_at(plan.sell_offset).astimezone(IST).strftime("%H:%M:%S")
            user = self.users[plan.user]
            body = {"symbol": plan.instrument, "quantity": 1, "buy_time": plan.buy_time,
                    "sell_time": plan.sell_time, "product": "MIS"}  # fmt: skip
            body.update(plan.kind.fields if plan.kind else {"stop_loss": plan.stop_loss})
            async with gate:
                created = await self.call("POST", "/strategy/create", json=body, headers=user.headers)
                assert created.status_code == 201, created.text
                plan.strategy_id = created.json()["strategy_id"]
                started = await self.call(
                    "POST", "/strategy/start", json={"strategy_id": plan.strategy_id}, headers=user.headers
                )
                assert started.status_code == 200, started.text

        await asyncio.gather(*(create(p) for p in plans))
        if self.config.daily_loss_limit and self.config.users > 1:
            limited = self.users[LOSS_LIMITED_USER]
            body = {"daily_max_loss": str(self.config.daily_loss_limit)}
            response = await self.call("PUT", "/daily-loss-limit", json=body, headers=limited.headers)
            assert response.status_code == 200, response.text
        # The session expires now, before the day: its BUYs, due from 15% of the day on, must find it expired
        # even when a loaded machine starts the day late (three workers and two schedulers on two cores did).
        early = [i for i in incidents if i.kind == "expire_token"]
        for incident in early:
            await self.incident(incident)
        incidents = [i for i in incidents if i not in early]
        if time.monotonic() > self.day_mono:
            self.say(f"WARNING: setup overran the day's start by {time.monotonic() - self.day_mono:.1f}s")
        assert self.sim is not None
        for instrument in paths:
            self.sim.state.script_path(instrument, self.price_path(instrument))
        # The tick connector streams with a healthy user's session.
        ticker_env = dict(self.env)
        ticker_env.update(TICKER_API_KEY=self.users[0].api_key, TICKER_ACCESS_TOKEN=self.users[0].creds.access_token)  # type: ignore[union-attr]
        self.services["ticker"] = Service("ticker", [sys.executable, "-m", "cli.main", "ticker"], ticker_env,
                                          self.workdir, "ticker connected")  # fmt: skip
        self.services["ticker"].start()
        await self.services["ticker"].wait_ready()
        return incidents

    def price_path(self, instrument: str) -> list[tuple[datetime, float]]:
        """The instrument's scripted path (`PricePath`). With several workers it also wavers by 0.1% four times a
        second, so that each tick partition carries a steady flow to count across its handovers (a tick is sent
        when the price moves); the stops stay on their side of it."""
        path = self.paths[instrument]
        steps = [(self.clock_at(at), path.price(level)) for at, level in path.steps if at > 0]
        if self.config.workers > 1:
            end = max(p.sell_offset for p in self.plans) + self.config.settle_seconds
            for step in range(int(end / 0.25)):
                at = step * 0.25
                steps.append((self.clock_at(at), path.price(path.level(at) * (1.001 if step % 2 else 0.999))))
            steps.sort()
        return steps

    def inject_faults(self) -> None:
        assert self.sim is not None
        rate = self.config.fault_rate
        if rate <= 0:
            return
        state = self.sim.state
        seed = self.config.seed
        state.inject_fault("error", status=503, error_type="NetworkException", probability=rate, seed=seed * 3 + 1)
        state.inject_fault("rate_limit", probability=rate, seed=seed * 3 + 2)
        state.inject_fault("timeout", probability=rate / 3, seed=seed * 3 + 3,
                           hold_seconds=self.settings.broker_timeout_seconds + 1)  # fmt: skip

    # ------------------------------------------------------------------------------------------ incidents

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    async def restart(self, name: str, down: float) -> None:
        async with self.lock(name):
            service = self.services[name]
            began = time.monotonic()
            service.kill(signal.SIGKILL)
            await asyncio.sleep(down)  # the outage itself is what is being simulated
            self._start(service)
            await service.wait_ready()
            self.down.append((name, began, time.monotonic()))
            if name in self.workers:
                self.moves.append((f"{name} killed", began, time.monotonic()))

    async def incident(self, incident: Incident) -> None:
        assert self.sim is not None
        state = self.sim.state
        kind = incident.kind
        down = float(incident.detail.split()[1].rstrip("s")) if incident.detail.startswith("down") else 0.0
        began = time.monotonic()
        if kind == "expire_token":
            expired = [u for u in self.users if u.expired]
            for user in expired:
                state.expire_tokens(user.api_key)
        elif kind in ("worker", "scheduler", "ticker", "api"):
            await self.restart(incident.target or kind, down)
        elif kind == "worker_mid_burst":
            target = incident.target if incident.target in self.workers else self.workers[-1]
            incident.detail += f" ({target})"
            await self.restart(target, down)
        elif kind == "add_worker":
            # "workers": not while the broker restarts, which stops and starts every worker there is.
            async with self.lock("workers"), self.lock(incident.target):
                self.services[incident.target] = service = self._worker_service(incident.target)
                self.workers.append(incident.target)
                self._start(service)
                await service.wait_ready()
                self.moves.append((f"{incident.target} added", began, time.monotonic()))
        elif kind == "remove_worker":
            target = incident.target if incident.target in self.workers[1:] else self.workers[-1]
            async with self.lock("workers"), self.lock(target):
                self.workers.remove(target)
                await asyncio.to_thread(self.services[target].kill, signal.SIGTERM)
                incident.detail = f"{target} stopped"
                self.moves.append((f"{target} removed", began, time.monotonic()))
        elif kind == "worker_mid_order":
            fault = state.inject_fault("latency", scope="orders", latency_ms=1500)
            try:
                held = await self._poll(lambda: any(r.outcome == "pending" for r in state.audit_records()), 8.0)
                incident.detail += "" if held else " (no order was in flight)"
                await self.restart("worker", 0.2)
            finally:
                state.faults.remove(fault.fault_id)
        elif kind == "redis":
            async with self.lock("redis"):
                binary = self.binaries["redis"]
                binary.kill()
                await asyncio.sleep(down)
                await asyncio.to_thread(binary.start)
                self.down.append(("redis", began, time.monotonic()))
        elif kind == "kafka":
            await self.restart_kafka(down)
        elif kind == "egress":
            user_index = int(incident.detail.split()[-1])
            assert self.proxies is not None
            proxy = self.proxies.proxies[user_index]
            async with self.lock(f"egress:{user_index}"):
                proxy.kill()
                await asyncio.sleep(down)  # the outage itself is what is being simulated
                await asyncio.to_thread(proxy.start)
                self.down.append((f"egress:{user_index}", began, time.monotonic()))
        elif kind == "drop_ticker_socket":
            incident.detail = f"{state.drop_connections()} connection(s) dropped"
        elif kind == "square_off":
            plan = self.plans[int(incident.detail)]
            user = self.users[plan.user]
            response = await self.call("POST", "/strategy/stop", json={"strategy_id": plan.strategy_id},
                                       headers=user.headers)  # fmt: skip
            incident.detail = f"#{plan.index} -> {response.status_code} {response.text[:120]}"
        self.result.incidents.append(f"t={incident.at:5.1f}s {kind} {incident.detail}".rstrip())
        self.say(f"{kind} {incident.detail} ({time.monotonic() - began:.1f}s)")

    async def restart_kafka(self, down: float) -> None:
        """Kill the broker and start an empty one on the same port: the worst case, a broker that lost its data
        (Apache Kafka's storage is formatted anew; Tansu keeps nothing anyway).

        What the system does (found by this matrix): a running worker dies on the empty broker (Faust's
        ConsistencyError: its changelog offsets are above the new highwater), and a Faust service that kept
        running writes its changelog into topics the new broker auto-creates undeclared, from which a later
        restart never finishes restoring. So the procedure is the one an operator (or a supervisor) runs:
        recreate the topics, then restart the Faust services and the tick connector, whose startup
        declares their changelogs and whose recovery republishes every running strategy from the database.
        """
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.lock("workers"))  # no worker added or removed meanwhile
            for name in ("kafka", *self.workers, *self.schedulers, "ticker"):
                await stack.enter_async_context(self.lock(name))
            kafka = self.kafka
            assert kafka is not None  # noqa: S101 - started with the stack
            began = time.monotonic()
            kafka.kill()
            names = (*self.workers, *self.schedulers, "ticker")
            streaming = [self.services[name] for name in names if name in self.services]
            for service in streaming:
                service.kill(signal.SIGKILL)
            await asyncio.sleep(down)
            await asyncio.to_thread(kafka.start)
            self.kafka_restarts.append(time.monotonic())
            await ensure_topics(self.settings)
            for service in streaming:
                self._start(service)
            await asyncio.gather(*(service.wait_ready() for service in streaming))
            self.down.append(("kafka", began, time.monotonic()))
            self.moves.append(("kafka restarted", began, time.monotonic()))

    async def supervise(self) -> None:
        """Restart a service that exited by itself, as the compose file's `restart: unless-stopped` does."""
        while True:
            await asyncio.sleep(0.5)
            for service in list(self.services.values()):
                if service.process is not None and not service.alive() and not service.restarting:
                    code = service.process.returncode
                    self.result.incidents.append(f"t={self.now_offset():5.1f}s {service.name} exited by itself "
                                                 f"(code {code}); restarted by the supervisor")  # fmt: skip
                    self.say(f"{service.name} exited by itself (code {code}): restarting it")
                    began = time.monotonic()
                    self._start(service)
                    with contextlib.suppress(RuntimeError):
                        await service.wait_ready()
                    self.down.append((service.name, began, time.monotonic()))
                    if service.name in self.workers:
                        self.moves.append((f"{service.name} died", began, time.monotonic()))

    async def _poll(self, condition: Callable[[], Any], within: float) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            value = condition()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.02)
        return None

    async def watch_ownership(self) -> None:
        """Sample who owns which partition, all day (tests/crash/ownership.py)."""
        probe = OwnershipProbe(self.settings)
        try:
            while True:
                live = {service.process.pid for service in self.live_workers() if service.process is not None}
                if self.lock("kafka").locked():  # the broker is being restarted: nothing to ask
                    problems = ["the broker is restarting"]
                    await probe.close()
                else:
                    problems = await probe.problems(live, dict(self.followed))
                if not self.samples or problems != self.samples[-1].problems:
                    with (self.workdir / "ownership.log").open("a", encoding="utf-8") as log:
                        log.write(f"t={self.now_offset():6.1f} {'; '.join(problems) or 'settled'}\n")
                self.samples.append(Sample(time.monotonic(), problems))
                await asyncio.sleep(OWNERSHIP_SAMPLE_SECONDS)
        finally:
            await probe.close()

    async def run_day(self, incidents: list[Incident]) -> None:
        self.inject_faults()
        background = [asyncio.create_task(self.supervise())]
        if self.config.workers > 1:  # one worker owns everything there is
            background.append(asyncio.create_task(self.watch_ownership()))
        try:
            await self._run_day(incidents)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _run_day(self, incidents: list[Incident]) -> None:
        async def at_its_moment(incident: Incident) -> None:
            wait = self.day_mono + incident.at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the incident's seeded moment (a schedule, not a synchronisation)
            await self.incident(incident)

        await asyncio.gather(*(at_its_moment(i) for i in incidents))
        last_sell = max(p.sell_offset for p in self.plans)
        wait = self.day_mono + last_sell + 1.0 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.sim.state.clear_faults()  # type: ignore[union-attr]
        self.say("day over; waiting for every position to be closed")
        settled = await self._poll(self._settled, self.config.settle_seconds)
        # The last move of partitions (a worker added late in the day) is judged too: watch until it settles.
        if self.config.workers > 1:
            last_move = max((ended for _, _, ended in self.moves), default=0.0)
            await self._poll(lambda: any(s.at >= last_move and s.settled for s in self.samples[-3:]), OWNERSHIP_WITHIN)
        if not settled:
            self.say("not settled in time")
            for worker in self.live_workers():
                if worker.process is not None:
                    # The worker logs where each of its tasks is waiting (streams/worker.py): the evidence for
                    # whatever held the missing exit back.
                    os.kill(worker.process.pid, signal.SIGUSR1)
                    await self._poll(lambda w=worker: any(" tasks:" in line for line in w.tail), 5.0)  # type: ignore[misc]

    async def _settled(self) -> bool:
        """Every filled BUY has a filled exit at the broker, and the database has caught up with it and with every
        intent still queued."""
        assert self.sim is not None
        bought = exited = 0
        for user in self.users:
            for order in self.sim.state.find_orders(user.api_key):
                if order.status == "COMPLETE":
                    if order.transaction_type == "BUY":
                        bought += 1
                    else:
                        exited += 1
        if bought != exited:
            return False
        logs = (await self._db_rows())[0]
        results = sum(1 for r in logs if r.kind == "result" and r.status == "filled")
        if results != bought + exited:
            return False
        # Every intent attempted has its result: an exit queued behind the one that closed the position (a trader's
        # square-off behind a chased SELL) is still to be skipped, not lost (a resting protective stop has none).
        finished = {r.intent_id for r in logs if r.kind == "result"}
        return all(r.intent_id in finished or r.intent_id.endswith(f":{Action.PROTECT.value}")
                   for r in logs if r.kind == "attempt")  # fmt: skip

    async def _db_rows(self) -> tuple[list[OrderLog], list[Strategy], list[Notification]]:
        engine = create_engine(self.settings.database_url)
        try:
            async with engine.connect() as conn:
                logs = list((await conn.execute(select(OrderLog))).all())
                strategies = list((await conn.execute(select(Strategy))).all())
                notes = list((await conn.execute(select(Notification))).all())
        finally:
            await engine.dispose()
        return logs, strategies, notes  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ verdict

    def effective_up(self, moment: float, user: int | None = None) -> float:
        """When the system is next up for EXIT_WITHIN_SECONDS in a row, at or after `moment` (for `user`: its
        egress too).

        Outages chain: one that begins within that window after another ended pushes the moment on.
        """
        parts = {"worker", "ticker", "kafka", "redis"} | ({f"egress:{user}"} if user is not None else set())
        changed = True
        while changed:
            changed = False
            for component, began, ended in self.down:
                down = component in parts or component.startswith("worker") or component == "rebalance"
                if down and began < moment + EXIT_WITHIN_SECONDS:
                    if moment < ended:
                        moment, changed = ended, True
        return moment

    def judge_handovers(self) -> None:
        """Every partition owned by exactly one live worker soon after each move; no tick lost or checked twice.

        A partition is unwatched from a move's cause until ownership settles: that window counts as the system
        being down for the stop-exit bound (`effective_up`)."""
        v = self.result.violations
        for cause, began, ended in self.moves if self.config.workers > 1 else []:
            settled = next((s.at for s in self.samples if s.at >= ended and s.settled), None)
            # A move that begins before this one has settled (the broker restarted meanwhile) extends its time.
            deadline, extended = ended, True
            while extended:
                extended = False
                for _, other_began, other_ended in self.moves:
                    if other_began < deadline + OWNERSHIP_WITHIN and other_ended > deadline:
                        deadline, extended = other_ended, True
            if settled is None or settled > deadline + OWNERSHIP_WITHIN:
                last = next((s for s in reversed(self.samples) if s.at <= deadline + OWNERSHIP_WITHIN), None)
                v.append(f"after {cause}: partitions not owned by exactly one live worker within "
                         f"{OWNERSHIP_WITHIN:.0f}s: {last.problems[:4] if last else 'no sample'}")  # fmt: skip
                continue
            if deadline != ended:  # its figures include the later move's
                cause += " (and the moves that followed before it settled)"
            self.result.rebalances.append((cause, settled - began, settled - ended))
            self.down.append(("rebalance", began, settled))
        if self.config.workers > 1 and self.samples and not self.samples[-1].settled:
            v.append(f"at the end of the day the partitions are not owned once: {self.samples[-1].problems[:4]}")
        for service in self.live_workers():
            self.ledger.end(self._stint(service, service.starts), "running")
        ticks = self.ledger.count()
        self.result.ticks = ticks
        v.extend(f"ticks lost: {line}" for line in ticks.lost)
        v.extend(f"tick checked twice across a clean handover: {line}" for line in ticks.twice[:10])
        if not ticks.checked:
            v.append("no tick audit line: the handovers were not counted")

    def _judge_stop_latency(
        self, plan: Planned, bought: float, exited: float | None, action: Action, faults: int,
        exit_calls: dict[str, list[float]],
    ) -> None:  # fmt: skip
        """A fixed stop's exit reached the broker within EXIT_WITHIN_SECONDS of the system being up after the
        price crossed it while the position was held (`bought`, `exited`: when the broker received them)."""
        result = self.result
        crossed_at = self.paths[plan.instrument].first_at_or_under(plan.stop_loss, max(bought - self.day_mono, 0.0))
        if crossed_at is None or crossed_at >= plan.sell_offset or exited is None:
            return  # never crossed, or the SELL was due first
        crossed = self.day_mono + crossed_at
        user = self.users[plan.user]
        up_at = self.effective_up(crossed, plan.user)
        allowed = up_at + EXIT_WITHIN_SECONDS
        # Each broker fault on the exit costs a retry (a timeout costs the broker timeout).
        allowed += faults * (self.settings.broker_timeout_seconds + 2.5)
        # Kite takes at most BROKER_ORDERS_PER_SECOND order calls a second from one user: exit calls of the same
        # user that reached the broker first (dozens of stops crossed at once, resting exits chased) delay this one
        # however fast the system is.
        ahead = sum(1 for t in exit_calls.get(user.api_key or "", []) if up_at <= t < exited)
        allowed += ahead / self.settings.broker_orders_per_second
        result.stop_exit_delays.append(exited - up_at)
        result.stop_exit_excess.append(exited - allowed)
        if exited > allowed:
            # Kept apart from the integrity violations: a late exit is still exactly one exit.
            result.late_exits.append(
                f"#{plan.index} (strategy {plan.strategy_id}, {plan.instrument}) stop crossed at "
                f"t={crossed_at:.1f}s (system up at t={up_at - self.day_mono:.1f}s)"
                f" but exited ({action.value}) only at t={exited - self.day_mono:.1f}s"
            )

    def _judge_daily_loss_limit(
        self, by_id: dict[int, Any], notes: list[Any], tags: dict[str, tuple[Planned, Action, int]],
        placed_at: dict[str, float],
    ) -> None:  # fmt: skip
        """The user with a daily loss limit: told at most once; once told, no BUY of theirs reaches the broker (a
        BUY already on its way gets LOSS_LIMIT_GRACE) and none of their strategies is still running."""
        if not self.config.daily_loss_limit or self.config.users < 2:
            return
        v = self.result.violations
        mine = [p for p in self.plans if p.user == LOSS_LIMITED_USER and p.strategy_id in by_id]
        if not mine:
            return
        user_id = by_id[mine[0].strategy_id].user_id
        told = [n for n in notes if n.user_id == user_id and n.kind == NotificationKind.DAILY_LOSS_LIMIT.value]
        if len(told) > 1:
            v.append(f"daily loss limit: the trader was told {len(told)} times")
        if not told:
            self.result.loss_limit = "not reached"
            return
        at = self.mono_of_clock(told[0].created_at.replace(tzinfo=told[0].created_at.tzinfo or UTC))
        self.result.loss_limit = f"reached at t={at - self.day_mono:.1f}s"
        late = [tag for tag, when in placed_at.items()
                if tag in tags and tags[tag][1] is Action.BUY and tags[tag][0].user == LOSS_LIMITED_USER
                and when > at + LOSS_LIMIT_GRACE]  # fmt: skip
        for tag in late:
            plan = tags[tag][0]
            arrived = placed_at[tag] - self.day_mono
            v.append(f"daily loss limit: #{plan.index}'s BUY reached the broker at t={arrived:.1f}s, "
                     f"after the limit at t={at - self.day_mono:.1f}s")  # fmt: skip
        running = [p.index for p in mine if by_id[p.strategy_id].status == "running"]
        if running:
            v.append(f"daily loss limit: strategies {running[:10]} still running after the limit")

    async def judge(self) -> None:
        assert self.sim is not None
        state = self.sim.state
        result = self.result
        v = result.violations
        self.judge_handovers()
        logs, strategies, notes = await self._db_rows()
        by_id = {s.id: s for s in strategies}
        day = self.day_clock.astimezone(IST).date()
        tags: dict[str, tuple[Planned, Action, int]] = {}  # every tag a strategy may use -> its action and cycle
        first_tag: dict[str, str] = {}  # the tag of an intent's every order -> the tag of its first order
        order_seq: dict[str, int] = {}  # the tag of an intent's every order -> its sequence within the intent
        for plan in self.plans:
            run = by_id[plan.strategy_id].run if plan.strategy_id in by_id else 1
            for cycle in range(1, 2 + (plan.kind.reentries if plan.kind else 0)):
                for action in Action:
                    intent_id = intent_id_for(plan.strategy_id, day, run, action, cycle)
                    for seq in range(1, MAX_ORDERS_PER_INTENT + 1):
                        tags[broker_tag_for(intent_id, seq)] = (plan, action, cycle)
                        first_tag[broker_tag_for(intent_id, seq)] = broker_tag_for(intent_id)
                        order_seq[broker_tag_for(intent_id, seq)] = seq
        logged_tags = {row.broker_tag for row in logs}
        logged_orders = {row.broker_order_id for row in logs if row.broker_order_id}
        audits = state.audit_records()
        result.faulted_requests = sum(1 for r in audits if r.faults)
        placed_at: dict[str, float] = {}
        # api_key -> when each of its exit-side order calls reached the broker: exit placements, and the modify and
        # cancel calls of chased exits and protective stops, which take the same per-user order budget at Kite.
        exit_calls: dict[str, list[float]] = {}
        faulted_by_tag: dict[str, int] = {}
        for record in audits:
            if record.action != "place" and record.http_status != 429:
                exit_calls.setdefault(record.api_key or "", []).append(record.received_monotonic)
            if record.action == "place" and record.tag:
                if record.outcome == "placed":
                    placed_at.setdefault(record.tag, record.received_monotonic)
                    if record.tag in tags and tags[record.tag][1].is_exit:
                        exit_calls.setdefault(record.api_key or "", []).append(record.received_monotonic)
                if record.faults:
                    faulted_by_tag[record.tag] = faulted_by_tag.get(record.tag, 0) + 1

        broker_ids: set[str] = set()
        per_cycle: dict[tuple[int, int], dict[str, list[Any]]] = {}  # (strategy, cycle) -> "BUY"/"EXIT" -> orders
        # A chased exit is cancelled and placed anew under its intent's next tag, possibly more than once: every
        # order of an intent below the last one the broker took was replaced, and only the last is judged.
        last_placed: dict[str, int] = {}  # an intent's first tag -> the highest sequence the broker took
        for tag in placed_at:
            if tag in first_tag:
                last_placed[first_tag[tag]] = max(last_placed.get(first_tag[tag], 0), order_seq[tag])
        replaced = {tag for tag, first in first_tag.items() if order_seq[tag] < last_placed.get(first, 0)}
        for user in self.users:
            per_tag: dict[str, int] = {}
            for order in state.find_orders(user.api_key):
                broker_ids.add(order.order_id)
                result.broker_orders += 1
                per_tag[order.tag or ""] = per_tag.get(order.tag or "", 0) + 1
                if order.tag not in tags:
                    v.append(f"broker order {order.order_id} has a tag {order.tag!r} of no strategy intent")
                    continue
                plan, action, cycle = tags[order.tag]
                if order.tag not in logged_tags or order.order_id not in logged_orders:
                    v.append(f"broker order {order.order_id} ({action.value} of #{plan.index}) has no order-log row")
                if order.status == "CANCELLED" and (order.tag in replaced or not order.filled_quantity):
                    # A resting exit cancelled to be placed anew (its replacement is judged instead), or one the
                    # position was sold by another exit before its replacement went: either way it sold nothing.
                    continue
                if order.status != "REJECTED":
                    side = "BUY" if order.transaction_type == "BUY" else "EXIT"
                    per_cycle.setdefault((plan.strategy_id, cycle), {}).setdefault(side, []).append((order, action))
            for tag, count in per_tag.items():
                if count > 1:
                    v.append(f"{count} broker orders carry tag {tag} ({tags.get(tag, ('?', '?', 0))[1]})")
        for row in logs:
            if row.broker_order_id and row.broker_order_id not in broker_ids:
                v.append(f"order-log row {row.intent_id}#{row.kind}{row.attempt} claims order "
                         f"{row.broker_order_id} that the broker does not have")  # fmt: skip

        # An intent attempted and never finished is stuck in some lane (or was dropped): the day is over, so every
        # attempt has its result by now (a resting protective stop has none by design).
        finished = {row.intent_id for row in logs if row.kind == "result"}
        for intent_id in sorted({row.intent_id for row in logs if row.kind == "attempt"} - finished):
            if not intent_id.endswith(f":{Action.PROTECT.value}"):
                v.append(f"intent {intent_id} was attempted and never finished (no result row at the end of the day)")

        for plan in self.plans:
            user = self.users[plan.user]
            cycles = sorted(c for sid, c in per_cycle if sid == plan.strategy_id)
            previous_exit: Action | None = None
            for cycle in cycles:
                orders = per_cycle[(plan.strategy_id, cycle)]
                buys, exits = orders.get("BUY", []), orders.get("EXIT", [])
                name = f"#{plan.index} (strategy {plan.strategy_id}{f', cycle {cycle}' if cycle > 1 else ''})"
                if len(buys) > 1:
                    v.append(f"{name} has {len(buys)} BUYs at the broker")
                if len(exits) > 1:
                    v.append(f"{name} has {len(exits)} exits at the broker: {[a.value for _, a in exits]}")
                if cycle > 1 and buys and previous_exit is not Action.STOPLOSS:
                    v.append(f"{name} bought again after a {previous_exit} exit: only a stop-loss exit re-enters")
                if user.expired:
                    continue
                filled_buy = [o for o, _ in buys if o.status == "COMPLETE"]
                if not filled_buy:
                    continue
                result.bought += 1
                filled_exit = [(o, a) for o, a in exits if o.status == "COMPLETE"]
                if len(filled_exit) != 1:
                    v.append(f"{name} bought but has {len(filled_exit)} filled exits")
                    continue
                exit_order, exit_action = filled_exit[0]
                previous_exit = exit_action
                kind = plan.kind.name if plan.kind else "fixed"
                result.exits[exit_action.value] = result.exits.get(exit_action.value, 0) + 1
                result.kinds[kind] = result.kinds.get(kind, 0) + 1
                if cycle > 1:
                    result.kinds["re-entered"] = result.kinds.get("re-entered", 0) + 1
                if plan.group != "hit" or plan.kind is not None:
                    continue  # the latency bound is judged on the fixed stops, crossed where the path says
                buy_tag = filled_buy[0].tag
                exit_tag = first_tag.get(exit_order.tag or "", exit_order.tag)  # a chased exit: its first order
                self._judge_stop_latency(plan, placed_at.get(buy_tag or "", 0.0), placed_at.get(exit_tag or ""),
                                         exit_action, faulted_by_tag.get(exit_tag or "", 0), exit_calls)  # fmt: skip
        self._judge_daily_loss_limit(by_id, notes, tags, placed_at)

        # The expired session: every strategy of that user stops with the reconnect notice, no retry storm.
        for user in self.users:
            if not user.expired:
                continue
            # A 429 is answered before the request is read (the token is never looked at), and the engine rightly
            # sends again at once: only the placements the broker read count as attempts on the expired session.
            attempts = [r for r in audits if r.api_key == user.api_key and r.action == "place" and r.http_status != 429]
            mine = [p for p in self.plans if self.users[p.user] is user]
            if len(attempts) > len(mine):
                v.append(f"expired session: {len(attempts)} order attempts for {len(mine)} strategies (a retry storm)")
            skipped = {row.strategy_id for row in logs if row.kind == "result" and row.status == "skipped"}
            for plan in mine:
                strategy = by_id[plan.strategy_id]
                if plan.strategy_id in skipped:
                    continue  # its BUY was skipped (missed while the system was down): no order, nothing to tell
                if strategy.status not in ("failed", "stopped"):
                    v.append(f"expired session: #{plan.index} is {strategy.status}, not failed/stopped")
                if not any(n.strategy_id == plan.strategy_id and SESSION_EXPIRED in n.message for n in notes):
                    v.append(f"expired session: #{plan.index} has no '{SESSION_EXPIRED}' notification")
        if self.proxies is not None:
            # Every order call of a user left from that user's egress address, and none was refused for it.
            for index, user in enumerate(self.users):
                address = self.proxies.proxies[index].listen
                calls = [r for r in audits if r.api_key == user.api_key]
                stray = sorted({str(r.source_ip) for r in calls if r.source_ip != address})
                if stray:
                    v.append(f"egress: user {index}'s order calls also came from {stray}, not only {address}")
                refused = [r for r in calls if r.error_type == "PermissionException"]
                if refused:
                    v.append(f"egress: {len(refused)} order call(s) of user {index} refused for their address")
        result.strategies = len(self.plans)
        result.recoveries = sum(s.seen.get("Recovery Complete", 0) for s in self.services.values())


def _new_workdir(config: MatrixConfig) -> Path:
    if config.workdir is not None:
        config.workdir.mkdir(parents=True, exist_ok=True)
        return config.workdir
    return Path(tempfile.mkdtemp(prefix=f"crash-matrix-{config.seed}-"))


async def run_matrix(config: MatrixConfig) -> MatrixResult:
    """One seed: start the stack, trade the day through every incident, judge, and tear everything down."""
    began = time.monotonic()
    workdir = _new_workdir(config)
    matrix = CrashMatrix(config, workdir)
    print(f"crash matrix: seed={config.seed} strategies={config.strategies} speed={config.speed} "
          f"logs in {workdir}", flush=True)  # fmt: skip
    try:
        await matrix.start_stack()
        async with httpx.AsyncClient(base_url=matrix.api_root, timeout=15.0) as http:
            matrix.http = http
            incidents = await matrix.setup_day()
            for incident in incidents:
                matrix.say(f"planned t={incident.at:5.1f}s {incident.kind} {incident.detail}")
            await matrix.run_day(incidents)
        await matrix.judge()
    except BaseException as exc:
        matrix.result.violations.append(f"harness error: {type(exc).__name__}: {exc}")
        raise
    finally:
        matrix.stop_stack()
        matrix.result.wall_seconds = time.monotonic() - began
    return matrix.result


def service_tails(result: MatrixResult, lines: int = 40) -> Iterator[str]:
    for log in sorted(Path(result.workdir).glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        yield f"--- {log.name} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


__all__ = ["KILLS", "MULTI_KILLS", "MatrixConfig", "MatrixResult", "run_matrix", "service_tails"]

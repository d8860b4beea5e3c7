"""Shared plumbing for the benchmarks that run the real stack: embedded Kafka (Tansu) and redis-server on free
ports, a migrated database (SQLite file, or a throwaway PostgreSQL database), and `algo worker` /
`algo scheduler` as child processes in their own process groups, each with an environment built from one
`Settings` and one pinned clock. Everything listens on 127.0.0.1 and is torn down on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from core.clock import ScaledClock
from core.embedded import EmbeddedKafka, free_port, postgres_command, redis_command, start_process, stop_process
from core.environment import child_environment
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "Worker]: Ready"


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


def settings_env(settings: Settings, clock: ScaledClock) -> dict[str, str]:
    """The child's environment (core.environment), plus this checkout on PYTHONPATH: children run in the
    scratch directory (Faust writes `<app>-data/` into its working directory)."""
    env = child_environment(settings, clock)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Service:
    """A child `algo <command>` whose output is pumped into memory (and a log file) by a thread."""

    name: str
    process: subprocess.Popen[str]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def pump(self) -> None:
        stdout = self.process.stdout
        if stdout is None:  # started without a pipe: nothing to read
            return
        with self.log_path.open("a") as log:
            for line in stdout:
                log.write(line)
                log.flush()
                self.lines.append(line.rstrip())
                if READY_LINE in line:
                    self.ready.set()

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def wait_ready(self, within: float = 90.0) -> None:
        deadline = time.monotonic() + within
        while not await asyncio.to_thread(self.ready.wait, 0.25):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready (exit code {self.process.poll()}):\n{self.tail()}")

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused worker cannot act on SIGTERM
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class Stack:
    """A Kafka broker (Apache Kafka, or Tansu), redis-server and a migrated database (SQLite, or a private
    PostgreSQL cluster) for one benchmark run, plus the services it starts."""

    def __init__(
        self,
        postgres: bool = False,
        settings: dict[str, str] | None = None,
        kafka: str = "auto",
        kafka_config: dict[str, str] | None = None,  # broker settings beyond the defaults (e.g. TEST_CONFIG)
    ) -> None:
        self.postgres = postgres
        self.kafka_engine = kafka
        self.extra_settings: dict[str, object] = dict(settings or {})  # e.g. execution_concurrency, to compare
        self.workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        self._processes: list[subprocess.Popen[bytes]] = []
        self.services: list[Service] = []
        self.kafka_bootstrap = ""
        self.kafka_pid = 0
        self.redis_url = ""
        self.database_url = ""
        self._pg_admin_url = ""
        self._pg_name: str | None = None
        self.kafka = EmbeddedKafka(self.workdir / "kafka", engine=kafka, config=kafka_config)
        self.keep_logs = False  # a run that found something to look at sets it

    @property
    def database_kind(self) -> str:
        return "PostgreSQL (private cluster)" if self.postgres else "SQLite (WAL, one file)"

    async def __aenter__(self) -> Stack:
        redis_port = free_port()
        self._processes.append(start_process(redis_command(redis_port), redis_port))
        await asyncio.to_thread(self.kafka.start)
        assert self.kafka.process is not None  # noqa: S101 - just started
        self.kafka_pid = self.kafka.process.pid
        self.kafka_bootstrap = self.kafka.bootstrap
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        if self.postgres:
            pg_port = free_port()
            pg_dir = Path(tempfile.mkdtemp(prefix="pipeline-bench-pg-"))  # the server runs as `postgres`
            command = await asyncio.to_thread(postgres_command, pg_dir, pg_port)
            self._processes.append(start_process(command, pg_port, timeout=60.0, log=pg_dir / "server.log"))
            self._pg_admin_url = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/postgres"
            self.database_url = await self._create_pg_database()
        else:
            self.database_url = f"sqlite+aiosqlite:///{self.workdir / 'bench.db'}"
        from storage.migrate import upgrade

        await asyncio.to_thread(upgrade, self.database_url)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for service in self.services:
            service.stop()
        if self._pg_name is not None:
            await self._drop_pg_database()
        self.kafka.stop()
        for process in reversed(self._processes):
            stop_process(process)
        if exc_type is None and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"logs kept in {self.workdir}", file=sys.stderr)

    async def _create_pg_database(self) -> str:
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        from storage.db import create_engine

        self._pg_name = f"algo_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self._pg_admin_url).execution_options(isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{self._pg_name}"'))
        await admin.dispose()
        return make_url(self._pg_admin_url).set(database=self._pg_name).render_as_string(hide_password=False)

    async def _drop_pg_database(self) -> None:
        from sqlalchemy import text

        from storage.db import create_engine

        admin = create_engine(self._pg_admin_url).execution_options(isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)'))
        await admin.dispose()

    def settings(self, topic_prefix: str, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "database_url": self.database_url,
            "topic_prefix": topic_prefix,
        }
        values.update(overrides)
        values.update(self.extra_settings)
        return Settings.model_validate(values)

    def start_service(self, command: str, env: dict[str, str]) -> Service:
        """`algo <command>` as a child in its own process group, its output kept in a log file."""
        log_path = self.workdir / f"{env.get('TOPIC_PREFIX', '')}{command}.log"
        process = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "cli.main", command],
            env=env,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        service = Service(command, process, log_path)
        threading.Thread(target=service.pump, daemon=True).start()
        self.services.append(service)
        return service


@dataclass
class Received:
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int  # the record's CreateTime: wall clock of the producing process
    arrived: float  # time.monotonic() when this process got it


class TopicWatcher:
    """Reads topics from the beginning in the background, keeping every record with its arrival time."""

    def __init__(self, bootstrap: str, topics: list[str], fetch_max_wait_ms: int = 10) -> None:
        self.records: list[Received] = []
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def start(self) -> TopicWatcher:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for batch in batches.values():
                for r in batch:
                    self.records.append(Received(r.topic, r.key, r.value or b"", r.timestamp, now))
            if batches:
                self.changed.set()

    async def wait_for(self, predicate: Callable[[list[Received]], bool], within: float) -> bool:
        """Until `predicate(records)` is true or `within` seconds pass; returns whether it became true."""
        deadline = time.monotonic() + within
        while not predicate(self.records):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """The API as production runs one worker of it (uvicorn, uvloop, httptools), in its own process group;
    returns once it listens on 127.0.0.1:`port`."""
    from core.embedded import wait_for_port

    with log.open("ab") as output:
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--loop", "uvloop", "--http", "httptools",
             "--no-access-log", "--log-level", "warning"],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, 60, api)
    except BaseException:
        os.killpg(api.pid, signal.SIGKILL)
        raise
    return api


def wall_minus_monotonic() -> float:
    """Offset to turn this machine's time.monotonic() (shared by every process) into unix time."""
    samples = []
    for _ in range(5):
        a = time.monotonic()
        w = time.time()
        b = time.monotonic()
        samples.append((b - a, w - (a + b) / 2))
    return min(samples)[1]


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a process's main thread and by all its other threads."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / tick
            if int(tid) == pid:
                main += used
            else:
                other += used
    return main, other


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])

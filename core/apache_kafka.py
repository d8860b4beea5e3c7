"""Apache Kafka on one machine: the broker's jars from Maven Central, run with the machine's JDK.

`algo up`, the test fixtures, the crash matrix and the benchmarks start it (KRaft, one combined
broker/controller, loopback only) wherever a JDK is present; Tansu is the fallback without one. The jars are
fetched once by Maven into a cache folder (`make install` does it; so does the first start that finds them
missing) and reused by every checkout on the machine.

The version is the one `docker-compose.yml` runs: what the tests prove is proven on production's broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path


class ApacheKafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be started here (no JDK, no jars and no Maven, a failed fetch or format)."""


# Pinned with docker-compose.yml's `apache/kafka` image (tests/test_compose.py checks they agree).
KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
# kafka-tools brings StorageTool's dependencies; the slf4j binding routes the broker's logs into log4j2
# (without it Kafka's own logging goes nowhere).
ARTIFACTS = (
    ("org.apache.kafka", f"kafka_{SCALA_VERSION}", KAFKA_VERSION),
    ("org.apache.kafka", "kafka-tools", KAFKA_VERSION),
    ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3"),
)
HEAP = "-Xmx1g"
FORMAT_TIMEOUT_SECONDS = 120.0

# Broker settings of every embedded Apache Kafka. Everything else is the broker's default, as in production.
BASE_CONFIG: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    # One broker: internal topics cannot have more replicas than brokers.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # A group's first member must not wait 3 s for others that may never come (docker-compose sets the same).
    "group.initial.rebalance.delay.ms": "0",
    # Topics are created up front with their partition counts (`algo topics create`), never implicitly.
    "auto.create.topics.enable": "false",
}

# The test broker only: the suite's consumers use a 3 s session so that a killed worker's partitions move
# within the tests' waits; Apache Kafka refuses sessions under 6 s by default (InvalidSessionTimeoutError).
TEST_CONFIG: dict[str, str] = {"group.min.session.timeout.ms": "1000"}

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "algo-trading" / f"kafka-{SCALA_VERSION}-{KAFKA_VERSION}"


def java_binary() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def jars_present(folder: Path | None = None) -> bool:
    folder = folder or cache_dir()
    return (folder / "lib" / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar").exists()


def unavailable_reason() -> str | None:
    """Why Apache Kafka cannot run here (None: it can, fetching its jars first if need be)."""
    if java_binary() is None:
        return "no JDK (java) on this machine"
    if not jars_present() and shutil.which("mvn") is None:
        return f"its jars are not in {cache_dir()} and there is no Maven (mvn) to fetch them"
    return None


def fetch_jars(folder: Path | None = None, quiet: bool = True) -> Path:
    """Bring the broker's jars from Maven Central into `folder`/lib (once); returns the folder."""
    folder = folder or cache_dir()
    if jars_present(folder):
        return folder
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ApacheKafkaUnavailable("Apache Kafka's jars are missing and there is no Maven (mvn) to fetch them")
    dependencies = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in ARTIFACTS
    )
    pom = (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>local.algo-trading</groupId><artifactId>kafka-broker</artifactId><version>1</version>"
        f"<packaging>pom</packaging><dependencies>{dependencies}</dependencies></project>"
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Into a sibling first, renamed when complete: an interrupted fetch never looks like a finished one.
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        Path(work, "pom.xml").write_text(pom)
        lib = Path(work, "lib")
        command = [mvn, "-B", *(["-q"] if quiet else []), "-f", str(Path(work, "pom.xml")),
                   "dependency:copy-dependencies", f"-DoutputDirectory={lib}"]  # fmt: skip
        result = subprocess.run(command, capture_output=quiet, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            tail = (result.stdout or "")[-800:] if quiet else ""
            raise ApacheKafkaUnavailable(f"fetching Apache Kafka {KAFKA_VERSION} with Maven failed: {tail.strip()}")
        shutil.rmtree(folder / "lib", ignore_errors=True)
        lib.rename(folder / "lib")
    return folder


def server_config(port: int, controller_port: int, data_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    return {
        **BASE_CONFIG,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "log.dirs": str(data_dir),
        **extra,
    }


def prepare(
    workdir: Path,
    port: int,
    controller_port: int,
    extra: Mapping[str, str] | None = None,
    log_level: str = "WARN",
) -> list[str]:
    """Write the config, format an empty KRaft storage dir (wiping any earlier one) and return the broker's
    command line. Called again on the same workdir, it starts the broker over, empty."""
    java = java_binary()
    if java is None:
        raise ApacheKafkaUnavailable("Apache Kafka needs a JDK: no java on this machine")
    folder = fetch_jars()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = server_config(port, controller_port, data_dir, extra or {})
    properties = workdir / "server.properties"
    properties.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
    log4j = workdir / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log=workdir / "kafka.log", level=log_level))
    classpath = f"{folder / 'lib'}/*"
    jvm = [java, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    storage = [*jvm, "kafka.tools.StorageTool"]
    cluster_id = _run(storage + ["random-uuid"]).strip().splitlines()[-1]
    _run(storage + ["format", "-t", cluster_id, "-c", str(properties)])
    return [*jvm[:1], HEAP, *jvm[1:], "kafka.Kafka", str(properties)]


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_SECONDS, check=False)  # noqa: S603
    if result.returncode != 0:
        raise ApacheKafkaUnavailable(f"{' '.join(command[-3:])} failed: {(result.stderr or result.stdout)[-500:]}")
    return result.stdout


if __name__ == "__main__":  # `python -m core.apache_kafka`: fetch the jars now (make install)
    print(fetch_jars(quiet=False) / "lib")

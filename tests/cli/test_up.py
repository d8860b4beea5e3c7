"""`algo up` smoke tests: the whole stack in a subprocess, on free ports, and nothing left behind."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from cli.entrypoints import module_present
from core.embedded import free_port
from streams.topics import topic_specs
from tests.cli.conftest import clean_env
from tests.fixtures.api import OPERATOR_TOKEN
from tests.fixtures.services import build_settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find every child"),
]

READY_WITHIN_SECONDS = 45
# The launcher's own lines are prefixed "up |" (a service may print "ready in" too: Tansu does).
READY_MARKERS = ("up | ready in ", "up | up with problems", "error:")


# --- processes, read from /proc (no psutil needed) -------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a live process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children_of(parent: int) -> set[int]:
    return {pid for pid in _all_pids() if (stat := _stat(pid)) is not None and stat[1] == parent}


def members_of_groups(groups: set[int]) -> set[int]:
    return {pid for pid in _all_pids() if (stat := _stat(pid)) is not None and stat[2] in groups and alive(pid)}


# --- the launcher under test ---------------------------------------------------------------------------


@dataclass
class RunningStack:
    process: subprocess.Popen[str]
    api_port: int
    kafka_bootstrap: str
    lines: list[str] = field(default_factory=list)
    ready: queue.Queue[str] = field(default_factory=queue.Queue)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while text not in self.output():
            if time.monotonic() > deadline or self.process.poll() is not None:
                return False
            time.sleep(0.05)
        return True

    def wait_ready(self) -> tuple[str, float]:
        started = time.monotonic()
        try:
            line = self.ready.get(timeout=READY_WITHIN_SECONDS)
        except queue.Empty:
            pytest.fail(f"`algo up` not ready within {READY_WITHIN_SECONDS}s:\n{self.output()[-5000:]}")
        return line, time.monotonic() - started


def _read(stack: RunningStack) -> None:
    assert stack.process.stdout is not None
    for line in stack.process.stdout:
        stack.lines.append(line.rstrip())
        if line.lstrip().startswith(READY_MARKERS):
            stack.ready.put(line)


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[object]:
    started: list[RunningStack] = []

    def start(*args: str) -> RunningStack:
        api_port, kafka_port = free_port(), free_port()
        env = clean_env(
            KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
            REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
            DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'up.db'}",
            API_PORT=str(api_port),
            SIM_PORT=str(free_port()),
            OPERATOR_TOKEN=OPERATOR_TOKEN,
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--no-health-table", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        stack = RunningStack(process, api_port, f"127.0.0.1:{kafka_port}")
        threading.Thread(target=_read, args=(stack,), daemon=True).start()
        started.append(stack)
        return stack

    yield start
    for stack in started:  # whatever a failed test left running
        for pid in children_of(stack.process.pid) | {stack.process.pid}:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        stack.process.kill()
        stack.process.wait(10)


def _health(api_port: int) -> dict[str, dict[str, object]]:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    response = httpx.get(f"http://127.0.0.1:{api_port}/health/ready", headers=headers, timeout=10)
    components: dict[str, dict[str, object]] = response.json()["components"]
    return components


async def _partitions(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [spec.name for spec in topic_specs(build_settings())]
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names) if not d["error_code"]}
    finally:
        await admin.close()


async def test_up_runs_the_stack_and_leaves_no_process_behind(start_stack) -> None:  # type: ignore[no-untyped-def]
    stack: RunningStack = start_stack("--for", "55", "--demo")
    line, waited = stack.wait_ready()
    assert "up | ready in " in line, stack.output()[-5000:]
    assert waited < 30, f"startup took {waited:.1f}s"

    launcher_children = children_of(stack.process.pid)
    groups = set(launcher_children)  # every child leads its own process group
    assert len(launcher_children) >= 3, stack.output()  # kafka, redis and at least one service

    # Every component /health reports is up (the broker only when the simulator is in this build).
    if module_present("api"):
        components = _health(stack.api_port)
        down = {name: c["detail"] for name, c in components.items() if c["status"] != "up"}
        if not module_present("sim"):
            down.pop("broker", None)
        assert not down, down

    expected = {spec.name: spec.partitions for spec in topic_specs(build_settings())}
    assert await _partitions(stack.kafka_bootstrap) == expected

    if module_present("api") and module_present("sim"):
        # The demo registers through the API after readiness; the URLs are printed once it is done.
        assert stack.wait_for("Kafka bootstrap", 20), stack.output()[-5000:]
        assert "demo: registered" in stack.output(), stack.output()[-5000:]

    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(30) == 0, stack.output()[-5000:]
    assert not [pid for pid in launcher_children if alive(pid)]
    assert not members_of_groups(groups), "processes left in the children's groups"


def test_children_die_with_a_killed_launcher(start_stack) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL leaves the launcher no chance to clean up: the kernel's parent-death signal does it."""
    stack: RunningStack = start_stack("--for", "55")
    stack.wait_ready()
    launcher_children = children_of(stack.process.pid)
    assert launcher_children

    stack.process.kill()
    stack.process.wait(10)
    killed_at = time.monotonic()
    deadline = time.monotonic() + 20
    while (survivors := [pid for pid in launcher_children if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not survivors, f"orphans: {survivors}"
    print(f"children gone {time.monotonic() - killed_at:.1f}s after the launcher was killed")

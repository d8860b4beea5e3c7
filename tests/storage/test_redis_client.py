"""The services' Redis client rides out a Redis restart instead of dying on the first refused connection.

Regression for crash-matrix seed 1: Redis went down for 0.68 s while the tick connector was starting
after a Kafka restart; its first SCAN was refused, the connector exited with a traceback, and the
position it fed went unwatched. Each test runs its own redis-server, since it kills it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.embedded import EmbeddedUnavailable, free_port, redis_command, start_process, stop_process
from storage.runtime import connect_redis


async def test_a_command_sent_while_redis_restarts_completes_after_it_is_back() -> None:
    port = free_port()
    try:
        first = start_process(redis_command(port), port)
    except EmbeddedUnavailable as exc:
        pytest.skip(str(exc))
    client = connect_redis(f"redis://127.0.0.1:{port}/0", ride_out_seconds=10.0)
    await client.set("before", "1")
    first.kill()  # SIGKILL, the way the crash matrix takes Redis down
    first.wait()
    restarted: list[subprocess.Popen[bytes]] = []

    async def restart_after_an_outage() -> None:
        await asyncio.sleep(1.0)
        restarted.append(await asyncio.to_thread(start_process, redis_command(port), port))

    restarting = asyncio.create_task(restart_after_an_outage())
    began = time.monotonic()
    try:
        # Refused while the server is down, retried, answered by the restarted one.
        assert await client.scard("symbol:NSE:INFY:strategies") == 0
        assert time.monotonic() - began >= 0.9, "answered before the server was back: nothing was retried"
        assert await client.get("before") is None  # a fresh, empty server: recovery's job, not the client's
    finally:
        await restarting
        await client.aclose()
        for process in restarted:
            stop_process(process)


async def test_the_api_window_gives_up_within_about_a_second() -> None:
    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", ride_out_seconds=1.0)  # nothing listens
    began = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await client.ping()
    assert time.monotonic() - began < 3.0
    await client.aclose()

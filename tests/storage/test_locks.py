"""kept_alive_lock against a real redis-server."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from storage.locks import ProcessLease, kept_alive_lock
from storage.runtime import connect_redis


async def test_the_holder_leaves_even_when_the_renewal_absorbs_its_cancellation(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash matrix seeds 3, 13 and 17: a strategy's lane hung for good in the lock's exit, waiting for the
    renewal task, which was alive and renewing the lock for ever (found with the worker's task dump). A
    cancellation that lands inside a Redis call can be absorbed by the client; here the renewal's call
    absorbs it the way that client did (a stand-in: the race itself cannot be timed from a test)."""
    real_reacquire = Lock.reacquire
    renewing = asyncio.Event()

    async def absorbing_reacquire(self: Lock) -> Any:
        renewing.set()
        try:
            await asyncio.sleep(0.05)  # a Redis round trip, slowed so the holder's exit lands inside it
        except asyncio.CancelledError:
            pass  # absorbed, and the call completes as the client's retry would
        return await real_reacquire(self)

    monkeypatch.setattr(Lock, "reacquire", absorbing_reacquire)
    key = "lock:test-absorbed-cancel"

    async def hold_until_renewing() -> None:
        async with kept_alive_lock(redis, key, ttl=0.3, wait=1.0):
            await renewing.wait()

    holder = asyncio.create_task(hold_until_renewing())
    finished, _ = await asyncio.wait({holder}, timeout=3.0)
    if not finished:
        holder.cancel()  # the old code sat here, waiting for the renewal task, for ever
    assert holder in finished, "the holder never left the lock"
    assert await redis.exists(key) == 0  # released, and not renewed after the holder left
    async with asyncio.timeout(5):
        async with kept_alive_lock(redis, key, ttl=0.3, wait=1.0):
            pass  # the next holder gets it at once


async def test_a_lock_lost_while_held_ends_the_work_once_without_an_error(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Crash matrix seed 3: Redis restarted empty while lanes held their strategies' locks; each lock's release
    then raised LockNotOwnedError after the order was done, and the lane carried the intent out again."""
    key = "lock:test-lost"
    runs = 0
    async with kept_alive_lock(redis, key, ttl=5.0, wait=1.0):
        runs += 1
        await redis.flushdb()  # what a Redis restart does to every lock held at that moment
    assert runs == 1
    assert any("was lost while held" in record.getMessage() for record in caplog.records)
    async with asyncio.timeout(5):
        async with kept_alive_lock(redis, key, ttl=5.0, wait=1.0):
            pass  # and it is free for the next holder


async def test_a_lock_held_by_someone_else_past_the_wait_is_refused(redis: Redis) -> None:
    key = "lock:test-busy"
    await redis.set(key, "another process", px=5_000)
    with pytest.raises(LockError, match="still held by another process"):
        async with kept_alive_lock(redis, key, ttl=1.0, wait=0.3):
            pytest.fail("entered a lock someone else holds")


# Another process takes the lock under its lease and holds it until it is killed (SIGKILL: no release).
_HOLDER = """
import asyncio, sys
from storage.locks import ProcessLease, kept_alive_lock
from storage.runtime import connect_redis

async def main() -> None:
    url, key, lease_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lease = ProcessLease(url, lease_seconds)
    lease.start()
    async with kept_alive_lock(connect_redis(url), key, ttl=30.0, lease=lease):
        print("held", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_holders_lock_is_taken_over_when_its_lease_lapses_and_a_living_ones_is_not(
    redis: Redis, redis_url: str
) -> None:
    """Crash matrix seed 6: a worker killed mid-order left its strategies' locks for their whole TTL, and the
    stop-loss exits queued behind them in its successor waited up to 10 s after the system was back up."""
    key, lease_seconds = "lock:test-dead-holder", 1.0
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, redis_url, key, str(lease_seconds), stdout=asyncio.subprocess.PIPE
    )
    lease = ProcessLease(redis_url, lease_seconds)
    lease.start()
    try:
        async with asyncio.timeout(30):
            assert (await holder.stdout.readline()).strip() == b"held"  # type: ignore[union-attr]
        # Alive, it keeps its lock well past the length of its lease.
        with pytest.raises(LockError):
            async with kept_alive_lock(redis, key, ttl=30.0, wait=lease_seconds * 2, lease=lease):
                pytest.fail("took the lock of a living process")
        holder.kill()
        await holder.wait()
        killed_at = time.monotonic()
        async with kept_alive_lock(redis, key, ttl=30.0, wait=20.0, lease=lease):
            taken_after = time.monotonic() - killed_at
            assert (await redis.get(key) or "").startswith(lease.process)
        assert taken_after < lease_seconds + 2.0  # not the 30 s the lock's TTL would have kept it
    finally:
        if holder.returncode is None:
            holder.kill()
        lease.stop()


def test_the_lease_outlives_an_unexpected_error_while_renewing(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease thread that died on an error other than Redis's would let the lease lapse while the process
    lives on, and its locks would be taken over by any other worker."""
    lease = ProcessLease(redis_url, seconds=0.6)
    real_set = lease._client.set
    failed, renewed_after = threading.Event(), threading.Event()

    def flaky_set(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise ValueError("an unexpected reply")
        renewed_after.set()
        return real_set(*args, **kwargs)

    lease.start()
    try:
        monkeypatch.setattr(lease._client, "set", flaky_set)
        assert failed.wait(5) and renewed_after.wait(5)
        assert lease._thread.is_alive()
        assert lease._client.exists(lease.key) == 1
    finally:
        lease.stop()


async def test_locks_asked_for_at_once_are_taken_in_a_few_round_trips_on_a_few_connections(redis_url: str) -> None:
    """An exits burst asks for hundreds of strategies' locks in one instant: taken one script call each, the
    pool opened a connection for nearly every one, and that was most of the worker's first 300 ms."""
    lease = ProcessLease(redis_url)
    lease.start()
    client = connect_redis(redis_url)
    held, all_inside = asyncio.Event(), asyncio.Event()
    inside = 0
    connected_before = (await client.info("clients"))["connected_clients"]

    async def hold(n: int) -> None:
        nonlocal inside
        async with kept_alive_lock(client, f"lock:test-burst-{n}", ttl=5.0, wait=5.0, lease=lease):
            inside += 1
            if inside == 300:
                all_inside.set()
            await held.wait()

    try:
        holders = [asyncio.create_task(hold(n)) for n in range(300)]
        async with asyncio.timeout(10):
            await all_inside.wait()
        assert (await client.info("clients"))["connected_clients"] - connected_before <= 10
        assert lease.takers(client).script.batches <= 5  # not 300
        # Each is really held: a second process asking for any of them is refused while its holder lives.
        other = ProcessLease(redis_url)
        other.start()
        try:
            with pytest.raises(LockError):
                async with kept_alive_lock(client, "lock:test-burst-7", ttl=5.0, wait=0.3, lease=other):
                    pass
        finally:
            other.stop()
        held.set()
        await asyncio.gather(*holders)
        assert await client.exists(*(f"lock:test-burst-{n}" for n in range(300))) == 0
    finally:
        held.set()
        await client.aclose()
        lease.stop()

"""kept_alive_lock against a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from storage.locks import kept_alive_lock


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

"""Redis locks that a dead holder cannot keep: a short TTL, renewed while the holder is alive and working.

A worker killed mid-order or mid-recovery leaves its lock behind for at most `ttl` seconds; a slow but
living holder (retries, a big recovery) never loses its lock to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.lock import Lock


@contextlib.asynccontextmanager
async def kept_alive_lock(redis: Redis, key: str, ttl: float = 10.0, wait: float = 120.0) -> AsyncIterator[Lock]:
    lock = redis.lock(key, timeout=ttl, blocking_timeout=wait)
    async with lock:
        keeper = asyncio.create_task(_renew(lock, ttl))
        try:
            yield lock
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper


async def _renew(lock: Lock, ttl: float) -> None:
    while True:
        await asyncio.sleep(ttl / 3)
        await lock.reacquire()

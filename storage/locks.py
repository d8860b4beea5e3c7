"""Redis locks that a dead holder cannot keep: a short TTL, renewed while the holder is alive and working.

A worker killed mid-order or mid-recovery leaves its lock behind for at most `ttl` seconds; a slow but
living holder (retries, a big recovery) never loses its lock to another process.

The renewal stops when the holder is done because a flag says so, not only because its task is cancelled:
a cancellation that lands while the renewal is inside a Redis call can be absorbed by the client, which then
retries the call. The holder used to await that task to the end, and it never ended: the holder hung and the
lock was renewed for ever, with the strategy's lane, and the exit queued in it, stuck behind it (crash matrix
seeds 3, 13 and 17). Now the renewal ends at its next turn, and the holder waits for it only briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def kept_alive_lock(redis: Redis, key: str, ttl: float = 10.0, wait: float = 120.0) -> AsyncIterator[Lock]:
    lock = redis.lock(key, timeout=ttl, blocking_timeout=wait)
    async with lock:
        released = asyncio.Event()
        keeper = asyncio.create_task(_renew(lock, ttl, released), name=f"renew {key}")
        keeper.add_done_callback(_retrieve)
        try:
            yield lock
        finally:
            released.set()
            keeper.cancel()
            await asyncio.wait({keeper}, timeout=ttl / 3)


def _retrieve(keeper: asyncio.Task[None]) -> None:
    # The work is done by now or soon: a renewal that failed (Redis restarted, or a late renewal after the
    # release) changes nothing, but is worth a line in the log.
    if not keeper.cancelled() and keeper.exception() is not None:
        log.warning("%s: renewal failed: %r", keeper.get_name(), keeper.exception())


async def _renew(lock: Lock, ttl: float, released: asyncio.Event) -> None:
    while not released.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(released.wait(), ttl / 3)
        if not released.is_set():
            await lock.reacquire()

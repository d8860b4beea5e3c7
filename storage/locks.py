"""Redis locks that a dead holder cannot keep: a short TTL, renewed while the holder is alive and working.

A worker killed mid-order or mid-recovery leaves its lock behind for at most `ttl` seconds; a slow but
living holder (retries, a big recovery) never loses its lock to another process.

The renewal stops when the holder is done because a flag says so, not only because its task is cancelled:
a cancellation that lands while the renewal is inside a Redis call can be absorbed by the client, which then
retries the call. The holder used to await that task to the end, and it never ended: the holder hung and the
lock was renewed for ever, with the strategy's lane, and the exit queued in it, stuck behind it (crash matrix
seeds 3, 13 and 17). Now the renewal ends at its next turn, and the holder waits for it only briefly.

A lock found gone at release (Redis restarted or flushed while it was held, or it expired) is logged, not
raised: the work under it is finished, and raising made the caller carry it out a second time (crash matrix
seed 3: every lane that held a lock across a Redis restart re-ran its intent, only to find the result).

A process that holds a `ProcessLease` also frees its locks sooner when it dies: its lock values name it, a
thread keeps `alive:{process}` set for `LEASE_SECONDS`, and a process waiting for a lock whose holder's lease
has lapsed takes it over at once instead of waiting out the TTL. A thread, not a task: a busy event loop must
not make a living process look dead; SIGKILL stops the thread with the process. A killed worker's strategy
locks used to hold up the exits queued behind them for up to 10 s after it restarted (crash matrix seed 6).
What the dead holder may have sent to the broker is the executor's business: it lets such an order settle
before it asks the broker about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import cast

import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError

from storage.batched_script import BatchedScript

log = logging.getLogger(__name__)

LEASE_SECONDS = 3.0
LEASE_PREFIX = "alive:"

# Take the lock if it is free, or if the process named in its value has no lease any more (it died). Either
# way the taker's own lease is set in the same step: right after a Redis restart the lease thread may not have
# written it yet, and a lock taken in that gap must not look abandoned. (The holder's lease key is built here
# rather than passed in KEYS: fine on the single Redis this project runs, not on a cluster.)
_ACQUIRE_OR_TAKE_OVER = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return 1
end
local holder = redis.call('GET', KEYS[1])
local process = holder and string.match(holder, '^([0-9a-f]+)/')
if process and redis.call('EXISTS', ARGV[4] .. process) == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return 2
end
return 0
"""


class ProcessLease:
    """`alive:{process}` in Redis for as long as this process lives, kept by a thread; and the process's lock
    takers (`takers`)."""

    def __init__(self, redis_url: str, seconds: float = LEASE_SECONDS) -> None:
        self.process = uuid.uuid4().hex
        self.key = LEASE_PREFIX + self.process
        self.seconds = seconds
        timeout = seconds / 3
        self._client = sync_redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="process-lease", daemon=True)
        self._takers: dict[int, LockTakers] = {}

    def takers(self, redis: Redis) -> LockTakers:
        """The lock takers of this process on `redis` (one per client, so that their batches share it)."""
        takers = self._takers.get(id(redis))
        if takers is None or takers.redis is not redis:
            takers = self._takers[id(redis)] = LockTakers(redis, self)
        return takers

    def start(self) -> None:
        self._renew()  # before the first lock is taken
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.seconds)
        with contextlib.suppress(sync_redis.RedisError):
            self._client.delete(self.key)  # a clean stop frees whatever it still held at once
        self._client.close()

    def _keep(self) -> None:
        while not self._stopped.wait(self.seconds / 6):
            self._renew()

    def _renew(self) -> None:
        try:
            self._client.set(self.key, "1", px=int(self.seconds * 1000))
        except sync_redis.RedisError as exc:  # Redis restarting: the locks went with it; retried next turn
            log.debug("process lease not renewed: %r", exc)
        except Exception:
            # Anything else must not end the thread: a lease left to lapse would hand this living process's
            # locks to any other that asks, and two workers would run the same strategy's intents at once.
            log.exception("process lease not renewed; retrying")


class LockTakers:
    """This process's lock takes on one Redis client: those asked for at once go out in one pipeline (an exits
    burst asks for hundreds of strategies' locks in the same instant)."""

    def __init__(self, redis: Redis, lease: ProcessLease) -> None:
        self.redis = redis
        self.lease = lease
        self.script = BatchedScript(redis, _ACQUIRE_OR_TAKE_OVER)

    async def take(self, name: str, token: str, ttl_ms: int) -> int:
        """1: taken, 2: taken over from a dead process, 0: held by a living one."""
        args: list[str | int | float] = [token, ttl_ms, int(self.lease.seconds * 1000), LEASE_PREFIX]
        return int(cast(int, await self.script([name, self.lease.key], args)))


class _LeasedLock(Lock):
    lease: ProcessLease
    takers: LockTakers

    async def do_acquire(self, token: str | bytes) -> bool:
        token = token.decode() if isinstance(token, bytes) else token
        taken = await self.takers.take(cast(str, self.name), token, int((self.timeout or 0) * 1000))
        if taken == 2:
            log.warning("%s taken over from a process that is no longer alive", self.name)
        return bool(taken)


def _lock(redis: Redis, key: str, ttl: float, wait: float, lease: ProcessLease | None) -> tuple[Lock, str | None]:
    if lease is None:
        return redis.lock(key, timeout=ttl, blocking_timeout=wait), None
    lock = cast(_LeasedLock, redis.lock(key, timeout=ttl, blocking_timeout=wait, lock_class=_LeasedLock))
    lock.lease = lease
    lock.takers = lease.takers(redis)
    return lock, f"{lease.process}/{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def kept_alive_lock(
    redis: Redis, key: str, ttl: float = 10.0, wait: float = 120.0, lease: ProcessLease | None = None
) -> AsyncIterator[Lock]:
    lock, token = _lock(redis, key, ttl, wait, lease)
    if not await lock.acquire(token=token):
        raise LockError(f"{key} still held by another process after {wait:.0f}s")
    released = asyncio.Event()
    keeper = asyncio.create_task(_renew(lock, ttl, released), name=f"renew {key}")
    keeper.add_done_callback(_retrieve)
    try:
        yield lock
    finally:
        released.set()
        keeper.cancel()
        await asyncio.wait({keeper}, timeout=ttl / 3)
        try:
            await lock.release()
        except LockNotOwnedError:
            log.warning("%s was lost while held (Redis restarted, or it expired); the work under it is done", key)


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

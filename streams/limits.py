"""Back-pressure for the execution engine: a priority gate and per-user broker rate limits.

STOPLOSS outranks SELL/EXIT, which outrank BUY, for a free execution slot, for a user's broker rate budget,
and for the worker itself: a protective exit never waits behind queued entries, nor shares the event loop with
hundreds of them once admitted (`PriorityGate.yield_to_higher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from schemas.events import Action

PRIORITY = {Action.STOPLOSS: 0, Action.EXIT: 1, Action.SELL: 1, Action.PROTECT: 1, Action.BUY: 2}


class PriorityGate:
    """At most `limit` holders at once; waiters are admitted by (priority, arrival)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._holders: Counter[int] = Counter()  # priority -> slots held
        self._released = asyncio.Event()  # set, and replaced, whenever a slot is given back

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        self._holders[priority] += 1
        try:
            yield
        finally:
            self._holders[priority] -= 1
            self._released.set()
            self._released = asyncio.Event()
            self._release()

    async def yield_to_higher(self, priority: int, at_most: float) -> None:
        """Wait, for at most `at_most` seconds, while work of a higher priority holds a slot.

        Admission by priority is not enough once slots are plentiful: after a restart a few STOPLOSS intents
        were admitted next to a couple of hundred BUYs and SELLs read again, and each got a two-hundredth or
        so of the event loop (crash matrix: stop exits 5 to 7 s after the system was up). Lower-priority work
        steps aside at its checkpoints instead. Bounded, so a STOPLOSS stuck on a failing broker slows the
        rest down rather than stalling it. Only holders count: a STOPLOSS still waiting for a slot does not make
        the holders step aside, so they go on and free one.
        """
        deadline = asyncio.get_running_loop().time() + at_most
        while any(count for held, count in self._holders.items() if held < priority):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), remaining)

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # it was handed a slot just as it was cancelled
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


# A sliding-window log in one atomic step, shared by every worker: a user's grants of the last second are
# kept in a sorted set, and a grant is made only while it holds fewer than the limit. No one-second window
# ever holds more than `limit` orders, which is what the broker counts (a token bucket with a burst lets
# nearly twice the limit through in the first second).
_SLIDING_WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""

WINDOW_SECONDS = 1.0


class BrokerRateLimiter:
    """A user's orders stay under the broker's limit (Kite: 10/s per api_key) instead of drawing 429s."""

    def __init__(self, redis: Redis, per_second: float, key_prefix: str = "ratelimit:orders:") -> None:
        self.redis = redis
        self.limit = max(int(per_second), 1)
        self.key_prefix = key_prefix
        self._script = redis.register_script(_SLIDING_WINDOW)
        self._queues: dict[int, PriorityGate] = {}
        self._grants = itertools.count()
        self._instance = uuid.uuid4().hex  # grant ids stay unique across workers

    @asynccontextmanager
    async def permit(self, user_id: int, priority: int) -> AsyncIterator[None]:
        # One waiter per user asks Redis at a time, chosen by priority: a STOPLOSS goes to the front.
        gate = self._queues.setdefault(user_id, PriorityGate(1))
        async with gate.slot(priority):
            await self._take(user_id)
        yield

    async def _take(self, user_id: int) -> None:
        key = f"{self.key_prefix}{user_id}"
        while True:
            now = time.time()
            member = f"{now!r}:{self._instance}:{next(self._grants)}"
            wait = float(await self._script(keys=[key], args=[now, WINDOW_SECONDS, self.limit, member]))
            if wait <= 0:
                return
            await asyncio.sleep(wait)

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
            self._give_back(priority)

    @asynccontextmanager
    async def stepped_out(self, priority: int) -> AsyncIterator[None]:
        """Inside `slot(priority)`: give the slot back for the block and take one again after it.

        For work that waits on the clock rather than on anything the slots protect (a BUY handed over early holds
        its order until it is due): it must not keep a STOPLOSS, or the other BUYs of the same instant, out.
        """
        self._give_back(priority)
        try:
            yield
        finally:
            try:
                await self._acquire(priority)
            except BaseException:
                # Cancelled while queued: the enclosing slot() still gives one back on the way out. Owe it, so
                # the number of slots stays what it was.
                self._free -= 1
                raise
            finally:
                self._holders[priority] += 1

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

    def _give_back(self, priority: int) -> None:
        self._holders[priority] -= 1
        self._released.set()
        self._released = asyncio.Event()
        self._release()

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


# A sliding-window log in one atomic step, shared by every worker: a user's grants are kept in a sorted set by
# the instant they are for, and a grant is made only while fewer than the limit lie within a window of it on
# either side. No one-second window ever holds more than `limit` orders, which is what the broker counts (a token
# bucket with a burst lets nearly twice the limit through in the first second). A grant is usually for now; a
# BUY handed over early reserves one for its due instant (ARGV[5]), so at that instant it needs no round trip.
_SLIDING_WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local at = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local lower = string.format('(%.6f', at - window)
if redis.call('ZCOUNT', KEYS[1], lower, string.format('(%.6f', at + window)) < limit then
  redis.call('ZADD', KEYS[1], at, ARGV[4])
  -- Kept until its latest grant has left the window: a grant for now must not expire a reservation ahead.
  local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(latest[2]) - now + window) * 1000) + 1000)
  return '0'
end
local first = redis.call('ZRANGEBYSCORE', KEYS[1], lower, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return tostring(tonumber(first[2]) + window - at)
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

    async def reserve(self, user_id: int, at: float) -> bool:
        """Take a grant for the (unix) instant `at`, now, if the user's budget has room then; no waiting."""
        return await self._grant(user_id, max(at, time.time())) <= 0

    async def _take(self, user_id: int) -> None:
        while True:
            wait = await self._grant(user_id, time.time())
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _grant(self, user_id: int, at: float) -> float:
        """0 if granted for `at`, else how long until it may be worth asking again."""
        member = f"{at!r}:{self._instance}:{next(self._grants)}"
        args: list[str | float] = [time.time(), WINDOW_SECONDS, self.limit, member, at]
        return float(await self._script(keys=[f"{self.key_prefix}{user_id}"], args=args))

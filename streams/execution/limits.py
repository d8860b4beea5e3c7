"""Each user's broker rate limits (per second, minute and day), shared by every worker through Redis.

STOPLOSS outranks SELL/EXIT, which outrank BUY, for a user's rate budget: a protective exit takes the next slot
whatever entries are queued, and the last of the minute's and the day's budget is kept for exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from connectors.broker import ANSWERED_AT, SEND_AT
from streams.execution.priority import RESERVED_FROM, effective, waiting_in

EXCHANGE_TZ = ZoneInfo("Asia/Kolkata")


# A sliding-window log in one atomic step, shared by every worker: a user's grants are kept in a sorted set by
# the instant they are for, and grants are made only while fewer than the limit lie within a window of that instant
# on either side. No one-second window ever holds more than `limit` orders, which is what the broker counts (a
# token bucket with a burst lets nearly twice the limit through in the first second). Up to ARGV[4] grants in one
# call: every waiter of a user that fits is answered by one round trip. A grant is usually for now; a BUY handed
# over early reserves one for its due instant (ARGV[6]), so at that instant it needs no round trip.
#
# The same grants, counted over a minute on either side (ARGV[7], at most ARGV[8] in any such window), keep the
# broker's per-minute cap; a BUY's call gives a lower one, so exits always find room. KEYS[2] counts the user's
# grants of the trading day: a BUY's call gives a day cap (ARGV[9]; -1 for exits, which are never refused) and is
# answered -1 rather than a wait once the day has no room for it.
#
# Waiters the window has no room for now may be given grants for the instants it will (ARGV[10], how far ahead; 0:
# none): a second after a grant already dated by its call's answer, so each leaves the moment its slot frees rather
# than a sleeper's wake, a round trip and an event loop's turn later (in a burst, 25 to 100 ms a window, carried into
# every later window). A grant not yet answered may still move later (`_SENT`), so KEYS[3] holds those by the
# instant they were made for, and any such older than an instant's window is counted in it: wherever it lands, no
# window is overfilled. Those older than ARGV[11] seconds are taken for lost (a crashed caller).
_SLIDING_WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local wanted = tonumber(ARGV[4])
local at = tonumber(ARGV[6])
local minute = tonumber(ARGV[7])
local minute_limit = tonumber(ARGV[8])
local day_limit = tonumber(ARGV[9])
local ahead = tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - minute)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[11]))
local function bound(x, open)
  return string.format(open and '(%.6f' or '%.6f', x)
end
local lower = bound(at - window, true)
local room = limit - redis.call('ZCOUNT', KEYS[1], lower, bound(at + window, true))
local minute_lower = bound(at - minute, true)
local minute_room = minute_limit - redis.call('ZCOUNT', KEYS[1], minute_lower, bound(at + minute, true))
local granted = math.max(0, math.min(room, minute_room, wanted))
if day_limit >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= day_limit then
    return {0, '-1'}
  end
  granted = math.min(granted, day_limit - used)
end
local function take(instant, n)
  local member = ARGV[5] .. ':' .. n
  redis.call('ZADD', KEYS[1], instant, member)
  redis.call('ZADD', KEYS[3], instant, member)
end
for i = 1, granted do
  take(at, i)
end
local ahead_of = {}
if granted < wanted and ahead > 0 then
  local freed = redis.call('ZRANGEBYSCORE', KEYS[1], bound(at - window, true), bound(at + ahead - window), 'WITHSCORES')
  for i = 2, #freed, 2 do
    if granted + #ahead_of >= wanted then
      break
    end
    -- A little past the second: the window's bounds are written to the microsecond, and must not take it in.
    local instant = tonumber(freed[i]) + window + 0.00001
    if instant > at then
      local taken = redis.call('ZCOUNT', KEYS[1], bound(instant - window, true), bound(instant + window, true))
        + redis.call('ZCOUNT', KEYS[3], '-inf', bound(instant - window))
      local minute_taken = redis.call('ZCOUNT', KEYS[1], bound(instant - minute, true), bound(instant + minute, true))
      if taken < limit and minute_taken < minute_limit then
        take(instant, granted + #ahead_of + 1)
        ahead_of[#ahead_of + 1] = string.format('%.6f', instant)
      end
    end
  end
end
if granted + #ahead_of > 0 then
  -- Kept until its latest grant has left the minute: a grant for now must not expire a reservation ahead.
  local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local life = math.ceil((tonumber(latest[2]) - now + minute) * 1000) + 1000
  redis.call('PEXPIRE', KEYS[1], life)
  redis.call('PEXPIRE', KEYS[3], life)
  redis.call('INCRBY', KEYS[2], granted + #ahead_of)
  redis.call('EXPIRE', KEYS[2], 172800)
end
local wait = 0
if granted + #ahead_of < wanted then
  if room < wanted then
    local first = redis.call('ZRANGEBYSCORE', KEYS[1], lower, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    wait = math.max(wait, tonumber(first[2]) + window - at)
  end
  if minute_room < wanted then
    local first = redis.call('ZRANGEBYSCORE', KEYS[1], minute_lower, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    wait = math.max(wait, tonumber(first[2]) + minute - at)
  end
end
local answer = {granted, tostring(wait)}
for _, instant in ipairs(ahead_of) do
  answer[#answer + 1] = instant
end
return answer
"""

# The broker counts arrivals, and an order's call is answered after it arrived: a grant re-dated to its call's
# answer keeps the next grant a full window after this order reached the broker, whatever the call's transit took
# (grants dated when Redis was asked drew 429s when one call travelled slower than the next). Only ever later.
_SENT = """
redis.call('ZREM', KEYS[2], ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end
return 0
"""

WINDOW_SECONDS = 1.0
MINUTE_SECONDS = 60.0
# How far ahead a waiter may be given a grant for the instant a slot frees: a window and a little, as the slots of
# a window's calls free a second after their answers, which come back within milliseconds of the calls.
AHEAD_SECONDS = WINDOW_SECONDS + 0.25
# A grant not dated by its call's answer after this long is taken for lost (its caller crashed), no longer one
# that may still move later: the broker's timeout, and the margin of a call that waited for a thread.
LOST_AFTER_SECONDS = 10.0


class Grant(NamedTuple):
    member: str  # its name in the user's window
    send_at: float | None = None  # for a slot about to free: the instant (time.time()) the call may leave


@dataclass(eq=False)
class _Waiter:
    answer: asyncio.Future[Grant]
    lead: float  # `near` is set once the grant is expected within this many seconds
    near: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class DayBudgetExhausted(Exception):
    """A BUY that would leave the trader's day of orders without room for the exits: not sent."""


def _fail(waiters: list[tuple[int, int, _Waiter]], error: Exception) -> None:
    """Every waiter not answered yet gets `error` instead of a grant."""
    for _, _, waiter in waiters:
        if not waiter.answer.done():
            waiter.answer.set_exception(error)


def _exchange_day(unix: float) -> str:
    # The broker's trading day, on the broker's (real) clock like every other window here.
    return datetime.fromtimestamp(unix, EXCHANGE_TZ).strftime("%Y%m%d")


class BrokerRateLimiter:
    """A user's order calls (place, modify, cancel) stay under the broker's limits (Kite: 10 a second, 400 a
    minute, 5,000 a day per api_key) instead of drawing 429s.

    Waiters queue per user by priority (a STOPLOSS goes to the front); one drainer per user asks Redis for as
    many grants as there are waiters and hands out what it gets, then sleeps until the window has room again.
    Exits are asked for first and against the whole minute; BUYs leave `exit_reserve` of the minute and of the
    day to them, and a BUY the day has no room for is refused (`DayBudgetExhausted`), an exit never.
    """

    def __init__(
        self,
        redis: Redis,
        per_second: float,
        key_prefix: str = "ratelimit:orders:",
        *,
        per_minute: int = 400,
        per_day: int = 5000,
        exit_reserve: int = 50,
        hand_over_early: float = 0.0,
    ) -> None:
        self.redis = redis
        self.limit = max(int(per_second), 1)
        self.per_minute = max(per_minute, self.limit)
        self.per_day = per_day
        self.exit_reserve = exit_reserve
        self.key_prefix = key_prefix
        self._script = redis.register_script(_SLIDING_WINDOW)
        self._sent = redis.register_script(_SENT)
        self._waiters: dict[int, list[tuple[int, int, _Waiter]]] = {}
        self._drainers: dict[int, asyncio.Task[None]] = {}
        self._next_grant: dict[int, float] = {}  # user -> when its sleeping drainer expects to grant more (unix)
        # user -> set when a round now may give a waiter more than the last: a grant was dated by its call's answer
        # (its slot's instant is known), or a waiter joined.
        self._wake: dict[int, asyncio.Event] = {}
        # A grant for a coming instant is handed to its block this much before it: the block's broker call waits
        # out the rest in its thread (`SEND_AT`), sharp where the event loop is not. 0: the loop waits it all out,
        # for blocks whose calls do not read SEND_AT.
        self.hand_over_early = hand_over_early
        self._dating: set[asyncio.Future[None]] = set()  # unused grants being dated
        self._seq = itertools.count()
        self._grants = itertools.count()
        self._instance = uuid.uuid4().hex  # grant ids stay unique across workers

    @asynccontextmanager
    async def permit(
        self, user_id: int, priority: int, *, ready: Callable[[], Awaitable[None]] | None = None, lead: float = 0.0
    ) -> AsyncIterator[None]:
        """Wait for a grant, run the block (the broker call), then date the grant at the call's answer.

        `ready`, the work the call needs done first (its attempt row), runs while the grant is waited for, once it is
        expected within `lead` seconds: the call then leaves as the grant comes, not a commit later. In a burst a
        trader's second and later windows of exits each lost 50 to 130 ms to that commit, carried into every later
        window, as each is counted from the one before."""
        grant = await self._granted(user_id, priority, ready, lead)
        async with self.dated(user_id, grant.member, send_at=grant.send_at):
            yield

    @asynccontextmanager
    async def dated(self, user_id: int, grant: str, *, send_at: float | None = None) -> AsyncIterator[None]:
        """Run the block (the broker call) on a grant already made, from `send_at` on if it is for a coming instant,
        then date the grant at the call's answer (`ANSWERED_AT`), or at the block's end if it had none."""
        answered: list[float] = []
        token = ANSWERED_AT.set(answered)
        leaves = SEND_AT.set(send_at)
        try:
            if send_at is not None and (early := send_at - self.hand_over_early - time.time()) > 0:
                await asyncio.sleep(early)
            yield
        finally:
            SEND_AT.reset(leaves)
            ANSWERED_AT.reset(token)
            await self._date(user_id, grant, max(answered) if answered else time.time())

    async def _date(self, user_id: int, grant: str, at: float) -> None:
        """Date the grant at `at` if that is later, and count it answered: its slot's instant is known now."""
        keys = [self._key(user_id), self._unanswered_key(user_id)]
        with contextlib.suppress(Exception):  # the grant stays dated when made: still within the limit
            await self._sent(keys=keys, args=[grant, at, int(WINDOW_SECONDS * 1000) + 1000])
            if (wake := self._wake.get(user_id)) is not None:
                wake.set()

    async def reserve(self, user_id: int, at: float) -> str | None:
        """Take a BUY's grant for the (unix) instant `at`, now, if the user's budget has room then; no waiting.
        The grant, to be run with `dated` (a held BUY reaches the broker a little after its instant, and the
        next grants must count from then), or None."""
        granted, _, prefix, _ = await self._grant(user_id, 1, max(at, time.time()), buy=True)
        return f"{prefix}:1" if granted == 1 else None

    async def _granted(
        self, user_id: int, priority: int, ready: Callable[[], Awaitable[None]] | None, lead: float
    ) -> Grant:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), lead)
        priority, urgency = effective(priority, spends_budget=True)
        waiters = self._waiters.setdefault(user_id, [])
        heapq.heappush(waiters, (priority, next(self._seq), waiter))
        drainer = self._drainers.get(user_id)
        if drainer is None or drainer.done():
            self._drainers[user_id] = asyncio.create_task(self._drain(user_id))
        elif (wake := self._wake.get(user_id)) is not None:
            wake.set()
        # Near at once if the next grants are, and this one's among them: expected within `lead`, or, with no drainer
        # sleeping, when even a full window's wait is (the round under way may find the second spent).
        due = self._next_grant.get(user_id)
        soon = lead > WINDOW_SECONDS if due is None else due - time.time() <= lead
        if soon and sum(not w.answer.done() for _, _, w in waiters) <= self.limit:
            waiter.near.set_result(None)

        def requeue(raised: int) -> None:  # a second entry, further up; whichever is handed a grant first
            if not waiter.answer.done() and (queued := self._waiters.get(user_id)) is not None:
                heapq.heappush(queued, (raised, next(self._seq), waiter))

        try:
            with waiting_in(urgency, requeue):
                if ready is not None:
                    await asyncio.wait((waiter.near, waiter.answer), return_when=asyncio.FIRST_COMPLETED)
                    # A grant for a coming instant: the work waits until that instant is within `lead`.
                    if waiter.answer.done() and not waiter.answer.exception():
                        send_at = waiter.answer.result().send_at
                        if send_at is not None and (early := send_at - lead - time.time()) > 0:
                            await asyncio.sleep(early)
                    await ready()
                return await waiter.answer
        except BaseException:
            if waiter.answer.done() and not waiter.answer.cancelled() and not waiter.answer.exception():
                # Handed a grant it will not use: dated now, so that it stops counting as a call that may yet move.
                unused = asyncio.ensure_future(self._date(user_id, waiter.answer.result().member, time.time()))
                self._dating.add(unused)
                unused.add_done_callback(self._dating.discard)
            waiter.answer.cancel()  # not done yet: the drainer skips it
            raise

    async def _drain(self, user_id: int) -> None:
        waiters = self._waiters[user_id]
        wake = self._wake[user_id] = asyncio.Event()
        try:
            while waiters:
                # Distinct waiters: one moved up by an inherited priority has a second entry.
                waiting = {id(w): (p, w) for p, _, w in sorted(waiters) if not w.answer.done()}  # in the heap's order
                exits = sum(1 for p, _ in waiting.values() if p < RESERVED_FROM)
                wanted = exits or len(waiting)
                if wanted == 0:
                    break
                wake.clear()  # what happens from here on, this round may not see
                try:
                    granted, wait, prefix, ahead = await self._grant(user_id, wanted, time.time(), buy=not exits)
                except Exception as exc:
                    _fail(waiters, exc)
                    break
                if wait < 0:  # the day has no room for these BUYs (only BUYs are asked for without exits)
                    _fail(waiters, DayBudgetExhausted(
                        f"the day's order budget ({self.per_day}) keeps its last orders for exits"
                    ))  # fmt: skip
                    break
                grants = [Grant(f"{prefix}:{n}") for n in range(1, granted + 1)]
                grants += [Grant(f"{prefix}:{granted + n}", instant) for n, instant in enumerate(ahead, 1)]
                handed = 0
                while handed < len(grants) and waiters:
                    _, _, waiter = heapq.heappop(waiters)
                    if not waiter.answer.done():
                        waiter.answer.set_result(grants[handed])
                        handed += 1
                if any(not waiter.answer.done() for _, _, waiter in waiters):
                    # The next grants' first `limit` waiters may get ready for their calls now if those are soon
                    # enough: when the window has room again, or, past the slots just given ahead, a window after
                    # the first of them.
                    expected = max(wait, min(ahead) + WINDOW_SECONDS - time.time()) if ahead else wait
                    for _, waiter in list(waiting.values())[handed : handed + self.limit]:
                        if expected <= waiter.lead and not waiter.near.done():
                            waiter.near.set_result(None)
                    self._next_grant[user_id] = time.time() + expected
                    try:
                        await self._until_room(wait, wake if exits else None)
                    finally:
                        self._next_grant.pop(user_id, None)
        finally:
            if self._wake.get(user_id) is wake:
                del self._wake[user_id]
        waiters.clear()
        del self._waiters[user_id]

    @staticmethod
    async def _until_room(wait: float, wake: asyncio.Event | None) -> None:
        """Sleep `wait`, or less if `wake` is set first: exits waiting may then be given a slot for the instant it
        frees, which waiting for the window to have room now would give them only at that instant."""
        if wake is None:
            await asyncio.sleep(wait)
            return
        sleeping = asyncio.ensure_future(asyncio.sleep(wait))
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()

    async def _grant(
        self, user_id: int, wanted: int, at: float, *, buy: bool = False
    ) -> tuple[int, float, str, list[float]]:
        """How many of `wanted` grants were made for `at`, how long until more may be worth asking for (-1: a
        BUY the day has no room for), the prefix of their members, and the instants of the grants made beyond them
        for slots about to free (exits only)."""
        prefix = f"{at!r}:{self._instance}:{next(self._grants)}"
        minute_limit = self.per_minute - self.exit_reserve if buy else self.per_minute
        day_limit = max(self.per_day - self.exit_reserve, 0) if buy else -1  # -1: no day cap (an exit)
        args: list[str | float | int] = [
            time.time(), WINDOW_SECONDS, self.limit, wanted, prefix, at, MINUTE_SECONDS, max(minute_limit, 1),
            day_limit, 0 if buy else AHEAD_SECONDS, LOST_AFTER_SECONDS,
        ]  # fmt: skip
        day_key = f"{self.key_prefix}day:{user_id}:{_exchange_day(at)}"
        keys = [self._key(user_id), day_key, self._unanswered_key(user_id)]
        granted, wait, *ahead = await self._script(keys=keys, args=args)
        return int(granted), float(wait), prefix, [float(instant) for instant in ahead]

    def _key(self, user_id: int) -> str:
        return f"{self.key_prefix}{user_id}"

    def _unanswered_key(self, user_id: int) -> str:
        return f"{self.key_prefix}unanswered:{user_id}"

"""Admission by priority: the worker's execution slots (`PriorityGate`) and each user's turns for the work before a
broker call (`UserPace`).

STOPLOSS outranks SELL/EXIT, which outrank BUY, for a free execution slot and for the worker itself: a protective
exit never waits behind queued entries, nor shares the event loop with hundreds of them once admitted
(`PriorityGate.yield_to_higher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from streams.execution.priority import effective, waiting_in


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

    async def hold(self, priority: int) -> Callable[[], None]:
        """A slot held until the returned callable is called (the first call gives it back, later ones do
        nothing): for work whose end is not the end of a block."""
        await self._acquire(priority)
        self._holders[priority] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._give_back(priority)

        return release

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
        priority = effective(priority)[0]  # work an urgent exit of its strategy waits behind does not step aside
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
        priority, urgency = effective(priority)
        heapq.heappush(self._waiters, (priority, next(self._seq), future))

        def requeue(raised: int) -> None:  # a second entry, further up; whichever is reached first admits it
            heapq.heappush(self._waiters, (raised, next(self._seq), future))

        try:
            with waiting_in(urgency, requeue):
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


class UserPace:
    """At most `per_user` of one user's orders in the work before their broker call at once, by priority.

    The broker takes a trader's orders at its rate (Kite: 10 a second), so an order that cannot leave for a second
    or two gains nothing by doing its checks and writes now, while the orders that can leave compete with it for
    the worker's one event loop: in a burst of 300 exits of 10 traders, the 200 that had to wait made the first
    100 reach the broker 0.6 to 1 s after the crossing. A user's turns are taken by priority (a STOPLOSS first)
    and each is given back once its broker call is made: the broker's rate counts arrivals, and a call in flight
    has done its work here."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._gates: dict[int, PriorityGate] = {}

    async def turn(self, user_id: int, priority: int) -> Callable[[], None]:
        gate = self._gates.get(user_id)
        if gate is None:
            gate = self._gates[user_id] = PriorityGate(self.per_user)
        return await gate.hold(priority)

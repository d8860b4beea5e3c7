"""FreshSharedRead: the order-book reads that concurrent lookups by tag and status reads share.

The read is a stand-in for `KiteConnect.orders` that counts and numbers its calls: the rule under test is about
when a read begins relative to who asked, which a real broker call cannot be made to show (the gateway's reads
through the official client are in test_orders.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from connectors.broker import BrokerUnavailable
from connectors.shared_read import FreshSharedRead


class NumberedReads:
    """Each read returns its own number, and waits until the test lets it finish."""

    def __init__(self) -> None:
        self.began = 0
        self.on_the_wire = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self) -> int:
        self.began += 1
        number = self.began
        self.on_the_wire.set()
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise BrokerUnavailable("Too many requests")
        return number


async def test_callers_during_a_read_share_the_next_read_never_the_one_in_flight() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    first = asyncio.create_task(book())
    await reads.on_the_wire.wait()
    later = [asyncio.create_task(book()) for _ in range(5)]  # asked after read 1 began
    await asyncio.wait(later, timeout=0.05)
    assert reads.began == 1  # they wait for read 1 to end rather than start reads of their own
    reads.release.set()
    assert await first == 1
    # Read 1 began before they asked, so it may miss an order they need to see: they get read 2.
    assert await asyncio.gather(*later) == [2] * 5
    assert reads.began == 2
    assert await book() == 3  # and a caller after everything is over gets a read of its own


async def test_a_failed_read_fails_its_callers_and_the_next_call_reads_again() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    reads.fail_next = True
    callers = [asyncio.create_task(book()) for _ in range(3)]
    reads.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes)
    assert reads.began == 1
    assert await book() == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_read_of_the_others() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    quitter, stayer = asyncio.create_task(book()), asyncio.create_task(book())
    await reads.on_the_wire.wait()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    reads.release.set()
    assert await stayer == 1


async def test_reads_begin_at_least_the_spacing_apart_and_callers_meanwhile_join_the_next() -> None:
    loop = asyncio.get_running_loop()
    began: list[float] = []

    async def read() -> int:
        began.append(loop.time())
        return len(began)

    book = FreshSharedRead(read, spacing=0.05)
    assert await book() == 1
    assert await asyncio.gather(book(), book(), book()) == [2, 2, 2]  # asked within the spacing: one read
    assert await book() == 3
    assert [round(b - a, 3) >= 0.05 for a, b in zip(began, began[1:], strict=False)] == [True, True]


class HeldReads:
    """Each read returns its own number; the reads listed in `held` stay on the wire until `release` (and then
    fail if listed in `failing`). `began[n]` and `ended[n]` are set as read n begins and ends."""

    def __init__(self, held: set[int], failing: frozenset[int] = frozenset()) -> None:
        self.count = 0
        self.held = held
        self.failing = failing
        self.release = asyncio.Event()
        self.began: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.ended: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self) -> int:
        self.count += 1
        number = self.count
        self.began[number].set()
        try:
            if number in self.held:
                await self.release.wait()
                if number in self.failing:
                    raise BrokerUnavailable("Read timed out")
            return number
        finally:
            self.ended[number].set()


async def test_a_read_held_past_the_hedge_time_has_its_callers_answered_by_the_next_read_beside_it() -> None:
    reads = HeldReads(held={1})
    book = FreshSharedRead(reads, hedge_after=0.05)
    first = asyncio.create_task(book())
    await reads.began[1].wait()
    later = asyncio.create_task(book())  # asked while read 1 was on the wire: read 1 is not fresh enough for it
    # Read 2 begins beside the held read 1 and answers both: it began after each of them asked.
    assert await asyncio.wait_for(asyncio.gather(first, later), 1) == [2, 2]
    assert reads.count == 2
    reads.release.set()
    await reads.ended[1].wait()
    assert await book() == 3  # read 1's late answer changed nothing


async def test_a_held_read_that_fails_fails_no_caller_another_read_on_the_wire_can_answer() -> None:
    reads = HeldReads(held={1, 2}, failing=frozenset({1}))
    book = FreshSharedRead(reads, hedge_after=0.05)
    caller = asyncio.create_task(book())
    await asyncio.wait_for(reads.began[2].wait(), 1)  # read 2 began beside the held read 1
    reads.release.set()  # read 1 fails, read 2 answers
    assert await asyncio.wait_for(caller, 1) == 2


async def test_without_a_hedge_time_a_held_read_is_waited_for() -> None:
    reads = HeldReads(held={1})
    book = FreshSharedRead(reads)
    first = asyncio.create_task(book())
    done, _ = await asyncio.wait([first], timeout=0.1)
    assert not done and reads.count == 1
    reads.release.set()
    assert await first == 1

"""Coalesced: requests made while a batch is on the wire go out together in the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from core.coalesce import Coalesced


class Wire:
    """A send that records its batches and holds each one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.sent = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, batch: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(batch)
        self.sent.set()
        await self.release.wait()
        return [ValueError(f"odd {n}") if n % 2 else n * 10 for n in batch]


async def test_requests_made_while_a_batch_is_sent_share_the_next_one_and_each_gets_its_own_answer() -> None:
    wire = Wire()
    coalesced: Coalesced[int, int] = Coalesced(wire)
    first = asyncio.create_task(coalesced(2))
    await asyncio.wait_for(wire.sent.wait(), 1)  # a lone request goes at once
    later = [asyncio.create_task(coalesced(n)) for n in (4, 5, 6)]
    await asyncio.sleep(0)
    assert wire.batches == [[2]]
    wire.release.set()
    assert await asyncio.wait_for(first, 1) == 20
    assert await asyncio.wait_for(later[0], 1) == 40
    with pytest.raises(ValueError, match="odd 5"):  # one item's failure reaches only its caller
        await later[1]
    assert await later[2] == 60
    assert wire.batches == [[2], [4, 5, 6]]
    assert coalesced.batches == 2


async def test_a_batch_that_fails_as_a_whole_fails_every_caller_in_it() -> None:
    async def down(batch: list[int]) -> Sequence[int | BaseException]:
        raise ConnectionError("down")

    coalesced: Coalesced[int, int] = Coalesced(down)
    calls = [asyncio.create_task(coalesced(n)) for n in range(3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(o) for o in outcomes] == [ConnectionError] * 3


async def test_a_caller_that_gives_up_does_not_cancel_the_batch_it_shares() -> None:
    wire = Wire()
    coalesced: Coalesced[int, int] = Coalesced(wire)
    blocker = asyncio.create_task(coalesced(0))
    await asyncio.wait_for(wire.sent.wait(), 1)
    impatient = asyncio.create_task(coalesced(8))
    patient = asyncio.create_task(coalesced(10))
    await asyncio.sleep(0)
    impatient.cancel()
    wire.release.set()
    assert await asyncio.wait_for(patient, 1) == 100
    assert await blocker == 0
    assert impatient.cancelled()
    assert wire.batches == [[0], [8, 10]]  # the cancelled caller's item still went out with its batch

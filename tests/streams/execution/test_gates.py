"""PriorityGate: slots by priority, then arrival; lower priorities step aside for higher ones."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import pytest

from schemas.events import Action
from streams.execution.gates import PriorityGate
from streams.execution.priority import PRIORITY


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks (the gate involves no I/O, so a few loop turns suffice)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Holder:
    """A task that takes a slot, records it, and keeps it until told to let go."""

    def __init__(self, gate: PriorityGate, name: str, priority: int, admitted: list[str], live: list[int]) -> None:
        self.name = name
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self._gate, self._priority, self._admitted, self._live = gate, priority, admitted, live
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self._gate.slot(self._priority):
            self._admitted.append(self.name)
            self._live[0] += 1
            self._live[1] = max(self._live[1], self._live[0])
            self.entered.set()
            await self.release.wait()
            self._live[0] -= 1


async def finish(*holders: Holder) -> None:
    for holder in holders:
        holder.release.set()
    await asyncio.wait_for(asyncio.gather(*(h.task for h in holders)), 5)


# ------------------------------------------------------------------------------------------ PriorityGate


async def test_gate_never_admits_more_than_its_limit() -> None:
    gate = PriorityGate(3)
    admitted: list[str] = []
    live = [0, 0]  # current, peak
    holders = [Holder(gate, f"h{i}", 2, admitted, live) for i in range(10)]
    await settle()
    assert len(admitted) == 3
    # Let them go one at a time: each release admits exactly one more.
    for i, holder in enumerate(holders):
        holder.release.set()
        await asyncio.wait_for(holder.task, 5)
        await settle()
        assert len(admitted) == min(3 + i + 1, 10)
        assert live[0] <= 3
    assert live[1] == 3
    assert admitted == [f"h{i}" for i in range(10)]  # same priority: first come, first served


async def test_waiters_are_admitted_by_priority_then_arrival() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    live = [0, 0]
    first = Holder(gate, "first", PRIORITY[Action.BUY], admitted, live)
    await settle()
    waiters = []
    for name, action in [
        ("buy-a", Action.BUY),
        ("buy-b", Action.BUY),
        ("sl-a", Action.STOPLOSS),
        ("sell-a", Action.SELL),
        ("sl-b", Action.STOPLOSS),
        ("exit-a", Action.EXIT),
    ]:
        waiters.append(Holder(gate, name, PRIORITY[action], admitted, live))
        await settle()  # arrival order is creation order
    assert admitted == ["first"]

    by_name = {h.name: h for h in [first, *waiters]}
    expected = ["first", "sl-a", "sl-b", "sell-a", "exit-a", "buy-a", "buy-b"]
    for current, following in zip(expected, expected[1:], strict=False):
        by_name[current].release.set()
        await asyncio.wait_for(by_name[following].entered.wait(), 5)
    await finish(*by_name.values())
    assert admitted == expected
    assert live[1] == 1


async def test_a_free_slot_is_taken_without_waiting() -> None:
    gate = PriorityGate(2)
    async with gate.slot(2), gate.slot(2):
        pass  # neither blocks: no task, no timeout needed
    async with gate.slot(0), gate.slot(0):
        pass


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    live = [0, 0]
    holder = Holder(gate, "holder", 2, admitted, live)
    await settle()
    cancelled = Holder(gate, "cancelled", 0, admitted, live)
    behind = Holder(gate, "behind", 2, admitted, live)
    await settle()
    cancelled.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled.task

    holder.release.set()
    await asyncio.wait_for(behind.entered.wait(), 5)  # the slot went past the cancelled waiter
    late = Holder(gate, "late", 0, admitted, live)
    await settle()
    assert not late.entered.is_set()  # and it was not duplicated: the limit is still one
    await finish(behind, late)
    assert admitted == ["holder", "behind", "late"]
    await assert_gate_capacity(gate, 1)


async def test_a_waiter_cancelled_just_as_it_is_handed_the_slot_gives_it_back() -> None:
    gate = PriorityGate(1)
    slot: AbstractAsyncContextManager[None] = gate.slot(2)
    await slot.__aenter__()
    entered = asyncio.Event()

    async def waiter() -> None:
        async with gate.slot(0):
            entered.set()

    task = asyncio.create_task(waiter())
    await settle()
    # Hand the slot over and cancel the receiver in the same loop turn, before it can run.
    await slot.__aexit__(None, None, None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not entered.is_set()
    await assert_gate_capacity(gate, 1)


async def test_a_waiter_cancelled_with_others_queued_passes_the_slot_on() -> None:
    gate = PriorityGate(1)
    slot: AbstractAsyncContextManager[None] = gate.slot(2)
    await slot.__aenter__()
    admitted: list[str] = []
    live = [0, 0]
    doomed_entered = asyncio.Event()

    async def doomed() -> None:
        async with gate.slot(0):
            doomed_entered.set()

    task = asyncio.create_task(doomed())
    await settle()
    next_in_line = Holder(gate, "next", 2, admitted, live)
    await settle()
    await slot.__aexit__(None, None, None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(next_in_line.entered.wait(), 5)
    await finish(next_in_line)
    assert not doomed_entered.is_set()
    await assert_gate_capacity(gate, 1)


async def running_stoploss(gate: PriorityGate) -> Holder:
    """A STOPLOSS that holds a slot until released."""
    holder = Holder(gate, "stoploss", PRIORITY[Action.STOPLOSS], [], [0, 0])
    await holder.entered.wait()
    return holder


async def test_lower_priority_work_steps_aside_while_a_higher_priority_one_holds_a_slot() -> None:
    gate = PriorityGate(10)
    stoploss = await running_stoploss(gate)
    async with gate.slot(PRIORITY[Action.BUY]):
        stepped_aside = asyncio.create_task(gate.yield_to_higher(PRIORITY[Action.BUY], at_most=30))
        await settle()
        assert not stepped_aside.done()  # the STOPLOSS still runs
        # Equal or lower priority is not waited for: a STOPLOSS never waits for another, nor for a BUY.
        await asyncio.wait_for(gate.yield_to_higher(PRIORITY[Action.STOPLOSS], at_most=30), 1)
        stoploss.release.set()
        await asyncio.wait_for(stepped_aside, 5)  # resumes as soon as the STOPLOSS gives its slot back
    await finish(stoploss)


async def test_stepping_aside_is_bounded_when_the_higher_priority_work_does_not_finish() -> None:
    gate = PriorityGate(10)
    stoploss = await running_stoploss(gate)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(gate.yield_to_higher(PRIORITY[Action.BUY], at_most=0.2), 5)
    assert loop.time() - began >= 0.2
    assert not stoploss.task.done()
    await finish(stoploss)


async def test_a_waiter_for_a_slot_does_not_make_holders_step_aside() -> None:
    # Holders stepping aside for a STOPLOSS that waits for one of their slots would never give it one.
    gate = PriorityGate(1)
    admitted: list[str] = []
    live = [0, 0]
    buy = Holder(gate, "buy", PRIORITY[Action.BUY], admitted, live)
    await buy.entered.wait()
    stoploss = Holder(gate, "stoploss", PRIORITY[Action.STOPLOSS], admitted, live)
    await settle()
    await asyncio.wait_for(gate.yield_to_higher(PRIORITY[Action.BUY], at_most=30), 1)
    buy.release.set()
    await asyncio.wait_for(stoploss.entered.wait(), 5)
    await finish(buy, stoploss)
    assert admitted == ["buy", "stoploss"]


async def test_a_holder_stepped_out_lets_another_in_and_queues_to_come_back() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    live = [0, 0]
    back = asyncio.Event()
    leave = asyncio.Event()

    async def waits_on_the_clock() -> None:
        async with gate.slot(PRIORITY[Action.BUY]):
            async with gate.stepped_out(PRIORITY[Action.BUY]):
                await leave.wait()
            back.set()

    buy = asyncio.create_task(waits_on_the_clock())
    await settle()
    stoploss = Holder(gate, "stoploss", PRIORITY[Action.STOPLOSS], admitted, live)
    await asyncio.wait_for(stoploss.entered.wait(), 1)  # the one slot was free while the BUY waited
    leave.set()
    await settle()
    assert not back.is_set()  # coming back takes a slot: it waits for the STOPLOSS
    await finish(stoploss)
    await asyncio.wait_for(buy, 5)
    await assert_gate_capacity(gate, 1)


async def test_a_holder_cancelled_while_queued_to_come_back_does_not_change_the_capacity() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    live = [0, 0]
    stepped_out = asyncio.Event()
    leave = asyncio.Event()

    async def waits_on_the_clock() -> None:
        async with gate.slot(PRIORITY[Action.BUY]), gate.stepped_out(PRIORITY[Action.BUY]):
            stepped_out.set()
            await leave.wait()

    other = Holder(gate, "other", PRIORITY[Action.SELL], admitted, live)
    await other.entered.wait()
    buy = asyncio.create_task(waits_on_the_clock())
    await settle()
    assert not stepped_out.is_set()  # still waiting for its first slot
    other.release.set()
    await asyncio.wait_for(stepped_out.wait(), 1)
    blocker = Holder(gate, "blocker", PRIORITY[Action.SELL], admitted, live)
    await asyncio.wait_for(blocker.entered.wait(), 1)  # took the slot the BUY gave back
    leave.set()
    await settle()
    assert not buy.done()  # queued to come back
    buy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await buy
    await finish(blocker)
    await assert_gate_capacity(gate, 1)


async def assert_gate_capacity(gate: PriorityGate, limit: int) -> None:
    """Exactly `limit` holders get in at once, no more and no fewer."""
    admitted: list[str] = []
    live = [0, 0]
    holders = [Holder(gate, f"probe{i}", 1, admitted, live) for i in range(limit + 1)]
    await settle()
    assert len(admitted) == limit, f"gate admits {len(admitted)} at once, expected {limit}"
    await finish(*holders)
    assert live[1] == limit

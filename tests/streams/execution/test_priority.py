"""Priority inheritance: a strategy's running exit works at the priority of the most urgent exit queued behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest_asyncio
from redis.asyncio import Redis

from connectors.broker import SEND_AT
from schemas.events import Action, OrderIntent
from streams.execution import Executor
from streams.execution.gates import PriorityGate
from streams.execution.lanes import StrategyLanes
from streams.execution.limits import BrokerRateLimiter
from streams.execution.priority import PRIORITY, Urgency, chase_priority, effective, inherited
from tests.streams.execution.test_lanes import Acks, FakeExecutor, intent, settle, started
from tests.streams.execution.test_limits import VirtualTime, take, virtual  # noqa: F401 (a fixture)


async def test_a_chase_step_waits_behind_placements_of_its_class_and_ahead_of_the_next() -> None:
    assert PRIORITY[Action.STOPLOSS] < chase_priority(Action.STOPLOSS) < PRIORITY[Action.SELL]
    assert PRIORITY[Action.SELL] < chase_priority(Action.SELL) < PRIORITY[Action.BUY]


async def test_a_buy_inherits_for_a_slot_never_for_the_broker_budget() -> None:
    urgency = Urgency(PRIORITY[Action.STOPLOSS])
    with inherited(urgency):
        assert effective(PRIORITY[Action.BUY]) == (PRIORITY[Action.STOPLOSS], urgency)
        assert effective(PRIORITY[Action.BUY], spends_budget=True) == (PRIORITY[Action.BUY], None)
        assert effective(PRIORITY[Action.SELL], spends_budget=True) == (PRIORITY[Action.STOPLOSS], urgency)
    assert effective(PRIORITY[Action.SELL]) == (PRIORITY[Action.SELL], None)


async def waiter(
    gate: PriorityGate, name: str, priority: int, admitted: list[str], urgency: Urgency | None = None
) -> None:
    with inherited(urgency):
        async with gate.slot(priority):
            admitted.append(name)


async def test_a_waiting_exit_moved_up_by_its_urgency_is_admitted_ahead() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    hold = await gate.hold(PRIORITY[Action.BUY])
    urgency = Urgency(PRIORITY[Action.SELL])
    tasks = [asyncio.create_task(waiter(gate, "sell", PRIORITY[Action.SELL], admitted, urgency))]
    await settle()
    tasks.append(asyncio.create_task(waiter(gate, "chase", chase_priority(Action.STOPLOSS), admitted)))
    await settle()
    urgency.raise_to(PRIORITY[Action.STOPLOSS])  # a STOPLOSS of the same strategy queued behind the SELL
    tasks.append(asyncio.create_task(waiter(gate, "later-stoploss", PRIORITY[Action.STOPLOSS], admitted)))
    await settle()
    hold()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # Raised, the SELL goes before the chase step; a STOPLOSS that came after the raise still waits its turn.
    assert admitted == ["sell", "later-stoploss", "chase"]
    # Each admitted once: the SELL's first entry, further down, was passed over.
    await asyncio.wait_for(waiter(gate, "free", PRIORITY[Action.BUY], admitted), 1)


async def test_the_rate_limiter_hands_a_raised_exit_the_next_grant_and_counts_it_once(
    redis: Redis,
    virtual: VirtualTime,  # noqa: F811 (the fixture)
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    for _ in range(10):
        await take(limiter, user_id=5)  # the second is spent: every further permit waits for the window
        virtual.now += 0.01  # each slot frees at an instant of its own
    leaves: list[tuple[float, str]] = []  # when each call may leave: the virtual clock does not order the blocks
    urgency = Urgency(PRIORITY[Action.SELL])

    async def ask(name: str, priority: int, raised: Urgency | None = None) -> None:
        with inherited(raised):
            async with limiter.permit(5, priority):
                leaves.append((SEND_AT.get() or virtual.now, name))
                await asyncio.sleep(0)

    tasks = [
        asyncio.create_task(ask("exit", PRIORITY[Action.EXIT])),
        asyncio.create_task(ask("sell", PRIORITY[Action.SELL], urgency)),
        asyncio.create_task(ask("chase", chase_priority(Action.STOPLOSS))),
    ]
    await asyncio.sleep(0)  # all queued before the window reopens
    urgency.raise_to(PRIORITY[Action.STOPLOSS])
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [name for _, name in sorted(leaves)] == ["sell", "chase", "exit"]
    # Three permits took three grants: the raised SELL's second entry was not asked for again.
    assert await redis.zcard(f"{limiter.key_prefix}5") == 13


class UrgencySeen(FakeExecutor):
    """Also records, for each intent, the priority its waits would take at the end of its execution."""

    def __init__(self) -> None:
        super().__init__()
        self.priority: dict[str, int] = {}

    async def execute(self, order: OrderIntent) -> None:
        await super().execute(order)
        self.priority[order.intent_id] = effective(PRIORITY[order.action])[0]


@pytest_asyncio.fixture
async def seen() -> AsyncIterator[tuple[UrgencySeen, StrategyLanes]]:
    executor = UrgencySeen()
    lanes = StrategyLanes(cast(Executor, executor), 4)
    yield executor, lanes
    await lanes.close()


async def test_a_running_sell_inherits_the_priority_of_its_strategys_stoploss(
    seen: tuple[UrgencySeen, StrategyLanes],
) -> None:
    executor, lanes = seen
    acks = Acks(executor.log)
    sell, other_stop = intent(1, Action.SELL), intent(2, Action.STOPLOSS)
    stoploss = intent(1, Action.STOPLOSS)
    await lanes.submit(sell, acks(sell))
    await started(executor, sell)
    await lanes.submit(other_stop, acks(other_stop))  # another strategy's stop: nothing to inherit
    executor.release[other_stop.intent_id].set()
    await acks.wait(other_stop)
    await lanes.submit(stoploss, acks(stoploss))
    executor.release[sell.intent_id].set()
    executor.release[stoploss.intent_id].set()
    await acks.wait(sell, stoploss)
    assert executor.priority[sell.intent_id] == PRIORITY[Action.STOPLOSS]
    assert executor.priority[stoploss.intent_id] == PRIORITY[Action.STOPLOSS]


async def test_an_exit_starts_at_the_priority_of_a_stoploss_queued_behind_it(
    seen: tuple[UrgencySeen, StrategyLanes],
) -> None:
    executor, lanes = seen
    acks = Acks(executor.log)
    buy, sell, stoploss = intent(1, Action.BUY), intent(1, Action.SELL), intent(1, Action.STOPLOSS)
    for order in (buy, sell, stoploss):
        await lanes.submit(order, acks(order))
    await started(executor, buy)
    for order in (buy, sell, stoploss):
        executor.release[order.intent_id].set()
    await acks.wait(buy, sell, stoploss)
    assert executor.priority[buy.intent_id] == PRIORITY[Action.STOPLOSS]  # for its slot: not its budget
    assert executor.priority[sell.intent_id] == PRIORITY[Action.STOPLOSS]
    await settle()

"""StrategyLanes: one strategy's intents strictly in order, strategies concurrently, STOPLOSS first."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any, cast

import pytest
import pytest_asyncio

from schemas.events import Action, OrderIntent, Trigger, intent_id_for
from streams.execution import Executor
from streams.execution import lanes as lanes_module
from streams.execution.lanes import StrategyLanes

DAY = date(2025, 1, 15)
NOW = datetime(2025, 1, 15, 4, 0, tzinfo=UTC)


def intent(strategy_id: int, action: Action, run: int = 1) -> OrderIntent:
    return OrderIntent(
        intent_id=intent_id_for(strategy_id, DAY, run, action),
        strategy_id=strategy_id,
        user_id=1,
        run=run,
        action=action,
        trigger=Trigger.PRICE if action is Action.STOPLOSS else Trigger.SCHEDULE,
        trading_day=DAY,
        instrument="NSE:INFY",
        quantity=1,
        due_at=NOW,
        created_at=NOW,
    )


class FakeExecutor:
    """Records start/end of each intent; each intent finishes only when its event is set by the test."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.failures: dict[str, int] = {}
        self.running = 0
        self.peak = 0

    async def execute(self, order: OrderIntent) -> None:
        key = order.intent_id
        self.log.append(("start", key))
        self.started[key].set()
        if self.failures.get(key, 0) > 0:
            self.failures[key] -= 1
            raise RuntimeError(f"database down while executing {key}")
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release[key].wait()
        finally:
            self.running -= 1
        self.log.append(("end", key))

    def starts(self) -> list[str]:
        return [key for what, key in self.log if what == "start"]


class Acks:
    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log
        self.done: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def __call__(self, order: OrderIntent) -> Callable[[], None]:
        def ack() -> None:
            self.log.append(("done", order.intent_id))
            self.done[order.intent_id].set()

        return ack

    async def wait(self, *orders: OrderIntent) -> None:
        await asyncio.wait_for(asyncio.gather(*(self.done[o.intent_id].wait() for o in orders)), 5)


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor()


@pytest_asyncio.fixture
async def make_lanes(executor: FakeExecutor) -> AsyncIterator[Callable[[int], StrategyLanes]]:
    made: list[StrategyLanes] = []

    def make(concurrency: int) -> StrategyLanes:
        lanes = StrategyLanes(cast(Executor, executor), concurrency)
        made.append(lanes)
        return lanes

    yield make
    for lanes in made:
        await lanes.close()


async def started(executor: FakeExecutor, *orders: OrderIntent) -> None:
    await asyncio.wait_for(asyncio.gather(*(executor.started[o.intent_id].wait() for o in orders)), 5)


async def test_one_strategys_intents_run_strictly_in_order(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes]
) -> None:
    lanes = make_lanes(10)
    acks = Acks(executor.log)
    buy, stoploss, sell = intent(1, Action.BUY), intent(1, Action.STOPLOSS), intent(1, Action.SELL)
    for order in (buy, stoploss, sell):
        await lanes.submit(order, acks(order))
    await started(executor, buy)
    # Let the later ones go first: they still must not start before the BUY has finished.
    executor.release[sell.intent_id].set()
    executor.release[stoploss.intent_id].set()
    await settle()
    assert executor.starts() == [buy.intent_id]
    executor.release[buy.intent_id].set()
    await acks.wait(buy, stoploss, sell)
    assert executor.log == [
        ("start", buy.intent_id),
        ("end", buy.intent_id),
        ("done", buy.intent_id),
        ("start", stoploss.intent_id),
        ("end", stoploss.intent_id),
        ("done", stoploss.intent_id),
        ("start", sell.intent_id),
        ("end", sell.intent_id),
        ("done", sell.intent_id),
    ]
    assert executor.peak == 1


async def test_different_strategies_run_concurrently(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes]
) -> None:
    lanes = make_lanes(10)
    acks = Acks(executor.log)
    orders = [intent(sid, Action.BUY) for sid in range(1, 6)]
    for order in orders:
        await lanes.submit(order, acks(order))
    await started(executor, *orders)  # all five in flight at once: none waits for another
    assert executor.running == 5
    # The last one can finish first.
    executor.release[orders[-1].intent_id].set()
    await acks.wait(orders[-1])
    assert executor.running == 4
    for order in orders:
        executor.release[order.intent_id].set()
    await acks.wait(*orders)


async def test_concurrency_limit_holds_and_stoploss_is_admitted_first(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes]
) -> None:
    lanes = make_lanes(2)
    acks = Acks(executor.log)
    busy = [intent(1, Action.BUY), intent(2, Action.BUY)]
    queued = [intent(3, Action.BUY), intent(4, Action.SELL), intent(5, Action.STOPLOSS), intent(6, Action.BUY)]
    for order in busy:
        await lanes.submit(order, acks(order))
    await started(executor, *busy)
    for order in queued:
        await lanes.submit(order, acks(order))
        await settle()  # each lane reaches the gate before the next is submitted
    assert executor.starts() == [o.intent_id for o in busy]

    executor.release[busy[0].intent_id].set()
    await started(executor, queued[2])
    assert executor.starts()[2] == queued[2].intent_id  # the STOPLOSS took the freed slot
    executor.release[busy[1].intent_id].set()
    await started(executor, queued[1])
    assert executor.starts()[3] == queued[1].intent_id  # then the SELL
    for order in queued:
        executor.release[order.intent_id].set()
    await acks.wait(*busy, *queued)
    assert executor.starts()[4:] == [queued[0].intent_id, queued[3].intent_id]  # BUYs last, in arrival order
    assert executor.peak == 2


async def test_a_failed_execution_is_retried_and_acknowledged_only_after_success(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes], monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = make_lanes(4)
    acks = Acks(executor.log)
    first, second = intent(1, Action.BUY), intent(1, Action.SELL)
    other = intent(2, Action.BUY)
    executor.failures[first.intent_id] = 2
    retried = asyncio.Event()
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fast_sleep(seconds: float, *args: Any) -> Any:
        # Only the lane's retry back-off goes through here; it is recorded and skipped.
        delays.append(seconds)
        retried.set()
        return await real_sleep(0)

    monkeypatch.setattr(lanes_module, "asyncio", _AsyncioWith(sleep=fast_sleep))
    for order in (first, second, other):
        await lanes.submit(order, acks(order))
    executor.release[other.intent_id].set()
    await acks.wait(other)  # a failing strategy holds up no one else
    await asyncio.wait_for(retried.wait(), 5)
    assert ("done", first.intent_id) not in executor.log

    executor.release[first.intent_id].set()
    executor.release[second.intent_id].set()
    await acks.wait(first, second)
    mine = [entry for entry in executor.log if entry[1] in (first.intent_id, second.intent_id)]
    assert mine == [
        ("start", first.intent_id),  # raises
        ("start", first.intent_id),  # raises
        ("start", first.intent_id),
        ("end", first.intent_id),
        ("done", first.intent_id),
        ("start", second.intent_id),
        ("end", second.intent_id),
        ("done", second.intent_id),
    ]
    assert executor.log.count(("done", first.intent_id)) == 1
    assert delays == [0.2, 0.4]  # exponential back-off between attempts


async def test_an_idle_lane_goes_away_and_comes_back_on_new_work(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lanes_module, "IDLE_LANE_SECONDS", 0.01)
    lanes = make_lanes(4)
    acks = Acks(executor.log)
    buy, sell = intent(1, Action.BUY), intent(1, Action.SELL)
    executor.release[buy.intent_id].set()
    executor.release[sell.intent_id].set()
    await lanes.submit(buy, acks(buy))
    await acks.wait(buy)
    lane = lanes._tasks[1]
    await asyncio.wait_for(lane, 5)  # it ends by itself once idle
    assert 1 not in lanes._tasks and 1 not in lanes._queues
    await lanes.submit(sell, acks(sell))
    await acks.wait(sell)


async def test_close_cancels_running_lanes_without_acknowledging(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes]
) -> None:
    lanes = make_lanes(4)
    acks = Acks(executor.log)
    order = intent(1, Action.BUY)
    await lanes.submit(order, acks(order))
    await started(executor, order)
    await lanes.close()
    assert ("done", order.intent_id) not in executor.log
    assert lanes._tasks == {}


class _AsyncioWith:
    """The asyncio module as seen by streams.execution.lanes, with some functions replaced."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(asyncio, name)


async def test_a_copy_of_a_held_intent_runs_once_and_is_acknowledged_with_the_first(
    executor: FakeExecutor, make_lanes: Callable[[int], StrategyLanes]
) -> None:
    """After a restart the same intent arrives again and again (the partition re-read, recovery's re-send, a
    re-armed stop firing twice): each copy would take a turn in the strategy's lane ahead of the exit queued
    behind it. A copy is not run again, and is acknowledged only once the first copy is done."""
    lanes = make_lanes(4)
    buy, stoploss = intent(1, Action.BUY), intent(1, Action.STOPLOSS)
    acked: asyncio.Queue[str] = asyncio.Queue()
    await lanes.submit(buy, lambda: acked.put_nowait("buy"))
    await started(executor, buy)
    await lanes.submit(buy, lambda: acked.put_nowait("buy copy (while running)"))
    await lanes.submit(stoploss, lambda: acked.put_nowait("stoploss"))
    await lanes.submit(stoploss, lambda: acked.put_nowait("stoploss copy (while queued)"))
    await settle()
    assert acked.empty()  # nothing is acknowledged before the work is done

    executor.release[buy.intent_id].set()
    executor.release[stoploss.intent_id].set()
    async with asyncio.timeout(5):
        order = [await acked.get() for _ in range(4)]
    assert order == ["buy", "buy copy (while running)", "stoploss", "stoploss copy (while queued)"]
    assert executor.starts() == [buy.intent_id, stoploss.intent_id]
    assert lanes.coalesced == 2

    executor.started[buy.intent_id].clear()
    await lanes.submit(buy, lambda: acked.put_nowait("buy, later"))  # done and gone: a later copy runs again
    await started(executor, buy)
    assert executor.starts() == [buy.intent_id, stoploss.intent_id, buy.intent_id]

"""Per-strategy lanes: one strategy's intents strictly in order, different strategies concurrently.

Each strategy with work gets a lane (an asyncio task draining its queue); a priority gate bounds how many
lanes execute at once, admitting STOPLOSS first. A lane that fails unexpectedly (database or Redis down)
retries the same intent with backoff rather than acknowledging it: the offset must not pass an intent that
was not carried out.

A copy of an intent that this worker already holds (queued or running in its lane) is not queued again: it
is acknowledged together with the first copy, when that one has been carried out (the lane retries it until
it succeeds). Not earlier: after a rebalance the copy can be the very same record re-read, and acknowledging
it before the work is done would let the offset pass an intent a crash then loses. Copies pile up after
restarts (a partition is re-read from its oldest unfinished intent, recovery re-sends what has no result, a
re-armed stop fires again); each would otherwise take a turn in the lane, ahead of the exit queued behind them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from core.logs import intent_context
from core.metrics import LANES_BUSY, LANES_OPEN, PendingExits
from schemas.events import Action, OrderIntent
from streams.execution import Executor
from streams.execution.engine import slow_exit
from streams.execution.gates import PriorityGate
from streams.execution.priority import PRIORITY, Urgency, inherited

log = logging.getLogger(__name__)

IDLE_LANE_SECONDS = 30.0
MAX_BACKLOG = 20_000


class StrategyLanes:
    def __init__(self, executor: Executor, concurrency: int) -> None:
        self.executor = executor
        self.gate = PriorityGate(concurrency)
        executor.gate = self.gate  # its lower-priority work steps aside for higher at checkpoints
        self._queues: dict[int, asyncio.Queue[tuple[OrderIntent, Callable[[], Any], float]]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # intent id -> acknowledgements of the later copies, for an intent queued or running in this worker
        self._copies: dict[str, list[Callable[[], Any]]] = {}
        self._backlog = asyncio.Semaphore(MAX_BACKLOG)
        # strategy -> the urgency of its running exit, and the priorities of the exits queued behind it
        self._urgency: dict[int, Urgency] = {}
        self._queued_exits: dict[int, list[int]] = {}
        self.coalesced = 0
        self.pending_exits = PendingExits(lambda due: -executor.context.clock.seconds_until(due))

    async def submit(self, intent: OrderIntent, done: Callable[[], Any]) -> None:
        copies = self._copies.get(intent.intent_id)
        if copies is not None:
            self.coalesced += 1
            copies.append(done)
            return
        self._copies[intent.intent_id] = []
        if intent.action is Action.RAISE_STOP:
            self.executor.follower.note(intent)  # the lane's next RAISE_STOP goes straight to the latest level
        if intent.action.is_exit:
            self.pending_exits.add(intent.intent_id, intent.due_at)
            self._queued_exits.setdefault(intent.strategy_id, []).append(PRIORITY[intent.action])
            if (running := self._urgency.get(intent.strategy_id)) is not None:
                running.raise_to(PRIORITY[intent.action])
        await self._backlog.acquire()  # back-pressure on the consumer when far behind
        queue = self._queues.get(intent.strategy_id)
        if queue is None:
            queue = self._queues[intent.strategy_id] = asyncio.Queue()
            self._tasks[intent.strategy_id] = asyncio.create_task(self._drain(intent.strategy_id, queue))
            LANES_OPEN.set(len(self._tasks))
        queue.put_nowait((intent, done, time.monotonic()))

    async def _drain(
        self, strategy_id: int, queue: asyncio.Queue[tuple[OrderIntent, Callable[[], Any], float]]
    ) -> None:
        try:
            while True:
                try:
                    intent, done, queued_at = await asyncio.wait_for(queue.get(), IDLE_LANE_SECONDS)
                except TimeoutError:
                    if queue.empty():
                        return
                    continue
                slow_exit(intent, "waited in its strategy's lane", time.monotonic() - queued_at)
                urgency = self._start(intent)
                try:
                    with inherited(urgency):
                        await self._run(intent)
                finally:
                    self._urgency.pop(strategy_id, None)
                self.pending_exits.discard(intent.intent_id)
                done()
                for copy_done in self._copies.pop(intent.intent_id, []):
                    copy_done()
                self._backlog.release()
        finally:
            self._queues.pop(strategy_id, None)
            self._tasks.pop(strategy_id, None)
            self._queued_exits.pop(strategy_id, None)
            LANES_OPEN.set(len(self._tasks))

    def _start(self, intent: OrderIntent) -> Urgency:
        """An intent starts at the most urgent priority of its own and the exits queued behind it (an exit closes
        the position whichever goes; a BUY ahead of them is a copy or a missed one, dropped unsent)."""
        queued = self._queued_exits.get(intent.strategy_id, [])
        own = PRIORITY[intent.action]
        if intent.action.is_exit and own in queued:
            queued.remove(own)
        urgency = self._urgency[intent.strategy_id] = Urgency(min([own, *queued]))
        return urgency

    async def _run(self, intent: OrderIntent) -> None:
        delay = 0.2  # short: a STOPLOSS of the same strategy may be queued behind this intent
        while True:
            try:
                asked = time.monotonic()
                async with self.gate.slot(PRIORITY[intent.action]):
                    slow_exit(intent, "waited for an execution slot", time.monotonic() - asked)
                    with LANES_BUSY.track_inprogress(), intent_context(intent.intent_id, intent.strategy_id):
                        await self.executor.execute(intent)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("intent %s could not be executed; retrying in %.1fs", intent.intent_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

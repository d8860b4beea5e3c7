"""The scheduler's pending BUY/SELL jobs: a heap by due time with O(1) cancellation by strategy."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime

from schemas.events import Action


@dataclass(frozen=True, order=True)
class Job:
    fires_at: datetime  # when it is handed to the workers: its due time, or a little before for a BUY
    due_at: datetime
    strategy_id: int
    action: Action
    run: int


class JobBook:
    def __init__(self) -> None:
        self._heap: list[Job] = []
        self._live: dict[tuple[int, Action], Job] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, job: Job) -> None:
        """Register (or replace) the job for (strategy, action)."""
        self._live[(job.strategy_id, job.action)] = job
        heapq.heappush(self._heap, job)

    def cancel(self, strategy_id: int, action: Action | None = None) -> None:
        actions = [action] if action is not None else list(Action)
        for each in actions:
            self._live.pop((strategy_id, each), None)

    def jobs_of(self, strategy_id: int) -> list[Job]:
        return [job for (sid, _), job in self._live.items() if sid == strategy_id]

    def next_due(self) -> datetime | None:
        self._drop_cancelled_head()
        return self._heap[0].fires_at if self._heap else None

    def pop_due(self, now: datetime) -> list[Job]:
        """Remove and return every live job whose time to fire is at or before `now`, earliest first."""
        due: list[Job] = []
        while True:
            self._drop_cancelled_head()
            if not self._heap or self._heap[0].fires_at > now:
                return due
            job = heapq.heappop(self._heap)
            del self._live[(job.strategy_id, job.action)]
            due.append(job)

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()

    def _drop_cancelled_head(self) -> None:
        # Cancelled or replaced jobs stay in the heap until they reach the top (lazy deletion).
        while self._heap and self._live.get((self._heap[0].strategy_id, self._heap[0].action)) != self._heap[0]:
            heapq.heappop(self._heap)

"""The trading book's gauges (strategies, open positions, positions no stop watches), read from the database
when Prometheus scrapes the API: the database is the source of truth, and no process has to keep them."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.metrics import OPEN_POSITIONS, POSITIONS_WITHOUT_LIVE_STOP, STRATEGIES
from storage.models import Strategy, StrategyStatus
from storage.positions import positions_by_status

# Prometheus scrapes every 15 s by default; several scrapers (or a refreshing dashboard) share one read.
FRESH_SECONDS = 5.0


class BookMetrics:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], fresh_seconds: float = FRESH_SECONDS) -> None:
        self.sessions = sessions
        self.fresh_seconds = fresh_seconds
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._read_at < self.fresh_seconds:
                return
            async with self.sessions() as session:
                await self._read(session)
            self._read_at = time.monotonic()

    @staticmethod
    async def _read(session: AsyncSession) -> None:
        rows = await session.execute(select(Strategy.status, func.count()).group_by(Strategy.status))
        counts = {str(status): int(count) for status, count in rows.tuples()}
        unwatched = 0
        for status in StrategyStatus:
            STRATEGIES.labels(status.value).set(counts.get(status.value, 0))
            holding = 0
            if counts.get(status.value):
                positions = await positions_by_status(session, status)
                holding = sum(1 for position in positions.values() if position.open)
            OPEN_POSITIONS.labels(status.value).set(holding)
            if status is not StrategyStatus.RUNNING:
                # Its stop was disarmed when it stopped: only its square-off (or the trader) will close it.
                unwatched += holding
        POSITIONS_WITHOUT_LIVE_STOP.set(unwatched)

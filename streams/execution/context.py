"""What every part of the execution engine shares: its settings, clock, stores, broker sessions and Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.orders import OrderGateway
from core.clock import Clock
from core.settings import Settings
from manager.strategy_manager import StrategyManager
from schemas.events import Event, OrderIntent
from storage.batched_script import BatchedScript
from storage.journal import GroupCommit
from storage.models import Strategy, StrategyStatus, User
from storage.runtime import runtime_key

ORDER_RESULTS_TOPIC = "order-results"
NOTIFICATIONS_TOPIC = "notifications"
LIFECYCLE_TOPIC = "strategy-lifecycle"

GatewayFactory = Callable[[int], Awaitable[OrderGateway]]

# Update runtime:{id} only while it exists: a stopped strategy's keys must not be resurrected.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
"""


class Publisher(Protocol):
    """What the engine needs from Kafka (core.kafka.EventProducer satisfies it)."""

    async def publish(self, topic: str, key: str | int, event: Event) -> None: ...


@dataclass
class EngineContext:
    """Mutable on purpose: a test may change the settings of a running engine, and every part sees it."""

    settings: Settings
    clock: Clock
    sessions: async_sessionmaker[AsyncSession]
    journal: GroupCommit  # the order path's writes, committed together across orders
    redis: Redis
    publisher: Publisher
    gateways: GatewayFactory
    manager: StrategyManager

    def __post_init__(self) -> None:
        # Sent in the order asked: a strategy's later update lands after its earlier.
        self._hset_if_exists = BatchedScript(self.redis, _HSET_IF_EXISTS)

    async def set_runtime(self, strategy_id: int, **fields: str) -> None:
        """The status API's copy of the strategy's runtime (a cache of what the order log says)."""
        await asyncio.shield(self.runtime_soon(strategy_id, **fields))

    def runtime_soon(self, strategy_id: int, **fields: str) -> asyncio.Future[object]:
        """`set_runtime`, queued now and not waited for: for a caller on its way to the broker."""
        flat: list[str] = []
        for key, value in {**fields, "updated_at": self.clock.now().isoformat()}.items():
            flat.extend((key, value))
        return self._hset_if_exists.submit([runtime_key(strategy_id)], flat)

    async def still_running(self, intent: OrderIntent) -> bool:
        """The strategy's status now, read afresh: a STOP may have landed since this intent was picked up, or the
        trader's kill switch (the daily loss limit's too) was engaged and its stops are under way."""
        today = self.manager.calendar.local(self.clock.now()).date()
        async with self.sessions() as session:
            current = (
                await session.execute(
                    select(Strategy.status, Strategy.run, User.kill_switch_day)
                    .join(User, User.id == Strategy.user_id)
                    .where(Strategy.id == intent.strategy_id)
                )
            ).first()
        if current is None or current.status != StrategyStatus.RUNNING.value or current.run != intent.run:
            return False
        return current.kill_switch_day is None or current.kill_switch_day < today

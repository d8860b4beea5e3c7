"""Everything the API's lifespan builds, in one typed object on `app.state.services`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.login_throttle import LoginThrottle
from api.passwords import PasswordService
from api.readiness import ReadinessCache
from api.revocation import Revocations
from api.status import StatusReader
from api.tokens import TokenService
from core.clock import Clock
from core.crypto import SecretBox
from core.kafka import EventProducer, ensure_topics
from core.market import MarketCalendar
from core.settings import Settings
from manager.strategy_manager import StrategyManager
from schemas.events import Event
from storage.runtime import RuntimeStore

log = logging.getLogger(__name__)


class EventBus:
    """An EventProducer that starts on first use and restarts after a failed start.

    The API must come up (and say so on /health) while Kafka is down; requests that need Kafka then get a
    503 instead of the whole process refusing to start.
    """

    def __init__(self, settings: Settings, start_timeout: float = 10.0) -> None:
        self.settings = settings
        self.start_timeout = start_timeout
        self._producer: EventProducer | None = None
        self._lock = asyncio.Lock()
        self._topics_ready = False

    async def producer(self) -> EventProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                if not self._topics_ready:
                    try:
                        await ensure_topics(self.settings, wait_seconds=self.start_timeout)
                        self._topics_ready = True
                    except (KafkaError, OSError, TimeoutError) as exc:
                        log.warning("could not ensure Kafka topics: %s", exc)
                producer = EventProducer(self.settings)
                try:
                    await asyncio.wait_for(producer.start(), self.start_timeout)
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
        return self._producer

    async def publish(self, topic: str, key: str | int, event: Event) -> None:
        producer = await self.producer()
        await producer.publish(topic, key, event)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


@dataclass
class Services:
    settings: Settings
    clock: Clock
    calendar: MarketCalendar
    engine: AsyncEngine
    session_factory: async_sessionmaker[AsyncSession]
    redis: Redis
    runtime: RuntimeStore
    events: EventBus
    manager: StrategyManager
    tokens: TokenService
    status: StatusReader
    secrets: SecretBox
    passwords: PasswordService
    throttle: LoginThrottle
    revocations: Revocations
    readiness: ReadinessCache

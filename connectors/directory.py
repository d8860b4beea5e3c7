"""Each trader's broker session for the execution engine, decrypted from the database on demand."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.broker import BrokerTokenExpired, KiteBroker
from connectors.orders import KiteOrderGateway, OrderGateway
from connectors.paper import PaperOrderGateway
from core.clock import Clock
from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount

# A reconnect (new access token) is picked up within this long without any signal between processes.
CACHE_SECONDS = 30.0


class BrokerDirectory:
    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        redis: Redis | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.redis = redis
        self.clock = clock
        self.secrets = SecretBox(settings)
        self._cache: dict[int, tuple[float, OrderGateway]] = {}

    async def gateway(self, user_id: int) -> OrderGateway:
        cached = self._cache.get(user_id)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        async with self.sessions() as session:
            account = (
                await session.execute(select(BrokerAccount).where(BrokerAccount.user_id == user_id))
            ).scalar_one_or_none()
        if account is None:
            raise BrokerTokenExpired("no broker account connected")
        if self.settings.broker_mode == "paper":
            if self.redis is None or self.clock is None:
                raise RuntimeError("paper broker needs Redis and the clock")
            paper = PaperOrderGateway(self.redis, str(user_id), self.clock)
            self._cache[user_id] = (time.monotonic(), paper)
            return paper
        broker = KiteBroker(
            self.settings,
            self.secrets.decrypt(account.api_key_encrypted),
            self.secrets.decrypt(account.access_token_encrypted),
        )
        gateway = KiteOrderGateway(broker)
        self._cache[user_id] = (time.monotonic(), gateway)
        return gateway

"""Each trader's broker session for the execution engine, decrypted from the database on demand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.broker import BrokerTokenExpired, KiteBroker
from connectors.egress import Egress
from connectors.orders import KiteOrderGateway, OrderGateway
from connectors.paper import PaperOrderGateway
from core.clock import Clock
from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount

log = logging.getLogger(__name__)

# A reconnect (new access token) is picked up within this long without any signal between processes.
CACHE_SECONDS = 30.0


class BrokerDirectory:
    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        redis: Redis | None = None,
        clock: Clock | None = None,
        book_reads: Callable[[int], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.redis = redis
        self.clock = clock
        self.secrets = SecretBox(settings)
        self._cache: dict[int, tuple[float, OrderGateway, bytes]] = {}  # user -> (loaded at, gateway, keys' digest)
        self._loading: dict[int, asyncio.Future[OrderGateway]] = {}
        # user -> a permit for one order-book read, counted across every process (Kite: 10 reads a second per
        # api_key); None: each process only spaces its own reads
        self.book_reads = book_reads

    async def gateway(self, user_id: int) -> OrderGateway:
        cached = self._cache.get(user_id)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        # One load per user at a time: the ten exits of a trader's burst share it (each read the account and
        # decrypted its keys on its own, and built a client of its own with its own connections).
        loading = self._loading.get(user_id)
        if loading is None or loading.done():
            loading = self._loading[user_id] = asyncio.ensure_future(self._load(user_id))
        return await asyncio.shield(loading)

    async def _load(self, user_id: int) -> OrderGateway:
        async with self.sessions() as session:
            account = (
                await session.execute(select(BrokerAccount).where(BrokerAccount.user_id == user_id))
            ).scalar_one_or_none()
        if account is None:
            self._cache.pop(user_id, None)
            raise BrokerTokenExpired("no broker account connected")
        if self.settings.broker_mode == "paper":
            if self.redis is None or self.clock is None:
                raise RuntimeError("paper broker needs Redis and the clock")
            paper = PaperOrderGateway(self.redis, str(user_id), self.clock)
            self._cache[user_id] = (time.monotonic(), paper, b"")
            return paper
        api_key = self.secrets.decrypt(account.api_key_encrypted)
        token = self.secrets.decrypt(account.access_token_encrypted)
        # Order calls leave through the trader's egress when there is one (pooled per egress, in this process).
        egress_url = self.secrets.decrypt(account.egress_url_encrypted) if account.egress_url_encrypted else ""
        # The same session as before is kept (its connections, its shared order-book reads) unless the trader
        # reconnected: only a new key, token, egress or algo id makes a new client.
        fingerprint = hashlib.blake2b(
            f"{api_key}\0{token}\0{egress_url}\0{account.algo_id}".encode(), digest_size=16
        ).digest()
        cached = self._cache.get(user_id)
        if cached is not None and cached[2] == fingerprint:
            self._cache[user_id] = (time.monotonic(), cached[1], fingerprint)
            return cached[1]
        egress = Egress.parse(egress_url) if egress_url else None
        gateway = KiteOrderGateway(
            KiteBroker(self.settings, api_key, token, egress),
            algo_id=account.algo_id,
            read_permit=(lambda: self._shared_read(user_id)) if self.book_reads is not None else None,
        )
        self._cache[user_id] = (time.monotonic(), gateway, fingerprint)
        return gateway

    @contextlib.asynccontextmanager
    async def _shared_read(self, user_id: int) -> AsyncIterator[None]:
        """The trader's permit for one order-book read; with Redis down the read goes ahead on this process's own
        spacing: an order's status must not wait for Redis."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                if self.book_reads is not None:
                    await stack.enter_async_context(self.book_reads(user_id))
            except RedisError as exc:
                log.warning("order-book read of user %s without the shared pace: %s", user_id, exc)
            yield

"""Is a well-formed access token still honoured? Answered from Redis in one round trip, the database on a miss.

Two things revoke a token before it expires:

- its user's token generation moved on (password change, "log out everywhere") or the account was closed. The
  database (`users.token_generation`, `users.deleted_at`) is the truth; Redis holds a copy for
  `GENERATION_CACHE_SECONDS`, filled with SET NX on a miss so a fill that read the database just before a
  change cannot overwrite the change's own write;
- its login (`sid`) was logged out: a Redis key that lives as long as an access token can, while the login's
  refresh tokens are revoked in the database for good.

Concurrent checks go to Redis together (`core.coalesce`): under load the status poll pays one pipelined
round trip per batch, not one per request, and never a database query once the copy is warm.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.tokens import AccessClaims
from core.coalesce import Coalesced
from storage.models import User

log = logging.getLogger(__name__)

CLOSED = "closed"
# A change whose Redis write failed is still seen within this long (the copy expires and is read again).
GENERATION_CACHE_SECONDS = 600


def generation_key(user_id: int) -> str:
    return f"auth:generation:{user_id}"


def logout_key(session_id: str) -> str:
    return f"auth:logged-out:{session_id}"


class Revocations:
    def __init__(self, redis: Redis, session_factory: async_sessionmaker[AsyncSession], access_ttl: timedelta) -> None:
        self.redis = redis
        self.session_factory = session_factory
        # A logged-out login's mark must outlive every access token of it.
        self._logout_seconds = int(access_ttl.total_seconds()) + 60
        self._reads: Coalesced[tuple[int, str], list[str | None]] = Coalesced(self._read_batch)

    async def _read_batch(self, batch: list[tuple[int, str]]) -> list[list[str | None] | BaseException]:
        pipe = self.redis.pipeline(transaction=False)
        for user_id, session_id in batch:
            pipe.mget(generation_key(user_id), logout_key(session_id))
        replies: list[list[str | None] | BaseException] = await pipe.execute(raise_on_error=False)
        return replies

    async def honoured(self, claims: AccessClaims) -> bool:
        try:
            generation, logged_out = await self._reads((claims.user_id, claims.session_id))
        except RedisError as exc:
            # The API answers from the database while Redis is down (the status poll does too); a logout made
            # in that window is not seen, its refresh tokens are revoked all the same.
            log.warning("token check: Redis unavailable (%s); reading the account from the database", exc)
            return await self._from_database(claims.user_id, cache=False) == str(claims.generation)
        if logged_out is not None:
            return False
        if generation is None:
            generation = await self._from_database(claims.user_id, cache=True)
        return generation == str(claims.generation)

    async def _from_database(self, user_id: int, *, cache: bool) -> str:
        async with self.session_factory() as session:
            row = (
                await session.execute(select(User.token_generation, User.deleted_at).where(User.id == user_id))
            ).one_or_none()
        value = CLOSED if row is None or row.deleted_at is not None else str(row.token_generation)
        if cache:
            try:
                await self.redis.set(generation_key(user_id), value, ex=GENERATION_CACHE_SECONDS, nx=True)
            except RedisError:
                pass  # the next request reads the database again
        return value

    async def generation_changed(self, user_id: int, generation: int | None) -> None:
        """After the database committed the change; None: the account is closed."""
        value = CLOSED if generation is None else str(generation)
        await self.redis.set(generation_key(user_id), value, ex=GENERATION_CACHE_SECONDS)

    async def logged_out(self, session_id: str) -> None:
        await self.redis.set(logout_key(session_id), "1", ex=self._logout_seconds)

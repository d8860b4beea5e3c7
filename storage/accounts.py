"""Closing accounts: the row a closed account leaves, and its purge once nothing can still need it."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import RefreshToken, User

# A closed account whose square-off was sent keeps its broker account this long, so the EXIT can still be
# placed and retried; by then the trading day (and Kite's access token) has ended.
CLOSED_ACCOUNT_RETENTION = timedelta(days=1)
UNUSABLE_PASSWORD_HASH = "!"  # noqa: S105 - a marker no argon2 hash verifies against


async def close_account(session: AsyncSession, user_id: int, now: datetime) -> None:
    """Nobody can log in any more, every token is revoked, and the email is free for a new account.
    The caller commits."""
    await session.execute(
        update(User)
        .where(User.id == user_id)
        .values(
            deleted_at=now,
            email=f"closed-{user_id}-{secrets.token_hex(4)}@closed.invalid",
            password_hash=UNUSABLE_PASSWORD_HASH,
            token_generation=User.token_generation + 1,
        )
    )
    await session.execute(delete(RefreshToken).where(RefreshToken.user_id == user_id))


async def erase_account(session: AsyncSession, user_id: int) -> None:
    """The user and, by cascade, their broker account, strategies, order log and notifications."""
    await session.execute(delete(User).where(User.id == user_id))


async def purge_closed_accounts(factory: async_sessionmaker[AsyncSession], now: datetime) -> int:
    """Erases closed accounts past their retention; returns how many."""
    async with factory() as session:
        result = await session.execute(
            delete(User).where(User.deleted_at.is_not(None), User.deleted_at < now - CLOSED_ACCOUNT_RETENTION)
        )
        await session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]

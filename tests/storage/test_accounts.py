"""Closed accounts: unusable at once, erased once their retention has passed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.accounts import CLOSED_ACCOUNT_RETENTION, UNUSABLE_PASSWORD_HASH, close_account, purge_closed_accounts
from storage.db import session_factory, session_scope
from storage.models import RefreshToken, User


async def test_closed_accounts_are_purged_after_their_retention(db_engine: AsyncEngine) -> None:
    factory = session_factory(db_engine)
    now = datetime.now(UTC)
    async with session_scope(factory) as session:
        users = [User(email=f"u{n}@example.com", password_hash="x", created_at=now) for n in range(3)]
        session.add_all(users)
        await session.flush()
        ids = [user.id for user in users]
        session.add(RefreshToken(user_id=ids[0], family_id="f", token_hash="a" * 64, created_at=now, expires_at=now))
    async with session_scope(factory) as session:
        await close_account(session, ids[0], now - CLOSED_ACCOUNT_RETENTION - timedelta(minutes=1))
        await close_account(session, ids[1], now)
    async with factory() as session:
        closed = await session.get(User, ids[0])
        assert closed is not None and closed.deleted_at is not None
        assert closed.password_hash == UNUSABLE_PASSWORD_HASH and closed.email.endswith("@closed.invalid")
        assert closed.token_generation == 1
        assert (await session.execute(select(RefreshToken))).first() is None

    assert await purge_closed_accounts(factory, now) == 1
    async with factory() as session:
        remaining = set((await session.scalars(select(User.id))).all())
    assert remaining == {ids[1], ids[2]}

from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import delete, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import session_factory, session_scope
from storage.models import OrderLog, RefreshToken, Strategy, User


async def test_migrations_create_every_table(db_engine: AsyncEngine) -> None:
    async with db_engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    assert {
        "users",
        "broker_accounts",
        "strategies",
        "strategy_status_history",
        "order_logs",
        "notifications",
        "refresh_tokens",
    } <= tables


async def test_order_log_is_unique_per_intent_attempt(db_engine: AsyncEngine) -> None:
    factory = session_factory(db_engine)
    now = datetime.now(UTC)
    async with session_scope(factory) as session:
        user = User(email="a@example.com", password_hash="x", created_at=now)
        session.add(user)
        await session.flush()
        strategy = Strategy(
            user_id=user.id, exchange="NSE", tradingsymbol="INFY", instrument_token=408065, quantity=1,
            buy_time=time(9, 30), sell_time=time(15, 0), stop_loss=Decimal("1400.00"), product="MIS",
            status="created", run=1, created_at=now, updated_at=now,
        )  # fmt: skip
        session.add(strategy)
        await session.flush()
        ids = (user.id, strategy.id)

    def row() -> OrderLog:
        return OrderLog(
            intent_id="1:2026-11-25:1:BUY", strategy_id=ids[1], user_id=ids[0], run=1, action="BUY",
            kind="attempt", attempt=1, status="placed", broker_tag="abc", quantity=1, created_at=now,
        )  # fmt: skip

    async with session_scope(factory) as session:
        session.add(row())
    with pytest.raises(IntegrityError):
        async with session_scope(factory) as session:
            session.add(row())
    async with factory() as session:
        count = len((await session.execute(select(OrderLog))).scalars().all())
    assert count == 1


async def test_migrations_match_the_models(db_engine: AsyncEngine) -> None:
    """Every table, column and index of the models exists after the migrations, and nothing more (0004 added
    the token generation, closed accounts and refresh tokens)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return list(compare_metadata(context, Base.metadata))

    async with db_engine.connect() as conn:
        diff = await conn.run_sync(differences)
    assert diff == [], diff


async def test_refresh_tokens_go_with_their_user(db_engine: AsyncEngine) -> None:
    factory = session_factory(db_engine)
    now = datetime.now(UTC)
    async with session_scope(factory) as session:
        user = User(email="r@example.com", password_hash="x", created_at=now)
        session.add(user)
        await session.flush()
        assert user.token_generation == 0 and user.deleted_at is None
        session.add(RefreshToken(user_id=user.id, family_id="f", token_hash="h" * 64, created_at=now, expires_at=now))
    async with session_scope(factory) as session:
        await session.execute(delete(User))
    async with factory() as session:
        assert (await session.execute(select(RefreshToken))).first() is None

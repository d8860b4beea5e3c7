"""Each trader's broker session for the engine: loaded once however many orders ask at once, kept while the
trader's keys are unchanged, replaced when they reconnect."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors import directory as directory_module
from connectors.broker import BrokerTokenExpired
from connectors.directory import BrokerDirectory
from core.crypto import SecretBox
from storage.db import session_factory
from storage.models import BrokerAccount, User
from tests.fixtures.factories import unique_email
from tests.fixtures.services import build_settings

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@sqlite_only
async def test_concurrent_orders_share_one_load_and_a_reconnect_makes_a_new_session(
    db_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = build_settings()
    sessions = session_factory(db_engine)
    box = SecretBox(settings)
    now = datetime.now(UTC)
    async with sessions() as session:
        user = User(email=unique_email(), password_hash="x", created_at=now)
        session.add(user)
        await session.flush()
        session.add(BrokerAccount(
            user_id=user.id, api_key_encrypted=box.encrypt("key1"), api_secret_encrypted=box.encrypt("secret"),
            access_token_encrypted=box.encrypt("token1"), broker_user_id="AB1234", token_issued_at=now,
            token_expires_at=now, created_at=now, updated_at=now,
        ))  # fmt: skip
        await session.commit()
        user_id = user.id
    directory = BrokerDirectory(settings, sessions)
    loads = 0
    load = directory._load

    async def counted(uid: int) -> object:
        nonlocal loads
        loads += 1
        return await load(uid)

    monkeypatch.setattr(directory, "_load", counted)
    gateways = await asyncio.gather(*(directory.gateway(user_id) for _ in range(10)))
    assert loads == 1 and all(g is gateways[0] for g in gateways)

    monkeypatch.setattr(directory_module, "CACHE_SECONDS", 0.0)  # every ask reloads from now on
    assert await directory.gateway(user_id) is gateways[0]  # same keys: the same session is kept
    async with sessions() as session:
        await session.execute(
            update(BrokerAccount).where(BrokerAccount.user_id == user_id)
            .values(access_token_encrypted=box.encrypt("token2"))
        )  # fmt: skip
        await session.commit()
    assert await directory.gateway(user_id) is not gateways[0]  # reconnected: a new session
    with pytest.raises(BrokerTokenExpired):
        await directory.gateway(user_id + 1000)

"""Sequence 2: connect a Kite account (validated before saving, stored encrypted, never echoed)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount
from tests.fixtures.api import IST, ApiUser, ConnectBroker, MakeStrategy, MakeUser, SimulatorLike
from tests.fixtures.factories import api_key


async def test_status_before_connecting(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    user = await make_user()
    response = await client.get("/broker/status", headers=user.headers)
    assert response.status_code == 200
    assert response.json()["connected"] is False


@pytest.mark.parametrize("use_request_token", [True, False], ids=["request_token", "access_token"])
async def test_connect_and_status(
    client: httpx.AsyncClient, make_user: MakeUser, connect_broker: ConnectBroker, use_request_token: bool
) -> None:
    user = await make_user()
    creds = await connect_broker(user, use_request_token=use_request_token)
    status = (await client.get("/broker/status", headers=user.headers)).json()
    assert status["connected"] is True
    assert status["broker_user_id"] == creds.user_id
    assert status["token_expired"] is False
    # The clock reads 2025-01-15 10:00 IST: Kite tokens die at 06:00 IST the next morning.
    expires = datetime.fromisoformat(status["token_expires_at"])
    assert expires == datetime(2025, 1, 16, 6, 0, tzinfo=IST)
    issued = datetime.fromisoformat(status["token_issued_at"]).astimezone(IST)
    assert issued.date().isoformat() == "2025-01-15"


async def test_reconnect_replaces_the_account(
    client: httpx.AsyncClient, make_user: MakeUser, connect_broker: ConnectBroker, db_engine: AsyncEngine
) -> None:
    user = await make_user()
    await connect_broker(user)
    second = await connect_broker(user)
    status = (await client.get("/broker/status", headers=user.headers)).json()
    assert status["broker_user_id"] == second.user_id
    async with db_engine.connect() as conn:
        count = len((await conn.execute(select(BrokerAccount.id))).all())
    assert count == 1


async def test_broker_refusals_are_400_with_reason(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike
) -> None:
    user = await make_user()
    creds = simulator.state.create_account(api_key=api_key())
    cases = {
        "wrong secret": {"api_key": creds.api_key, "api_secret": "wrongsecret", "request_token": creds.request_token},
        "bad access token": {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": "nope123"},
        "unknown api key": {"api_key": "unknownkey", "api_secret": creds.api_secret, "access_token": "nope123"},
        "used request token": {
            "api_key": creds.api_key, "api_secret": creds.api_secret, "request_token": "notatoken",
        },
    }  # fmt: skip
    for name, body in cases.items():
        response = await client.post("/broker/connect", json=body, headers=user.headers)
        assert response.status_code == 400, (name, response.text)
        assert "broker" in response.json()["detail"], name
    assert (await client.get("/broker/status", headers=user.headers)).json()["connected"] is False


async def test_broker_unreachable_is_503(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike
) -> None:
    user = await make_user()
    creds = simulator.state.create_account(api_key=api_key())
    simulator.state.inject_fault("error", api_key=creds.api_key, status=503, error_type="NetworkException")
    try:
        body = {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": creds.access_token}
        response = await client.post("/broker/connect", json=body, headers=user.headers)
    finally:
        simulator.state.clear_faults()
    assert response.status_code == 503
    assert "broker unavailable" in response.json()["detail"]
    assert (await client.get("/broker/status", headers=user.headers)).json()["connected"] is False


async def test_exactly_one_token_required(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    user = await make_user()
    for extra in ({}, {"access_token": "a1", "request_token": "r1"}):
        body = {"api_key": "k1", "api_secret": "s1", **extra}
        response = await client.post("/broker/connect", json=body, headers=user.headers)
        assert response.status_code == 422
        assert "exactly one of access_token or request_token" in response.text


async def test_secrets_never_logged_returned_or_stored_plain(
    client: httpx.AsyncClient,
    make_user: MakeUser,
    simulator: SimulatorLike,
    db_engine: AsyncEngine,
    api_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    user = await make_user()
    creds = simulator.state.create_account(api_key=api_key())
    responses: list[httpx.Response] = []
    body = {"api_key": creds.api_key, "api_secret": creds.api_secret, "request_token": creds.request_token}
    responses.append(await client.post("/broker/connect", json=body, headers=user.headers))
    assert responses[-1].status_code == 200
    # And the failure paths, which are where secrets usually leak.
    responses.append(await client.post("/broker/connect", json=body, headers=user.headers))  # token reused
    responses.append(
        await client.post("/broker/connect", json={**body, "api_secret": creds.api_secret + "!"}, headers=user.headers)
    )
    responses.append(await client.get("/broker/status", headers=user.headers))

    async with db_engine.connect() as conn:
        row = (await conn.execute(select(BrokerAccount))).one()
    access_token = SecretBox(api_settings).decrypt(row.access_token_encrypted)
    secrets = [creds.api_key, creds.api_secret, creds.request_token, access_token]
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    for secret in secrets:
        assert secret not in caplog.text
        for response in responses:
            assert secret not in response.text
        assert secret.encode() not in stored
    assert SecretBox(api_settings).decrypt(row.api_key_encrypted) == creds.api_key
    assert SecretBox(api_settings).decrypt(row.api_secret_encrypted) == creds.api_secret


async def test_expired_token_status_and_strategy_refused(
    client: httpx.AsyncClient,
    make_user: MakeUser,
    make_strategy: MakeStrategy,
    db_engine: AsyncEngine,
) -> None:
    user: ApiUser = await make_user()
    created = await make_strategy(user)
    async with db_engine.begin() as conn:
        await conn.execute(
            update(BrokerAccount).values(token_expires_at=datetime(2025, 1, 15, 0, 30, tzinfo=UTC) - timedelta(hours=1))
        )
    status = (await client.get("/broker/status", headers=user.headers)).json()
    assert status["token_expired"] is True
    from tests.fixtures.factories import strategy_body

    refused = await client.post("/strategy/create", json=strategy_body(), headers=user.headers)
    assert refused.status_code == 409
    assert "expired" in refused.json()["detail"]
    start = await client.post("/strategy/start", json={"strategy_id": created["strategy_id"]}, headers=user.headers)
    assert start.status_code == 409


async def test_strategy_refused_without_broker(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    from tests.fixtures.factories import strategy_body

    user = await make_user()
    response = await client.post("/strategy/create", json=strategy_body(), headers=user.headers)
    assert response.status_code == 409
    assert "broker not connected" in response.json()["detail"]


async def test_algo_id_is_stored_and_a_malformed_one_refused(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike, db_engine: AsyncEngine
) -> None:
    user = await make_user()
    creds = simulator.state.create_account(api_key=api_key())
    body = {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": creds.access_token}
    refused = await client.post("/broker/connect", json={**body, "algo_id": "no spaces"}, headers=user.headers)
    assert refused.status_code == 422 and "algo_id" in refused.text
    connected = await client.post("/broker/connect", json={**body, "algo_id": "NSEALGO7"}, headers=user.headers)
    assert connected.status_code == 200, connected.text
    async with db_engine.connect() as conn:
        stored = (await conn.execute(select(BrokerAccount.algo_id).where(BrokerAccount.user_id == user.id))).scalar()
    assert stored == "NSEALGO7"

"""KiteBroker: the official client against the simulator, and the exception mapping callers rely on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
from kiteconnect import exceptions as kite_exceptions

from connectors.broker import (
    INSTRUMENT_CACHE,
    BrokerRejected,
    BrokerThrottled,
    BrokerTokenExpired,
    BrokerUnavailable,
    KiteBroker,
    map_kite_exception,
    token_expiry,
)
from core.embedded import free_port
from tests.fixtures.api import IST, SimulatorLike
from tests.fixtures.factories import api_key
from tests.fixtures.services import build_settings


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (kite_exceptions.TokenException("Incorrect `api_key` or `access_token`.", 403), BrokerTokenExpired),
        (kite_exceptions.InputException("Invalid `api_key`.", 400), BrokerRejected),
        (kite_exceptions.PermissionException("Insufficient permission", 403), BrokerRejected),
        (kite_exceptions.OrderException("Insufficient funds", 400), BrokerRejected),
        (kite_exceptions.OrderException("RMS rejected", 500), BrokerRejected),
        (kite_exceptions.NetworkException("Too many requests", 429), BrokerThrottled),  # refused unread: not placed
        (kite_exceptions.NetworkException("Gateway timeout", 504), BrokerUnavailable),
        (kite_exceptions.DataException("Bad response", 502), BrokerUnavailable),
        (kite_exceptions.GeneralException("Something broke", 500), BrokerUnavailable),
        (kite_exceptions.GeneralException("Bad request", 400), BrokerRejected),
        (requests.ConnectTimeout("timed out"), BrokerUnavailable),
        (requests.ReadTimeout("timed out"), BrokerUnavailable),
        (requests.ConnectionError("refused"), BrokerUnavailable),
        (KeyError("content-type"), BrokerUnavailable),
    ],
)
def test_exception_mapping(raised: Exception, expected: type[Exception]) -> None:
    mapped = map_kite_exception(raised)
    assert type(mapped) is expected
    assert mapped.message


def test_token_expiry_is_next_0600_ist() -> None:
    settings = build_settings()
    morning = datetime(2025, 1, 15, 10, 0, tzinfo=IST)
    assert token_expiry(morning, settings) == datetime(2025, 1, 16, 6, 0, tzinfo=IST)
    before_six = datetime(2025, 1, 15, 5, 0, tzinfo=IST)
    assert token_expiry(before_six, settings) == datetime(2025, 1, 15, 6, 0, tzinfo=IST)
    assert token_expiry(morning, settings).tzinfo is UTC


async def test_session_profile_and_instruments(simulator: SimulatorLike) -> None:
    settings = build_settings(kite_api_root=simulator.rest_root)
    creds = simulator.state.create_account(api_key=api_key(), user_id="AB1234", user_name="Asha")
    broker = KiteBroker(settings, creds.api_key)
    session = await broker.generate_session(creds.request_token, creds.api_secret)
    assert session.broker_user_id == "AB1234"
    authed = KiteBroker(settings, creds.api_key, session.access_token)
    profile = await authed.profile()
    assert (profile.broker_user_id, profile.user_name) == ("AB1234", "Asha")

    INSTRUMENT_CACHE.clear()
    infy = await authed.lookup("NSE", "infy")
    assert infy is not None and infy.instrument_token > 0 and infy.key == "NSE:INFY"
    assert await authed.lookup("NSE", "NOSUCH") is None
    master = await authed.instruments()
    assert master.token_for("NSE:INFY") == infy.instrument_token
    assert await authed.instruments() is master  # cached


async def test_refusals_and_outages(simulator: SimulatorLike) -> None:
    settings = build_settings(kite_api_root=simulator.rest_root, broker_timeout_seconds=2.0)
    creds = simulator.state.create_account(api_key=api_key())
    with pytest.raises(BrokerTokenExpired):
        await KiteBroker(settings, creds.api_key, "not-a-token").profile()
    with pytest.raises(BrokerRejected):
        await KiteBroker(settings, creds.api_key).generate_session(creds.request_token, "wrong-secret")
    simulator.state.expire_tokens(creds.api_key)
    with pytest.raises(BrokerTokenExpired):
        await KiteBroker(settings, creds.api_key, creds.access_token).profile()

    fresh = simulator.state.create_account(api_key=api_key())
    broker = KiteBroker(settings, fresh.api_key, fresh.access_token)
    simulator.state.inject_fault("rate_limit", api_key=fresh.api_key, count=1)
    with pytest.raises(BrokerUnavailable):
        await broker.profile()
    simulator.state.inject_fault("error", api_key=fresh.api_key, status=503, count=1)
    with pytest.raises(BrokerUnavailable):
        await broker.profile()
    simulator.state.inject_fault("timeout", api_key=fresh.api_key, count=1, hold_seconds=5)
    try:
        with pytest.raises(BrokerUnavailable, match="in time"):
            await broker.profile()
    finally:
        simulator.state.clear_faults()
    assert (await broker.profile()).broker_user_id == fresh.user_id


async def test_unreachable_broker_is_unavailable() -> None:
    settings = build_settings(kite_api_root=f"http://127.0.0.1:{free_port()}", broker_timeout_seconds=1.0)
    with pytest.raises(BrokerUnavailable, match="unreachable"):
        await KiteBroker(settings, "key", "token").profile()

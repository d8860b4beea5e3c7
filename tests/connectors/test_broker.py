"""KiteBroker: the official client against the simulator, and the exception mapping callers rely on."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
import requests
from kiteconnect import exceptions as kite_exceptions

from connectors.broker import (
    ANSWERED_AT,
    INSTRUMENT_CACHE,
    SEND_AT,
    BrokerRejected,
    BrokerThrottled,
    BrokerTokenExpired,
    BrokerUnavailable,
    KiteBroker,
    QuotePace,
    map_kite_exception,
    token_expiry,
)
from connectors.http_session import Response
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


async def test_quote_reads_of_one_api_key_keep_to_kites_one_a_second(simulator: SimulatorLike) -> None:
    """The simulator answers a second quote request within a second with 429, as Kite does: three reads of one
    api_key at once all get their price (a strategy create and start each ask for one)."""
    settings = build_settings(kite_api_root=simulator.rest_root)
    creds = simulator.state.create_account(api_key=api_key())
    authed = KiteBroker(settings, creds.api_key, creds.access_token)
    simulator.state.set_price("NSE:INFY", 1500.0)
    prices = await asyncio.gather(*(authed.last_price("NSE:INFY") for _ in range(3)))
    assert prices == [1500.0] * 3


async def test_quote_pace_spaces_one_keys_calls_and_not_anothers() -> None:
    pace = QuotePace(interval=0.05)
    started = time.monotonic()
    times: dict[str, list[float]] = {"a": [], "b": []}

    async def read(key: str) -> None:
        await pace.turn(key)
        times[key].append(time.monotonic() - started)

    await asyncio.gather(*(read("a") for _ in range(3)), read("b"))
    assert all(later - earlier >= 0.045 for earlier, later in zip(times["a"], times["a"][1:], strict=False))
    assert times["b"][0] < 0.045  # another api_key has its own second


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


async def test_a_call_notes_when_its_answer_came_back_for_a_caller_that_asks() -> None:
    """Taken in the call's thread, before the event loop resumes the caller: what the rate limiter dates a grant by."""
    broker = KiteBroker(build_settings(), "key", "token")
    released = time.time()

    def answer_then_hold() -> str:
        time.sleep(0.05)  # the answer came back here; whatever the caller does after it is not the broker's
        return "ok"

    answered: list[float] = []
    token = ANSWERED_AT.set(answered)
    try:
        assert await broker.call(answer_then_hold) == "ok"
        resumed = time.time()
        with pytest.raises(BrokerRejected):
            await broker.call(_refuse)  # no answer of the broker's own: nothing noted
    finally:
        ANSWERED_AT.reset(token)
    assert len(answered) == 1
    assert released + 0.05 <= answered[0] <= resumed
    assert await broker.call(answer_then_hold) == "ok"  # a caller that does not ask: nothing noted anywhere
    assert len(answered) == 1


async def test_a_call_answered_by_the_broker_is_noted_as_its_answer_came_back_not_once_the_client_read_it(
    simulator: SimulatorLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official client against the simulator: the answer's instant is taken as the session has its status and
    headers (a response hook), not after the client has parsed the body, which may wait for the interpreter."""
    settings = build_settings(kite_api_root=simulator.rest_root)
    creds = simulator.state.create_account(api_key=api_key())
    broker = KiteBroker(settings, creds.api_key, creds.access_token)
    parse = Response.json

    def slow_parse(response: Response) -> object:
        time.sleep(0.05)  # the client reading the body in a busy worker
        return parse(response)

    monkeypatch.setattr(Response, "json", slow_parse)
    answered: list[float] = []
    token = ANSWERED_AT.set(answered)
    try:
        await broker.profile()
        returned = time.time()
    finally:
        ANSWERED_AT.reset(token)
    assert len(answered) == 1  # once: by the hook, not again when the call returned
    assert answered[0] <= returned - 0.05


async def test_a_call_due_at_an_instant_leaves_its_thread_no_sooner() -> None:
    broker = KiteBroker(build_settings(), "key", "token")
    started: list[float] = []
    due = time.time() + 0.15
    token = SEND_AT.set(due)
    try:
        await broker.call(lambda: started.append(time.time()))
    finally:
        SEND_AT.reset(token)
    assert due <= started[0] < due + 0.05


def _refuse() -> None:
    raise kite_exceptions.InputException("bad input")

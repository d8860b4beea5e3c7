"""Fault injection, the audit log and the `/_sim/` control API."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest
import requests
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

from connectors.kite_sim import RunningSimulator
from tests.connectors.kite_sim.test_rest import place
from tests.fixtures.simulator import SimAccount, login

MakeAccount = Callable[..., SimAccount]


@pytest.mark.parametrize(
    ("error_type", "status"),
    [
        ("InputException", 400),
        ("TokenException", 403),
        ("PermissionException", 403),
        ("OrderException", 500),
        ("GeneralException", 500),
        ("DataException", 502),
        ("NetworkException", 503),
        ("NetworkException", 504),
        ("DataException", 504),
    ],
)
def test_every_error_type_maps_to_the_client_exception(
    simulator: RunningSimulator, kite_account: MakeAccount, error_type: str, status: int
) -> None:
    account = kite_account()
    simulator.state.inject_fault(
        "error", api_key=account.api_key, status=status, error_type=error_type, message="boom", count=1
    )
    with pytest.raises(getattr(kex, error_type)) as err:
        place(account.kite)
    assert err.value.code == status and str(err.value) == "boom"
    place(account.kite)  # count=1: the next one goes through


def test_unknown_error_type_becomes_general_exception(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.inject_fault("error", status=500, error_type="WeirdException", count=1)
    with pytest.raises(kex.GeneralException):
        account.kite.profile()


def test_rate_limit_fault(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.inject_fault("rate_limit", api_key=account.api_key, count=1)
    with pytest.raises(kex.NetworkException) as err:
        account.kite.margins()
    assert err.value.code == 429


def test_reject_next_orders_with_a_message(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    kite = kite_account().kite
    simulator.state.inject_fault("reject", count=2, message="RMS:Blocked for testing")
    first, second, third = (place(kite) for _ in range(3))
    finals = [kite.order_history(o)[-1] for o in (first, second, third)]
    assert [f["status"] for f in finals] == ["REJECTED", "REJECTED", "COMPLETE"]
    assert finals[0]["status_message"] == "RMS:Blocked for testing"


def test_scope_orders_leaves_other_routes_alone(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.inject_fault("error", scope="orders", status=503)
    assert account.kite.profile()["user_id"]
    with pytest.raises(kex.NetworkException):
        place(account.kite)


def test_faults_target_one_api_key(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    victim, bystander = kite_account(), kite_account()
    simulator.state.inject_fault("error", api_key=victim.api_key, status=502, error_type="DataException")
    assert place(bystander.kite)
    with pytest.raises(kex.DataException):
        victim.kite.orders()


def test_probability_faults_are_seeded(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    def pattern() -> list[bool]:
        simulator.state.clear_faults()
        account = kite_account()
        simulator.state.inject_fault("error", probability=0.5, seed=11, status=503)
        outcome = []
        for _ in range(12):
            try:
                account.kite.margins()
                outcome.append(True)
            except kex.NetworkException:
                outcome.append(False)
        return outcome

    first = pattern()
    assert first == pattern()
    assert True in first and False in first


def test_latency_fault_is_visible_in_the_audit(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.inject_fault("latency", api_key=account.api_key, latency_ms=150, count=1)
    place(account.kite, tag="slow1")
    (record,) = simulator.state.audit_records(tag="slow1")
    assert record.latency_seconds is not None and record.latency_seconds >= 0.15
    assert record.faults and record.faults[0].startswith("latency")


def test_timeout_fault_processes_then_stays_silent(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    impatient = login(simulator, account.credentials, timeout=0.5)
    simulator.state.inject_fault("timeout", api_key=account.api_key, process=True, count=1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        place(impatient, tag="unclear1")
    # The broker did place it: the caller must look it up by tag before placing again.
    (order,) = simulator.state.find_orders(account.api_key, tag="unclear1")
    assert order.status == "COMPLETE"
    assert [o["tag"] for o in account.kite.orders()] == ["unclear1"]
    simulator.state.release_held()


def test_timeout_fault_held_until_released(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.inject_fault("timeout", api_key=account.api_key, count=1)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            account.kite.profile()
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    caller.join(0.3)
    assert caller.is_alive()  # still held
    simulator.state.release_held()
    caller.join(5)
    assert not caller.is_alive()
    assert isinstance(outcome[0], kex.NetworkException) and outcome[0].code == 504


def test_expire_token_action(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    response = httpx.post(f"{simulator.control_root}/faults", json={"kind": "expire_token", "api_key": account.api_key})
    assert response.json()["expired"] >= 1
    with pytest.raises(kex.TokenException):
        account.kite.positions()


def test_control_api_faults_roundtrip(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    created = httpx.post(
        f"{simulator.control_root}/faults",
        json={"kind": "error", "error_type": "GeneralException", "count": 5},
    )
    assert created.status_code == 201 and created.json()["status"] == 500
    assert len(httpx.get(f"{simulator.control_root}/faults").json()) == 1
    with pytest.raises(kex.GeneralException):
        account.kite.holdings()
    httpx.delete(f"{simulator.control_root}/faults")
    assert account.kite.holdings() == []


def test_control_api_accounts_and_tokens(simulator: RunningSimulator) -> None:
    root = simulator.control_root
    created = httpx.post(f"{root}/accounts", json={"api_key": "ctl1", "api_secret": "s", "balance": 5000}).json()
    kite = KiteConnect("ctl1", access_token=created["access_token"], root=simulator.rest_root)
    assert kite.margins("equity")["net"] == 5000
    request_token = httpx.post(f"{root}/accounts/ctl1/request_token").json()["request_token"]
    assert KiteConnect("ctl1", root=simulator.rest_root).generate_session(request_token, "s")["user_id"]
    assert httpx.post(f"{root}/accounts/ctl1/expire_token", json={}).json()["expired"] == 2
    with pytest.raises(kex.TokenException):
        kite.profile()


def test_control_api_prices(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    root = simulator.control_root
    kite = kite_account().kite
    set_now = httpx.post(f"{root}/prices/NSE/INFY", json={"price": 1450.0}).json()
    assert set_now["last_price"] == 1450.0 and set_now["pinned"]
    assert kite.ltp("NSE:INFY")["NSE:INFY"]["last_price"] == 1450.0
    # "INFY to 1460.00 at t+3s" on the manual clock.
    httpx.post(f"{root}/prices/NSE/INFY", json={"steps": [{"after_seconds": 3, "price": 1460.0}]})
    simulator.state.step()
    assert httpx.get(f"{root}/prices/NSE/INFY").json()["last_price"] == 1450.0
    simulator.state.clock.advance(3)  # type: ignore[attr-defined]
    simulator.state.step()
    assert httpx.get(f"{root}/prices/NSE/INFY").json()["last_price"] == 1460.0
    assert httpx.get(f"{root}/prices/NSE/NOPE").json()["error_type"] == "InputException"


def test_control_api_config(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    kite = kite_account().kite
    httpx.post(f"{simulator.control_root}/config", json={"rate_limit_enabled": False})
    for _ in range(15):
        place(kite, quantity=1)
    assert httpx.get(f"{simulator.control_root}/config").json()["rate_limit_enabled"] is False


# --- audit -------------------------------------------------------------------------------------------


def test_audit_records_every_order_request(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    alice, bob = kite_account(), kite_account()
    state.set_price("NSE:INFY", 1500.0)
    placed = place(alice.kite, tag="t1", order_type="LIMIT", price=1400.0)
    alice.kite.modify_order("regular", placed, price=1410.0)
    alice.kite.cancel_order("regular", placed)
    state.inject_fault("error", api_key=bob.api_key, count=1, status=503)
    with pytest.raises(kex.NetworkException):
        place(bob.kite, tag="t2")
    state.clock.advance(1)  # type: ignore[attr-defined]  # so that `since` splits the log
    place(bob.kite, tag="t2")
    with pytest.raises(kex.InputException):
        place(bob.kite, tag="t3", quantity="x")

    records = state.audit_records()
    assert [(r.action, r.outcome, r.http_status) for r in records] == [
        ("place", "placed", 200),
        ("modify", "modified", 200),
        ("cancel", "cancelled", 200),
        ("place", "error", 503),
        ("place", "placed", 200),
        ("place", "error", 400),
    ]
    assert records[0].order_id == placed and records[0].params["price"] == "1400.0"
    assert records[3].error_type == "NetworkException" and records[3].order_id is None
    assert all(r.received_monotonic <= (r.completed_monotonic or 0) for r in records)
    assert state.audit.placements_by_tag(bob.api_key) == {"t2": 1}
    assert len(state.audit_records(api_key=alice.api_key)) == 3

    over_http = httpx.get(f"{simulator.control_root}/audit", params={"tag": "t2"}).json()
    assert [r["http_status"] for r in over_http] == [503, 200]
    since = records[4].received_at.isoformat()
    assert len(httpx.get(f"{simulator.control_root}/audit", params={"since": since}).json()) == 2
    httpx.delete(f"{simulator.control_root}/audit")
    assert state.audit_records() == []


def test_audit_rate_limited_requests(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    kite = kite_account().kite
    for _ in range(10):
        place(kite, quantity=1, tag="burst")
    with pytest.raises(kex.NetworkException):
        place(kite, quantity=1, tag="burst")
    records = simulator.state.audit_records(tag="burst")
    assert [r.http_status for r in records].count(429) == 1

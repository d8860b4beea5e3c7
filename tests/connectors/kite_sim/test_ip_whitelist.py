"""The static IP whitelist: order calls from other addresses are refused, everything else answers anywhere.

Distinct loopback addresses stand for distinct public IPs: the official client's connections are bound to a
chosen 127.0.0.x source address by mounting a requests adapter whose pool binds it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import requests
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex
from requests.adapters import HTTPAdapter

from connectors.kite_sim import RunningSimulator
from core.clock import ManualClock
from tests.connectors.kite_sim.test_rest import place
from tests.fixtures.proxies import StartProxies
from tests.fixtures.simulator import SimAccount, login

MakeAccount = Callable[..., SimAccount]


class SourceAddressAdapter(HTTPAdapter):
    """Every connection of the session leaves from `source` (the test's stand-in for another machine)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def from_address(kite: KiteConnect, source: str) -> KiteConnect:
    kite.reqsession.mount("http://", SourceAddressAdapter(source))
    return kite


def test_order_calls_from_an_unlisted_address_are_refused(
    simulator: RunningSimulator, kite_account: MakeAccount
) -> None:
    account = kite_account()
    simulator.state.set_ip_whitelist(account.api_key, ["127.0.0.2"])
    kite = from_address(account.kite, "127.0.0.3")

    with pytest.raises(kex.PermissionException) as refused:
        place(kite)
    assert refused.value.code == 403
    assert "127.0.0.3" in str(refused.value) and "whitelist" in str(refused.value)
    assert kite.orders() == []  # nothing was placed, and reads answer from any address

    kite.margins()
    kite.positions()
    record = simulator.state.audit.records(api_key=account.api_key)[-1]
    assert (record.action, record.outcome, record.source_ip) == ("place", "error", "127.0.0.3")
    assert (record.http_status, record.error_type) == (403, "PermissionException")


def test_every_order_endpoint_checks_the_address(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.set_price("NSE:INFY", 1500.0)
    simulator.state.set_ip_whitelist(account.api_key, ["127.0.0.2", "127.0.0.4"])
    allowed = from_address(account.kite, "127.0.0.4")  # the secondary address
    order_id = place(allowed, order_type="LIMIT", price=1000.0)

    wrong = from_address(KiteConnect(account.api_key, access_token=account.access_token, root=simulator.rest_root),
                         "127.0.0.9")  # fmt: skip
    with pytest.raises(kex.PermissionException):
        wrong.modify_order(variety="regular", order_id=order_id, price=1001.0)
    with pytest.raises(kex.PermissionException):
        wrong.cancel_order(variety="regular", order_id=order_id)
    allowed.cancel_order(variety="regular", order_id=order_id)

    records = simulator.state.audit.records(api_key=account.api_key)
    assert [(r.action, r.outcome, r.source_ip) for r in records] == [
        ("place", "placed", "127.0.0.4"),
        ("modify", "error", "127.0.0.9"),
        ("cancel", "error", "127.0.0.9"),
        ("cancel", "cancelled", "127.0.0.4"),
    ]


def test_an_account_without_a_whitelist_takes_orders_from_anywhere(
    simulator: RunningSimulator, kite_account: MakeAccount
) -> None:
    account = kite_account()
    place(from_address(account.kite, "127.0.0.5"))
    assert simulator.state.audit.records(api_key=account.api_key)[-1].source_ip == "127.0.0.5"


def test_the_switch_turns_the_check_off(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    simulator.state.set_ip_whitelist(account.api_key, ["127.0.0.2"])
    with httpx.Client(base_url=simulator.control_root) as control:
        assert control.post("/config", json={"static_ip_check": False}).json()["static_ip_check"] is False
    place(account.kite)  # from 127.0.0.1


def test_the_whitelist_changes_at_most_once_a_week(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    account = kite_account()
    clock = simulator.state.clock
    assert isinstance(clock, ManualClock)
    with httpx.Client(base_url=simulator.control_root) as control:
        first = control.put(f"/accounts/{account.api_key}/ip_whitelist", json={"ips": ["127.0.0.2"]})
        assert first.status_code == 200 and first.json()["ips"] == ["127.0.0.2"]
        again = control.put(f"/accounts/{account.api_key}/ip_whitelist", json={"ips": ["127.0.0.3"]})
        assert again.status_code == 400 and "once a week" in again.json()["message"]
        started = clock.now()
        clock.set(started + timedelta(days=7))
        try:
            later = control.put(f"/accounts/{account.api_key}/ip_whitelist", json={"ips": ["127.0.0.3"]})
            assert later.status_code == 200
        finally:
            clock.set(started)  # the simulator is shared by the session's tests
        assert control.get(f"/accounts/{account.api_key}/ip_whitelist").json()["ips"] == ["127.0.0.3"]
        bad = control.put(f"/accounts/{account.api_key}/ip_whitelist", json={"ips": ["not-an-ip"], "force": True})
        assert bad.status_code == 400 and "not-an-ip" in bad.json()["message"]


def test_orders_through_a_real_proxy_leave_from_its_address(
    simulator: RunningSimulator, kite_account: MakeAccount, egress_proxies: StartProxies
) -> None:
    right, wrong = egress_proxies(2)
    account = kite_account()
    simulator.state.set_ip_whitelist(account.api_key, [right.listen])
    through_right = login(simulator, account.credentials, proxies={"http": right.url, "https": right.url})
    through_wrong = login(simulator, account.credentials, proxies={"http": wrong.url, "https": wrong.url})

    place(through_right)
    with pytest.raises(kex.PermissionException):
        place(through_wrong)
    right.stop()
    with pytest.raises(requests.exceptions.ProxyError):
        place(through_right)  # an egress that is down never reaches the broker

    records = simulator.state.audit.records(api_key=account.api_key)
    assert [(r.outcome, r.source_ip) for r in records] == [("placed", right.listen), ("error", wrong.listen)]

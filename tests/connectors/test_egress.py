"""The egress URL, its pooled sessions, and how the broker's refusals and the proxy's failures are classified."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
from kiteconnect import exceptions as kex

from connectors.broker import (
    BrokerEgressDown,
    BrokerRejected,
    BrokerSourceRefused,
    KiteBroker,
    map_kite_exception,
)
from connectors.egress import EGRESS_SESSIONS, Egress, EgressUrlError
from connectors.kite_sim import RunningSimulator
from connectors.kite_sim.state import SOURCE_IP_REFUSED
from core.settings import Settings
from tests.connectors.kite_sim.test_rest import place
from tests.fixtures.proxies import StartProxies
from tests.fixtures.simulator import SimAccount


def test_parse_keeps_credentials_out_of_display_and_repr() -> None:
    egress = Egress.parse(" socks5h://me:p%40ss@proxy.example.net:1080 ")
    assert (egress.scheme, egress.host, egress.port, egress.has_credentials) == ("socks5h", "proxy.example.net", 1080,
                                                                                 True)  # fmt: skip
    assert egress.url == "socks5h://me:p%40ss@proxy.example.net:1080"
    assert egress.display == "socks5h://proxy.example.net:1080"
    assert egress.credentials == ("me", "p@ss") and Egress.parse("http://127.0.0.2:3128").credentials is None
    assert "p%40ss" not in repr(egress) and "me:" not in repr(egress)
    assert Egress.parse("http://[2001:db8::1]:3128").display == "http://[2001:db8::1]:3128"


@pytest.mark.parametrize(
    "raw", ["https://proxy:443", "proxy:3128", "http://proxy", "http://proxy:99999", "http://proxy:3128/x?y=1", ""]
)
def test_parse_refuses_unusable_urls(raw: str) -> None:
    with pytest.raises(EgressUrlError):
        Egress.parse(raw)


def test_one_pooled_session_per_egress() -> None:
    first = Egress.parse("http://127.0.0.2:3128")
    assert EGRESS_SESSIONS.session(first) is EGRESS_SESSIONS.session(Egress.parse("http://127.0.0.2:3128"))
    assert EGRESS_SESSIONS.session(first) is not EGRESS_SESSIONS.session(Egress.parse("http://127.0.0.3:3128"))
    settings = Settings()
    a = KiteBroker(settings, "k", "t", first)
    b = KiteBroker(settings, "k", "t2", first)  # a reconnect: new client, same connections
    assert a.order_client.reqsession is b.order_client.reqsession
    assert a.client is not a.order_client and a.client.reqsession is not a.order_client.reqsession


def test_a_source_address_refusal_is_permanent_with_advice() -> None:
    refusal = kex.PermissionException(SOURCE_IP_REFUSED.format(source="203.0.113.9"), code=403)
    mapped = map_kite_exception(refusal)
    assert isinstance(mapped, BrokerSourceRefused) and isinstance(mapped, BrokerRejected)
    assert "IP whitelist" in mapped.message and "egress" in mapped.message
    other = map_kite_exception(kex.PermissionException("Insufficient permission for that call.", code=403))
    assert type(other) is BrokerRejected


def test_an_unreachable_proxy_is_egress_down() -> None:
    assert isinstance(map_kite_exception(requests.exceptions.ProxyError("refused")), BrokerEgressDown)


async def test_order_calls_go_through_the_egress_and_reads_go_direct(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount], egress_proxies: StartProxies
) -> None:
    (proxy,) = egress_proxies(1)
    account = kite_account()
    simulator.state.set_ip_whitelist(account.api_key, [proxy.listen])
    settings = Settings(kite_api_root=simulator.rest_root)
    broker = KiteBroker(settings, account.api_key, account.access_token, Egress.parse(proxy.url))
    place(broker.order_client)
    proxy.stop()
    assert await broker.call(broker.client.orders)  # reads need no egress
    with pytest.raises(BrokerEgressDown):
        await broker.order_call(broker.order_client.place_order, variety="regular", exchange="NSE",
                                tradingsymbol="INFY", transaction_type="BUY", quantity=1, product="MIS",
                                order_type="MARKET")  # fmt: skip
    (record,) = simulator.state.audit.records(api_key=account.api_key)
    assert (record.outcome, record.source_ip) == ("placed", proxy.listen)


async def test_a_socks5_egress_carries_order_calls_over_one_reused_tunnel(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount], egress_proxies: StartProxies
) -> None:
    (proxy,) = egress_proxies(1, kind="socks5")
    account = kite_account()
    simulator.state.set_ip_whitelist(account.api_key, [proxy.listen])
    settings = Settings(kite_api_root=simulator.rest_root)
    broker = KiteBroker(settings, account.api_key, account.access_token, Egress.parse(proxy.url))
    for _ in range(3):
        place(broker.order_client)
    records = simulator.state.audit.records(api_key=account.api_key)
    assert [(r.outcome, r.source_ip) for r in records] == [("placed", proxy.listen)] * 3
    assert broker.order_client.reqsession.connections_opened == 1  # three orders, one connection
    proxy.kill()
    with pytest.raises(BrokerEgressDown):  # a SOCKS proxy that is down: a connection error through the egress
        await broker.order_call(broker.order_client.place_order, variety="regular", exchange="NSE",
                                tradingsymbol="INFY", transaction_type="BUY", quantity=1, product="MIS",
                                order_type="MARKET")  # fmt: skip

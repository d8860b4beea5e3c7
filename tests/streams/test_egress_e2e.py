"""Each trader's orders leave from that trader's registered address, end to end: real tinyproxy egresses on
distinct loopback addresses, the `algo worker` and `algo scheduler` processes, the official client, and the
simulator checking every order call's source address. Its audit is the judge."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from core.settings import Settings
from tests.fixtures.pipeline import Pipeline
from tests.fixtures.proxies import StartProxies
from tests.streams.test_pipeline_e2e import clock_time, eventually, start

# The egress is about where order calls leave from, not the database: one backend keeps the suite short.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"require_egress": True})


def order_calls(simulator: Any, api_key: str) -> list[Any]:
    return simulator.state.audit_records(api_key=api_key)


async def notices(client: httpx.AsyncClient, user: Any, sid: int) -> list[dict[str, Any]]:
    body = (await client.get("/notifications", headers=user.headers)).json()
    return [n for n in body["notifications"] if n["strategy_id"] == sid]


async def status_of(client: httpx.AsyncClient, user: Any, sid: int) -> dict[str, Any]:
    return (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()  # type: ignore[no-any-return]


async def test_three_traders_each_trade_through_their_own_address(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, connect_broker: Any, simulator: Any,
    pipeline: Pipeline, pinned_clock: ScaledClock, egress_proxies: StartProxies,
) -> None:  # fmt: skip
    proxies = egress_proxies(2) + egress_proxies(1, kind="socks5")  # HTTP CONNECT (tinyproxy) and SOCKS5 (Dante)
    symbols = ("NSE:INFY", "NSE:TCS", "NSE:SBIN")
    for symbol, price in zip(symbols, (1500.0, 4000.0, 800.0), strict=True):
        simulator.state.set_price(symbol, price)
    buy_time, _ = clock_time(pinned_clock, 4)
    sell_time, _ = clock_time(pinned_clock, 9)
    traders = []
    for proxy, symbol in zip(proxies, symbols, strict=True):
        user = await make_user()
        await connect_broker(user, egress=proxy.url, whitelist=proxy.listen)
        # A protective SL-M too: placed after the BUY and cancelled before the SELL, both through the egress.
        strategy = await make_strategy(user, symbol=symbol, buy_time=buy_time, sell_time=sell_time,
                                       stop_loss=100, protective_stop=True)  # fmt: skip
        traders.append((user, int(strategy["strategy_id"]), proxy))
    for user, sid, _ in traders:
        await start(client, user, sid)

    async def all_completed() -> bool:
        states = [(await status_of(client, user, sid)).get("strategy_status") for user, sid, _ in traders]
        return all(state == "completed" for state in states)

    await eventually(all_completed, 40, "three strategies bought and sold", pipeline)
    for user, _, proxy in traders:
        calls = order_calls(simulator, user.broker.api_key)
        # BUY, protective SL-M, its cancel, SELL: each from this trader's address, none refused.
        assert [(c.action, c.params.get("order_type") or "") for c in calls] == [
            ("place", "MARKET"), ("place", "SL-M"), ("cancel", ""), ("place", "MARKET"),
        ], calls  # fmt: skip
        assert {c.source_ip for c in calls} == {proxy.listen}
        assert all(c.outcome in ("placed", "cancelled") for c in calls), [(c.outcome, c.message) for c in calls]
    addresses = {r.source_ip for r in simulator.state.audit.records()}
    assert addresses == {p.listen for p in proxies}  # nothing left from the workers' own address


async def test_an_egress_from_the_wrong_address_is_refused_once_and_stops_the_strategy(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, connect_broker: Any, simulator: Any,
    pipeline: Pipeline, pinned_clock: ScaledClock, egress_proxies: StartProxies,
) -> None:  # fmt: skip
    registered, wrong = egress_proxies(2)
    simulator.state.set_price("NSE:SBIN", 800.0)
    user = await make_user()
    # Connecting succeeds: reads answer from any address, so only an order can tell the address is wrong.
    await connect_broker(user, egress=wrong.url, whitelist=registered.listen)
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 120)
    strategy = await make_strategy(user, symbol="NSE:SBIN", buy_time=buy_time, sell_time=sell_time, stop_loss=700)
    sid = int(strategy["strategy_id"])
    await start(client, user, sid)

    async def failed() -> bool:
        return (await status_of(client, user, sid)).get("strategy_status") == "failed"

    await eventually(failed, 20, "strategy auto-stopped", pipeline)
    notice = await eventually(
        lambda: _titled(client, user, sid, "Order Failed – Strategy Stopped"), 10, "failure notice", pipeline
    )
    assert "IP whitelist" in notice["message"] and "egress" in notice["message"]
    (call,) = order_calls(simulator, user.broker.api_key)  # refused once, never retried
    assert (call.action, call.source_ip, call.http_status, call.error_type) == (
        "place", wrong.listen, 403, "PermissionException",
    )  # fmt: skip
    assert simulator.state.find_orders(user.broker.api_key) == []


async def test_an_egress_killed_mid_day_delays_the_exit_until_it_is_back_and_tells_the_trader(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, connect_broker: Any, simulator: Any,
    pipeline: Pipeline, pinned_clock: ScaledClock, egress_proxies: StartProxies,
) -> None:  # fmt: skip
    (proxy,) = egress_proxies(1)
    simulator.state.set_price("NSE:TCS", 4000.0)
    user = await make_user()
    await connect_broker(user, egress=proxy.url, whitelist=proxy.listen)
    buy_time, _ = clock_time(pinned_clock, 3)
    sell_time, _ = clock_time(pinned_clock, 9)
    strategy = await make_strategy(user, symbol="NSE:TCS", buy_time=buy_time, sell_time=sell_time, stop_loss=3000)
    sid = int(strategy["strategy_id"])
    await start(client, user, sid)

    async def bought() -> bool:
        return (await status_of(client, user, sid)).get("position") == "bought"

    await eventually(bought, 15, "BUY filled", pipeline)
    proxy.kill()  # the egress host dies with the position open
    notice = await eventually(
        lambda: _titled(client, user, sid, "Exit delayed – egress down"), 20, "egress-down notice", pipeline
    )
    assert notice["message"].startswith("SELL: ") and "egress" in notice["message"]
    proxy.start()  # back on its address and port

    async def sold() -> list[Any]:
        return [c for c in order_calls(simulator, user.broker.api_key) if c.params.get("transaction_type") == "SELL"]

    sells = await eventually(sold, 30, "the exit placed once the egress is back", pipeline)
    calls = order_calls(simulator, user.broker.api_key)
    assert [c.params["transaction_type"] for c in calls] == ["BUY", "SELL"]  # placed once: nothing doubled
    assert all(c.outcome == "placed" and c.source_ip == proxy.listen for c in calls)
    assert sells[0].order_status == "COMPLETE"
    positions = simulator.state.positions_json(simulator.state.account(user.broker.api_key))
    assert all(p["quantity"] == 0 for p in positions["net"])


async def _titled(client: httpx.AsyncClient, user: Any, sid: int, title: str) -> dict[str, Any] | None:
    return next((n for n in await notices(client, user, sid) if n["title"] == title), None)

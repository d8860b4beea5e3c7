"""The order gateway on the official client against the simulator: shared order-book reads, market protection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from kiteconnect import KiteConnect
from redis.asyncio import Redis

from connectors.broker import BrokerCallLate, BrokerUnavailable, KiteBroker
from connectors.kite_sim import RunningSimulator
from connectors.orders import KiteOrderGateway
from streams.execution.limits import BrokerRateLimiter
from tests.fixtures.services import build_settings
from tests.fixtures.simulator import SimAccount


def _counted_gateway(simulator: RunningSimulator, account: SimAccount) -> tuple[KiteOrderGateway, Counter[str]]:
    broker = KiteBroker(build_settings(kite_api_root=simulator.rest_root), account.api_key, account.access_token)
    calls: Counter[str] = Counter()
    for name in ("orders", "order_history"):
        real = getattr(broker.client, name)

        def counted(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*args)

        setattr(broker.client, name, counted)
    return KiteOrderGateway(broker), calls


async def test_one_traders_orders_followed_together_share_order_book_reads(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    gateway, calls = _counted_gateway(simulator, kite_account())
    order_ids = [
        await gateway.place_market_order(
            exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=1, product="MIS", tag=f"burst{n}"
        )  # fmt: skip
        for n in range(10)
    ]

    statuses = await asyncio.gather(*(gateway.order_status(order_id) for order_id in order_ids))

    assert [s.order_id for s in statuses] == order_ids
    assert all(s.status == "COMPLETE" and s.filled_quantity == 1 and s.average_price for s in statuses)
    assert calls["order_history"] == 0
    assert 1 <= calls["orders"] <= 2  # the first read, and the one for those who asked while it was out


async def test_an_order_call_that_cannot_start_by_its_leave_by_instant_never_reaches_the_broker(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    gateway = KiteOrderGateway(KiteBroker(build_settings(kite_api_root=simulator.rest_root), account.api_key,
                                          account.access_token))  # fmt: skip
    order = {"exchange": "NSE", "tradingsymbol": "INFY", "side": "BUY", "quantity": 1, "product": "MIS"}
    with pytest.raises(BrokerCallLate, match="not sent"):
        await gateway.place_market_order(**order, tag="late", leave_by=time.monotonic() - 0.001)
    await gateway.place_market_order(**order, tag="intime", leave_by=time.monotonic() + 5.0)

    assert [r.params["tag"] for r in simulator.state.audit_records(api_key=account.api_key)] == ["intime"]


async def test_an_order_the_book_does_not_show_is_unclear_not_missing(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    gateway, _ = _counted_gateway(simulator, kite_account())
    with pytest.raises(BrokerUnavailable, match="not in the broker's order book yet"):
        await gateway.order_status("999999999")


@pytest.mark.parametrize(("protection", "algo_id"), [(-1.0, None), (2.5, "NSEALGO7")])
async def test_every_market_and_stop_order_carries_market_protection_and_the_algo_id(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount], protection: float, algo_id: str | None
) -> None:
    """Kite refuses MARKET and SL-M orders without market protection: the simulator's audit shows what was sent."""
    account = kite_account()
    settings = build_settings(kite_api_root=simulator.rest_root, broker_market_protection=protection)
    gateway = KiteOrderGateway(KiteBroker(settings, account.api_key, account.access_token), algo_id=algo_id)
    simulator.state.set_price("NSE:INFY", 1500.0)
    await gateway.place_market_order(
        exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=1, product="MIS", tag="mp1"
    )  # fmt: skip
    await gateway.place_stop_order(
        exchange="NSE", tradingsymbol="INFY", quantity=1, product="MIS", trigger_price=1400.0, tag="mp2"
    )  # fmt: skip
    records = simulator.state.audit_records(api_key=account.api_key)
    assert [(r.outcome, r.params["order_type"]) for r in records] == [("placed", "MARKET"), ("placed", "SL-M")]
    assert {float(r.params["market_protection"]) for r in records} == {protection}
    assert {r.params.get("algo_id") for r in records} == {algo_id}
    orders = account.kite.orders()
    assert {(o["market_protection"], o["algo_id"]) for o in orders} == {(protection, algo_id)}


async def test_one_traders_book_reads_from_several_processes_stay_under_kites_read_limit_together(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount], redis: Redis
) -> None:
    """Two workers following one trader's orders: each alone spaces its reads, together they share one budget
    (Redis), so the simulator's 10-a-second limit on reads (here 5, and the product's pace 4) never answers 429."""
    simulator.state.config.other_reads_per_second = 5
    account = kite_account()
    settings = build_settings(kite_api_root=simulator.rest_root, broker_book_reads_per_second=4)
    shared = BrokerRateLimiter(redis, 4, key_prefix="ratelimit:book-reads:", per_minute=240, exit_reserve=0)
    workers = [
        KiteOrderGateway(
            KiteBroker(settings, account.api_key, account.access_token),
            read_permit=lambda: shared.permit(7, 0),
        )
        for _ in range(2)
    ]

    async def follow(gateway: KiteOrderGateway) -> None:
        for _ in range(5):
            assert await gateway.find_by_tag("none") is None  # a 429 would raise BrokerUnavailable

    await asyncio.wait_for(asyncio.gather(*(follow(gateway) for gateway in workers)), 10)


@pytest.mark.parametrize("kind", ["error", "rate_limit"])
async def test_a_failed_book_read_is_retried_once_for_everyone_waiting_on_it(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount], kind: str
) -> None:
    """A 5xx or 429 on the trader's order book: the lookups sharing it see the next read's answer, not the failure."""
    gateway, calls = _counted_gateway(simulator, kite_account())
    order_id = await gateway.place_market_order(
        exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=1, product="MIS", tag="retried1"
    )  # fmt: skip
    simulator.state.inject_fault(kind, count=1)  # the next request, which is the book read
    found = await asyncio.gather(*(gateway.find_by_tag("retried1") for _ in range(5)))
    assert {f.order_id if f else None for f in found} == {order_id}
    assert calls["orders"] == 2  # the failed read and its retry, shared by all five


async def test_the_order_book_reads_as_the_official_client_reads_it(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    """Timestamps are parsed by the standard library rather than the client's dateutil call: the rows must come
    out exactly as the client's own `orders()` gives them, datetimes included."""
    account = kite_account()
    broker = KiteBroker(build_settings(kite_api_root=simulator.rest_root), account.api_key, account.access_token)
    gateway = KiteOrderGateway(broker)
    for n in range(3):
        await gateway.place_market_order(
            exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=1, product="MIS", tag=f"book{n}"
        )  # fmt: skip
    official = KiteConnect(account.api_key, access_token=account.access_token, root=simulator.rest_root)

    ours, theirs = await asyncio.to_thread(broker.client.orders), await asyncio.to_thread(official.orders)

    assert len(ours) == 3
    assert ours == theirs
    assert all(isinstance(row["order_timestamp"], datetime) for row in ours)

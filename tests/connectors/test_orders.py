"""FreshSharedRead: the order-book reads that concurrent lookups by tag and status reads share.

In the first tests the read is a stand-in for `KiteConnect.orders` that counts and numbers its calls: the
rule under test is about when a read begins relative to who asked, which a real broker call cannot be made
to show. The last ones use the official client against the simulator, with its two read methods counted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from connectors.broker import BrokerUnavailable, KiteBroker
from connectors.kite_sim import RunningSimulator
from connectors.orders import FreshSharedRead, KiteOrderGateway
from streams.execution.limits import BrokerRateLimiter
from tests.fixtures.services import build_settings
from tests.fixtures.simulator import SimAccount


class NumberedReads:
    """Each read returns its own number, and waits until the test lets it finish."""

    def __init__(self) -> None:
        self.began = 0
        self.on_the_wire = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self) -> int:
        self.began += 1
        number = self.began
        self.on_the_wire.set()
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise BrokerUnavailable("Too many requests")
        return number


async def test_callers_during_a_read_share_the_next_read_never_the_one_in_flight() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    first = asyncio.create_task(book())
    await reads.on_the_wire.wait()
    later = [asyncio.create_task(book()) for _ in range(5)]  # asked after read 1 began
    await asyncio.wait(later, timeout=0.05)
    assert reads.began == 1  # they wait for read 1 to end rather than start reads of their own
    reads.release.set()
    assert await first == 1
    # Read 1 began before they asked, so it may miss an order they need to see: they get read 2.
    assert await asyncio.gather(*later) == [2] * 5
    assert reads.began == 2
    assert await book() == 3  # and a caller after everything is over gets a read of its own


async def test_a_failed_read_fails_its_callers_and_the_next_call_reads_again() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    reads.fail_next = True
    callers = [asyncio.create_task(book()) for _ in range(3)]
    reads.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes)
    assert reads.began == 1
    assert await book() == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_read_of_the_others() -> None:
    reads = NumberedReads()
    book = FreshSharedRead(reads)
    quitter, stayer = asyncio.create_task(book()), asyncio.create_task(book())
    await reads.on_the_wire.wait()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    reads.release.set()
    assert await stayer == 1


async def test_reads_begin_at_least_the_spacing_apart_and_callers_meanwhile_join_the_next() -> None:
    loop = asyncio.get_running_loop()
    began: list[float] = []

    async def read() -> int:
        began.append(loop.time())
        return len(began)

    book = FreshSharedRead(read, spacing=0.05)
    assert await book() == 1
    assert await asyncio.gather(book(), book(), book()) == [2, 2, 2]  # asked within the spacing: one read
    assert await book() == 3
    assert [round(b - a, 3) >= 0.05 for a, b in zip(began, began[1:], strict=False)] == [True, True]


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

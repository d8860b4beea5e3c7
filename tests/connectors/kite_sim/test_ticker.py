"""KiteTicker against the simulator, through the official Twisted client.

Twisted's reactor is process-global and cannot be restarted, so every ticker test lives here and shares
one reactor (`tests.fixtures.simulator.ensure_reactor`) and one connection; callbacks hand events to
thread-safe queues and the tests wait on those with timeouts.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from kiteconnect import KiteConnect, KiteTicker

from connectors.kite_sim import RunningSimulator, SimConfig
from core.clock import ManualClock
from tests.fixtures.simulator import SIM_START, in_reactor, login, start_ticker

INFY = 408065  # NSE:INFY
SBIN = 779521  # NSE:SBIN
NIFTY = 256265  # NIFTY 50 index
WAIT = 5.0


@dataclass
class TickerSession:
    sim: RunningSimulator
    ticker: KiteTicker
    kite: KiteConnect
    ticks: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    raw: queue.Queue[bytes] = field(default_factory=queue.Queue)
    orders: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    errors: queue.Queue[Any] = field(default_factory=queue.Queue)
    connects: queue.Queue[bool] = field(default_factory=queue.Queue)
    closes: queue.Queue[int] = field(default_factory=queue.Queue)

    def next_tick(self, token: int, mode: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        while True:
            tick = self.ticks.get(timeout=timeout)
            if tick["instrument_token"] == token and (mode is None or tick["mode"] == mode):
                return tick

    def drain(self) -> None:
        for q in (self.ticks, self.raw, self.orders, self.errors):
            while not q.empty():
                q.get_nowait()


@pytest.fixture(scope="module")
def session() -> Iterator[TickerSession]:
    config = SimConfig(tick_interval=0.02, heartbeat_interval=0.2)
    # No random walk: every price here moves only when a test moves it.
    with RunningSimulator(clock=ManualClock(SIM_START), config=config, walk=False) as sim:
        creds = sim.state.create_account("tick1", api_secret="s", balance=10_000_000)
        kite = login(sim, creds)
        ticker = KiteTicker("tick1", kite.access_token, root=sim.ticker_root, reconnect_max_delay=5)
        s = TickerSession(sim, ticker, kite)
        ticker.on_ticks = lambda ws, ticks: [s.ticks.put(t) for t in ticks]
        ticker.on_message = lambda ws, payload, is_binary: s.raw.put(payload) if is_binary else None
        ticker.on_order_update = lambda ws, data: s.orders.put(data)
        ticker.on_error = lambda ws, code, reason: s.errors.put(reason)
        ticker.on_connect = lambda ws, response: s.connects.put(True)
        ticker.on_close = lambda ws, code, reason: s.closes.put(code)
        start_ticker(ticker)
        s.connects.get(timeout=WAIT)
        yield s
        in_reactor(ticker.close)
        s.closes.get(timeout=WAIT)


def expected(sim: RunningSimulator, token: int) -> Any:
    quote = sim.state.book.quote(token)
    assert quote is not None
    return quote


def test_subscribe_defaults_to_quote_mode(session: TickerSession) -> None:
    session.sim.state.set_price("NSE:INFY", 1512.35, quantity=40)
    in_reactor(session.ticker.subscribe, [INFY])
    tick = session.next_tick(INFY, "quote")
    q = expected(session.sim, INFY)
    assert tick["tradable"] is True
    assert tick["last_price"] == 1512.35 == q.last / 100
    assert tick["last_traded_quantity"] == q.last_quantity == 40
    assert tick["volume_traded"] == q.volume
    assert tick["average_traded_price"] == q.average_price / 100
    assert tick["ohlc"] == {"open": q.open / 100, "high": q.high / 100, "low": q.low / 100, "close": q.close / 100}
    buy, sell = q.depth()
    assert tick["total_buy_quantity"] == sum(x[0] for x in buy)
    assert tick["total_sell_quantity"] == sum(x[0] for x in sell)


def test_full_mode_with_depth_and_times(session: TickerSession) -> None:
    in_reactor(session.ticker.set_mode, session.ticker.MODE_FULL, [INFY])
    tick = session.next_tick(INFY, "full")
    q = expected(session.sim, INFY)
    assert tick["last_price"] == q.last / 100
    assert tick["exchange_timestamp"] == datetime.fromtimestamp(q.exchange_time)
    assert tick["last_trade_time"] == datetime.fromtimestamp(q.last_trade_time)
    buy, sell = q.depth()
    assert tick["depth"]["buy"] == [{"quantity": a, "price": p / 100, "orders": o} for a, p, o in buy]
    assert tick["depth"]["sell"] == [{"quantity": a, "price": p / 100, "orders": o} for a, p, o in sell]


def test_ltp_mode(session: TickerSession) -> None:
    in_reactor(session.ticker.set_mode, session.ticker.MODE_LTP, [INFY])
    session.next_tick(INFY, "ltp")
    session.sim.state.set_price("NSE:INFY", 1499.95)
    tick = session.next_tick(INFY, "ltp")
    while tick["last_price"] != 1499.95:
        tick = session.next_tick(INFY, "ltp")
    assert set(tick) == {"tradable", "mode", "instrument_token", "last_price"}


def test_index_packets(session: TickerSession) -> None:
    session.sim.state.set_price("NSE:NIFTY 50", 24_500.5)
    in_reactor(session.ticker.subscribe, [NIFTY])
    quote = session.next_tick(NIFTY, "quote")
    assert quote["tradable"] is False and quote["last_price"] == 24_500.5
    in_reactor(session.ticker.set_mode, session.ticker.MODE_FULL, [NIFTY])
    full = session.next_tick(NIFTY, "full")
    q = expected(session.sim, NIFTY)
    assert full["exchange_timestamp"] == datetime.fromtimestamp(q.exchange_time)
    assert full["ohlc"]["close"] == q.close / 100
    in_reactor(session.ticker.unsubscribe, [NIFTY])


def test_many_instruments_share_frames(session: TickerSession) -> None:
    master = session.sim.state.master
    tokens = [i.instrument_token for i in master.instruments if i.exchange == "NSE" and i.tradable][:300]
    session.drain()
    in_reactor(session.ticker.subscribe, tokens)
    seen: set[int] = set()
    biggest = 0
    while not tokens_seen(seen, tokens):
        payload = session.raw.get(timeout=WAIT)
        biggest = max(biggest, int.from_bytes(payload[:2], "big") if len(payload) > 1 else 0)
        while not session.ticks.empty():
            seen.add(session.ticks.get_nowait()["instrument_token"])
    assert biggest > 1  # several packets in one frame
    in_reactor(session.ticker.unsubscribe, [t for t in tokens if t != INFY])


def tokens_seen(seen: set[int], tokens: list[int]) -> bool:
    return set(tokens) <= seen


def test_order_updates_arrive_on_the_socket(session: TickerSession) -> None:
    session.sim.state.set_price("NSE:SBIN", 800.0)
    session.drain()
    filled = session.kite.place_order(
        variety="regular",
        exchange="NSE",
        tradingsymbol="SBIN",
        transaction_type="BUY",
        quantity=1,
        product="CNC",
        order_type="MARKET",
        market_protection=-1,
        tag="ws1",
    )
    update = session.orders.get(timeout=WAIT)
    assert (update["order_id"], update["status"], update["tag"]) == (filled, "COMPLETE", "ws1")
    rejected = session.kite.place_order(
        variety="regular",
        exchange="NSE",
        tradingsymbol="SBIN",
        transaction_type="BUY",
        quantity=0,
        product="CNC",
        order_type="MARKET",
        market_protection=-1,
    )
    update = session.orders.get(timeout=WAIT)
    assert (update["order_id"], update["status"]) == (rejected, "REJECTED")
    resting = session.kite.place_order(
        variety="regular",
        exchange="NSE",
        tradingsymbol="SBIN",
        transaction_type="BUY",
        quantity=1,
        product="CNC",
        order_type="LIMIT",
        price=700.0,
    )
    assert session.orders.get(timeout=WAIT)["status"] == "OPEN"
    session.kite.cancel_order("regular", resting)
    assert session.orders.get(timeout=WAIT)["status"] == "CANCELLED"


def test_heartbeats_when_idle(session: TickerSession) -> None:
    in_reactor(session.ticker.unsubscribe, [INFY])
    session.drain()
    while True:
        payload = session.raw.get(timeout=WAIT)
        if len(payload) == 1:
            break


def test_subscription_limit_sends_an_error(session: TickerSession) -> None:
    session.sim.state.config.max_subscriptions = 5
    try:
        session.drain()
        in_reactor(session.ticker.subscribe, [INFY, SBIN, NIFTY, 738561, 2953217, 341249])
        assert "Maximum of 5 instruments" in session.errors.get(timeout=WAIT)
    finally:
        session.sim.state.config.max_subscriptions = 3000
        in_reactor(session.ticker.unsubscribe, [SBIN, NIFTY, 738561, 2953217, 341249])


def test_pause_and_resume_feed(session: TickerSession) -> None:
    state = session.sim.state
    in_reactor(session.ticker.subscribe, [INFY])
    session.next_tick(INFY)
    state.feed_paused = True
    state.set_price("NSE:INFY", 1444.0)
    # Nothing at the new price while paused (a tick already in flight at the old price may still land).
    with pytest.raises(queue.Empty):
        while session.next_tick(INFY, timeout=0.5)["last_price"] != 1444.0:
            pass
    state.feed_paused = False
    assert session.next_tick(INFY)["last_price"] == 1444.0


def test_bad_token_is_refused(session: TickerSession) -> None:
    intruder = KiteTicker("tick1", "wrong-token", root=session.sim.ticker_root, reconnect=False)
    refused: queue.Queue[str] = queue.Queue()
    intruder.on_error = lambda ws, code, reason: refused.put(str(reason))
    start_ticker(intruder)
    assert "403" in refused.get(timeout=WAIT)
    in_reactor(intruder.stop_retry)


def test_dropped_connection_reconnects_and_resubscribes(session: TickerSession) -> None:
    session.drain()
    assert session.sim.state.drop_connections("tick1") == 1
    assert session.closes.get(timeout=WAIT) == 1011
    session.connects.get(timeout=10)  # the client reconnects on its own (backoff starts at ~1 s)
    session.sim.state.set_price("NSE:INFY", 1455.0)
    tick = session.next_tick(INFY)
    while tick["last_price"] != 1455.0:
        tick = session.next_tick(INFY)

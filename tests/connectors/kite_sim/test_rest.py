"""The Kite REST surface, driven through the unmodified official `KiteConnect` client."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

from connectors.kite_sim import RunningSimulator
from connectors.kite_sim.instruments import CSV_HEADER
from tests.fixtures.simulator import SIM_START, SimAccount

REQUIRED_SYMBOLS = (
    "RELIANCE TCS INFY HDFCBANK ICICIBANK SBIN ITC LT AXISBANK KOTAKBANK BHARTIARTL WIPRO HINDUNILVR "
    "BAJFINANCE MARUTI TATAMOTORS SUNPHARMA ONGC NTPC POWERGRID"
).split()

MakeAccount = Callable[..., SimAccount]


def statuses(kite: KiteConnect, order_id: str) -> list[str]:
    return [h["status"] for h in kite.order_history(order_id)]


def place(kite: KiteConnect, **overrides: object) -> str:
    params: dict[str, object] = {
        "variety": "regular",
        "exchange": "NSE",
        "tradingsymbol": "INFY",
        "transaction_type": "BUY",
        "quantity": 10,
        "product": "MIS",
        "order_type": "MARKET",
        "market_protection": -1,  # required on MARKET and SL-M since April 2026
    }
    params.update(overrides)
    return str(kite.place_order(**params))


# --- session ---------------------------------------------------------------------------------------


def test_generate_session_with_right_checksum(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess1", api_secret="shh", user_id="AB1234", user_name="Asha B")
    kite = KiteConnect("sess1", root=simulator.rest_root)
    session = kite.generate_session(creds.request_token, "shh")
    assert isinstance(session["login_time"], datetime)
    for field in ("access_token", "user_id", "user_name", "email", "broker", "exchanges", "products"):
        assert session[field]
    assert session["user_id"] == "AB1234" and session["api_key"] == "sess1"
    assert {"order_types", "public_token", "refresh_token"} <= session.keys()
    assert kite.profile()["user_name"] == "Asha B"


def test_generate_session_wrong_checksum_is_token_exception(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess2", api_secret="right")
    kite = KiteConnect("sess2", root=simulator.rest_root)
    with pytest.raises(kex.TokenException) as err:
        kite.generate_session(creds.request_token, "wrong")
    assert err.value.code == 403


def test_request_token_is_single_use(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess3", api_secret="s")
    kite = KiteConnect("sess3", root=simulator.rest_root)
    kite.generate_session(creds.request_token, "s")
    with pytest.raises(kex.TokenException):
        KiteConnect("sess3", root=simulator.rest_root).generate_session(creds.request_token, "s")


def test_request_token_is_short_lived(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess4", api_secret="s")
    simulator.state.clock.advance(simulator.state.config.request_token_ttl_seconds + 1)  # type: ignore[attr-defined]
    with pytest.raises(kex.TokenException):
        KiteConnect("sess4", root=simulator.rest_root).generate_session(creds.request_token, "s")


def test_invalidated_token_fires_session_expiry_hook(kite_account: MakeAccount) -> None:
    account = kite_account()
    expired: list[bool] = []
    account.kite.set_session_expiry_hook(lambda: expired.append(True))
    assert account.kite.invalidate_access_token() is True
    with pytest.raises(kex.TokenException) as err:
        account.kite.profile()
    assert err.value.code == 403 and expired == [True]


def test_unknown_access_token_is_403(simulator: RunningSimulator) -> None:
    simulator.state.create_account("sess5")
    with pytest.raises(kex.TokenException) as err:
        KiteConnect("sess5", access_token="nope", root=simulator.rest_root).orders()
    assert err.value.code == 403


def test_access_token_expires_at_six_next_morning(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess6")
    kite = KiteConnect("sess6", access_token=creds.access_token, root=simulator.rest_root)
    assert kite.profile()["user_id"] == creds.user_id
    simulator.state.clock.advance(24 * 3600)  # type: ignore[attr-defined]
    with pytest.raises(kex.TokenException):
        kite.profile()


def test_login_page_redirects_with_a_request_token(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("sess7", api_secret="s", redirect_url="http://app.local/cb")
    response = httpx.get(f"{simulator.rest_root}/connect/login", params={"api_key": "sess7", "v": "3"})
    assert response.status_code == 302
    request_token = httpx.URL(response.headers["location"]).params["request_token"]
    kite = KiteConnect(creds.api_key, root=simulator.rest_root)
    assert kite.generate_session(request_token, "s")["access_token"]


# --- user ------------------------------------------------------------------------------------------


def test_profile_and_margins(kite_account: MakeAccount) -> None:
    account = kite_account(balance=250_000)
    kite = account.kite
    assert kite.profile()["user_id"] == account.credentials.user_id
    margins = kite.margins()
    assert margins["equity"]["net"] == 250_000 and "commodity" in margins
    assert kite.margins("equity")["available"]["opening_balance"] == 250_000
    with pytest.raises(kex.InputException) as err:
        kite.margins("crypto")
    assert err.value.code == 400


# --- orders ----------------------------------------------------------------------------------------


def test_market_order_fills_with_full_history(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    kite = kite_account(balance=100_000).kite
    order_id = place(kite, tag="buy1")
    history = kite.order_history(order_id)
    assert [h["status"] for h in history] == [
        "PUT ORDER REQ RECEIVED",
        "VALIDATION PENDING",
        "OPEN PENDING",
        "OPEN",
        "COMPLETE",
    ]
    assert [h["exchange_order_id"] is None for h in history] == [True, True, True, False, False]
    final = history[-1]
    assert final["average_price"] == 1500.0 and final["filled_quantity"] == 10 and final["tag"] == "buy1"
    assert isinstance(final["order_timestamp"], datetime)
    trades = kite.order_trades(order_id)
    assert len(trades) == 1 and trades[0]["quantity"] == 10 and trades[0]["average_price"] == 1500.0
    assert kite.trades()[0]["order_id"] == order_id
    positions = kite.positions()
    assert positions["net"][0]["quantity"] == 10 and positions["day"][0]["quantity"] == 10
    # MIS needs 20% of 15,000.
    assert kite.margins("equity")["net"] == 97_000
    assert [o["order_id"] for o in kite.orders()] == [order_id]


def test_market_order_slippage(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.config.slippage_ticks = 2
    simulator.state.set_price("NSE:SBIN", 800.0)
    kite = kite_account().kite
    buy = place(kite, tradingsymbol="SBIN")
    sell = place(kite, tradingsymbol="SBIN", transaction_type="SELL")
    assert kite.order_history(buy)[-1]["average_price"] == 800.10
    assert kite.order_history(sell)[-1]["average_price"] == 799.90
    net = kite.positions()["net"][0]
    assert net["quantity"] == 0 and net["realised"] == pytest.approx(-2.0)


def test_limit_order_rests_then_fills_on_price_move(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.set_price("NSE:TCS", 3400.0)
    kite = kite_account().kite
    order_id = place(kite, tradingsymbol="TCS", order_type="LIMIT", price=3390.0, quantity=2)
    assert statuses(kite, order_id)[-1] == "OPEN"
    state.set_price("NSE:TCS", 3395.0)
    state.step()
    assert statuses(kite, order_id)[-1] == "OPEN"
    state.set_price("NSE:TCS", 3385.0)
    state.step()
    final = kite.order_history(order_id)[-1]
    assert final["status"] == "COMPLETE" and final["average_price"] == 3385.0


def test_modify_then_cancel(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.set_price("NSE:ITC", 420.0)
    kite = kite_account().kite
    resting = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    assert kite.modify_order("regular", resting, quantity=5, price=401.0) == resting
    latest = kite.order_history(resting)[-1]
    assert latest["status"] == "OPEN" and latest["quantity"] == 5 and latest["price"] == 401.0
    assert kite.cancel_order("regular", resting) == resting
    history = statuses(kite, resting)
    assert history[-1] == "CANCELLED"
    with pytest.raises(kex.InputException):
        kite.cancel_order("regular", resting)
    with pytest.raises(kex.InputException):
        kite.modify_order("regular", resting, price=402.0)
    # A modification that makes the order marketable fills it.
    other = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    kite.modify_order("regular", other, price=425.0)
    assert kite.order_history(other)[-1]["average_price"] == 420.0


def test_stoploss_market_sell_triggers(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.set_price("NSE:RELIANCE", 1400.0)
    kite = kite_account().kite
    place(kite, tradingsymbol="RELIANCE")
    stop = place(kite, tradingsymbol="RELIANCE", transaction_type="SELL", order_type="SL-M", trigger_price=1390.0)
    assert statuses(kite, stop)[-1] == "TRIGGER PENDING"
    state.set_price("NSE:RELIANCE", 1389.0)
    state.step()
    final = kite.order_history(stop)[-1]
    assert final["status"] == "COMPLETE" and final["average_price"] == 1389.0
    assert kite.positions()["net"][0]["quantity"] == 0


def test_stoploss_limit_buy(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.set_price("NSE:LT", 3600.0)
    kite = kite_account().kite
    order_id = place(kite, tradingsymbol="LT", order_type="SL", trigger_price=3610.0, price=3615.0)
    assert statuses(kite, order_id)[-1] == "TRIGGER PENDING"
    state.set_price("NSE:LT", 3620.0)  # triggers, but above the limit: stays open
    state.step()
    assert statuses(kite, order_id)[-2:] == ["TRIGGER PENDING", "OPEN"]
    state.set_price("NSE:LT", 3612.0)
    state.step()
    assert kite.order_history(order_id)[-1]["average_price"] == 3612.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tradingsymbol": "NOSUCHCO"}, "does not exist"),
        ({"quantity": 0}, "Quantity should be greater than zero"),
        ({"tradingsymbol": "NIFTY 50"}, "index"),
        ({"quantity": 100_000, "product": "CNC"}, "Insufficient funds"),
        ({"order_type": "LIMIT", "price": 1500.03}, "tick size"),
        ({"order_type": "LIMIT"}, "Price should be greater than zero"),
        ({"order_type": "SL-M", "transaction_type": "SELL", "trigger_price": 1600.0}, "lower than the last"),
        ({"order_type": "SL-M", "trigger_price": 1400.0}, "higher than the last"),
    ],
)
def test_rejections_carry_a_human_message(
    simulator: RunningSimulator, kite_account: MakeAccount, overrides: dict[str, object], message: str
) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    kite = kite_account(balance=100_000).kite
    order_id = place(kite, **overrides)
    final = kite.order_history(order_id)[-1]
    assert final["status"] == "REJECTED"
    assert message in final["status_message"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"order_type": "STOP"},
        {"product": "MTF"},
        {"transaction_type": "HOLD"},
        {"quantity": "ten"},
        {"tag": "x" * 21},
        {"tag": "bad tag!"},
        {"variety": "co"},
        {"variety": "nonsense"},
        {"exchange": "NYSE"},
    ],
)
def test_malformed_orders_are_input_exceptions(kite_account: MakeAccount, overrides: dict[str, object]) -> None:
    kite = kite_account().kite
    with pytest.raises(kex.InputException) as err:
        place(kite, **overrides)
    assert err.value.code == 400


def test_amo_waits_for_the_market(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    clock = simulator.state.clock
    kite = kite_account().kite
    clock.set(SIM_START.replace(hour=8))  # type: ignore[attr-defined]  # before the open
    try:
        order_id = place(kite, variety="amo")
        simulator.state.step()
        assert statuses(kite, order_id)[-1] == "AMO REQ RECEIVED"
    finally:
        clock.set(SIM_START)  # type: ignore[attr-defined]
    simulator.state.step()
    assert statuses(kite, order_id)[-2:] == ["OPEN", "COMPLETE"]


def test_unknown_order_id(kite_account: MakeAccount) -> None:
    with pytest.raises(kex.InputException):
        kite_account().kite.order_history("999")


def test_orders_are_private_to_their_account(kite_account: MakeAccount) -> None:
    alice, bob = kite_account(), kite_account()
    order_id = place(alice.kite)
    with pytest.raises(kex.InputException):
        bob.kite.order_history(order_id)
    assert bob.kite.orders() == []


def test_rate_limit_is_ten_orders_per_second(kite_account: MakeAccount) -> None:
    kite = kite_account().kite
    for _ in range(10):
        place(kite, quantity=1)
    with pytest.raises(kex.NetworkException) as err:
        place(kite, quantity=1)
    assert err.value.code == 429 and "Too many requests" in str(err.value)


# --- portfolio and market data ---------------------------------------------------------------------


def test_holdings(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.set_price("NSE:WIPRO", 260.0)
    kite = kite_account(holdings=[("NSE:WIPRO", 100, 250.0)]).kite
    holding = kite.holdings()[0]
    assert holding["tradingsymbol"] == "WIPRO" and holding["quantity"] == 100
    assert holding["pnl"] == 1000.0


def test_quotes_are_keyed_by_exchange_symbol(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.set_price("NSE:INFY", 1512.35)
    simulator.state.config.read_limits_enabled = False  # the shapes here; quote's 1 a second in test_kite_rules
    kite = kite_account().kite
    ltp = kite.ltp("NSE:INFY", "NSE:NOSUCH")
    assert ltp == {"NSE:INFY": {"instrument_token": 408065, "last_price": 1512.35}}
    ohlc = kite.ohlc(["NSE:INFY", "BSE:INFY"])
    assert set(ohlc) == {"NSE:INFY", "BSE:INFY"} and ohlc["NSE:INFY"]["ohlc"]["high"] == 1512.35
    quote = kite.quote("NSE:INFY")["NSE:INFY"]
    assert quote["last_price"] == 1512.35 and len(quote["depth"]["buy"]) == 5
    assert isinstance(quote["timestamp"], datetime) and isinstance(quote["last_trade_time"], datetime)
    with pytest.raises(kex.InputException):
        kite.ltp()


def test_instruments_csv(simulator: RunningSimulator) -> None:
    kite = KiteConnect("anyone", root=simulator.rest_root)
    everything = kite.instruments()
    assert len(everything) >= 600
    nse = kite.instruments("NSE")
    by_symbol = {i["tradingsymbol"]: i for i in nse}
    for symbol in REQUIRED_SYMBOLS:
        row = by_symbol[symbol]
        assert row["instrument_token"] == (int(row["exchange_token"]) << 8) | 1
        assert (row["tick_size"], row["lot_size"], row["instrument_type"], row["segment"]) == (
            0.05,
            1,
            "EQ",
            "NSE",
        )
    assert all(i["exchange"] == "BSE" and i["instrument_token"] & 0xFF in (4, 9) for i in kite.instruments("BSE"))
    raw = kite._get("market.instruments.all")
    assert raw.decode().splitlines()[0] == CSV_HEADER
    with pytest.raises(kex.InputException):
        kite.instruments("XYZ")


def test_instrument_lookup_helpers(simulator: RunningSimulator) -> None:
    master = simulator.state.master
    infy = master.by_key("NSE:INFY")
    assert infy is not None and master.by_token(infy.instrument_token) is infy
    assert master.by_key("NSE:NOPE") is None


# --- the envelope for everything else ----------------------------------------------------------------


def test_unknown_routes_and_validation_errors_use_the_kite_envelope(simulator: RunningSimulator) -> None:
    for response in (
        httpx.get(f"{simulator.rest_root}/no/such/route"),
        httpx.post(f"{simulator.rest_root}/_sim/accounts", json={"balance": "lots"}),
        httpx.patch(f"{simulator.rest_root}/orders"),
    ):
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["status"] == "error" and body["error_type"] == "InputException" and body["message"]
        assert "detail" not in body


def test_checksum_is_sha256_of_key_token_secret(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("raw1", api_secret="sec")
    checksum = hashlib.sha256(("raw1" + creds.request_token + "sec").encode()).hexdigest()
    response = httpx.post(
        f"{simulator.rest_root}/session/token",
        data={"api_key": "raw1", "request_token": creds.request_token, "checksum": checksum},
        headers={"X-Kite-Version": "3"},
    )
    assert response.status_code == 200 and response.json()["status"] == "success"

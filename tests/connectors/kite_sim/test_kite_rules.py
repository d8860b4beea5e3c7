"""Kite's 2026 rules in the simulator, driven through the official client: market protection (and the band a
protected market order trades in), `algo_id`, and each rule's switch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

from connectors.kite_sim import RunningSimulator
from connectors.kite_sim.rules import NO_PROTECTION_MESSAGE
from core.clock import ManualClock
from tests.connectors.kite_sim.test_rest import place, statuses
from tests.fixtures.simulator import IST, SimAccount

MakeAccount = Callable[..., SimAccount]


# --- market protection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order_type", ["MARKET", "SL-M"])
@pytest.mark.parametrize("protection", [None, 0])
def test_market_and_slm_without_protection_are_refused(
    simulator: RunningSimulator, kite_account: MakeAccount, order_type: str, protection: int | None
) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    account = kite_account()
    with pytest.raises(kex.InputException) as refused:
        place(account.kite, order_type=order_type, trigger_price=1510.0, market_protection=protection)
    assert refused.value.code == 400
    assert str(refused.value) == NO_PROTECTION_MESSAGE
    assert account.kite.orders() == []  # refused, not placed
    (record,) = simulator.state.audit_records(api_key=account.api_key)
    assert (record.http_status, record.error_type, record.message) == (400, "InputException", NO_PROTECTION_MESSAGE)


@pytest.mark.parametrize("protection", [-1, 0.5, 2.25, 100])
def test_protection_of_minus_one_or_a_percentage_is_accepted(
    simulator: RunningSimulator, kite_account: MakeAccount, protection: float
) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    order_id = place(kite, market_protection=protection, algo_id="ALGO42")
    history = kite.order_history(order_id)
    assert history[-1]["status"] == "COMPLETE"
    assert {(h["market_protection"], h["algo_id"]) for h in history} == {(protection, "ALGO42")}
    (record,) = simulator.state.audit_records(api_key=kite.api_key)
    assert (record.params["market_protection"], record.params["algo_id"]) == (str(protection), "ALGO42")


@pytest.mark.parametrize("protection", [-2, 100.5, "true", "abc"])
def test_invalid_protection_is_refused(
    simulator: RunningSimulator, kite_account: MakeAccount, protection: object
) -> None:
    kite = kite_account().kite
    with pytest.raises(kex.InputException, match="market_protection"):
        place(kite, market_protection=protection)
    assert kite.orders() == []


def test_limit_orders_need_no_protection(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    order_id = place(kite, order_type="LIMIT", price=1500.0, market_protection=None)
    assert statuses(kite, order_id)[-1] == "COMPLETE"


def test_rule_switched_off_accepts_unprotected_orders(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    simulator.state.config.market_protection_required = False
    kite = kite_account().kite
    assert statuses(kite, place(kite, market_protection=None))[-1] == "COMPLETE"


# --- the band of a protected market order ----------------------------------------------------------------------


def test_protected_sell_rests_beyond_its_band_then_fills_inside_it(
    simulator: RunningSimulator, kite_account: MakeAccount
) -> None:
    """A fast move (the book swept as far again as the last step fell) leaves the SELL resting OPEN at its band;
    modify and cancel work on it, and a tick back inside the band fills it."""
    state = simulator.state
    state.config.fast_move_slippage = True
    state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    place(kite)  # the position to exit
    state.set_price("NSE:INFY", 1450.0)  # fell 50: a SELL now would sweep to 1400, beyond a 1% band (1435.50)
    exit_id = place(kite, transaction_type="SELL", market_protection=1)
    assert statuses(kite, exit_id)[-1] == "OPEN"
    assert kite.positions()["net"][0]["quantity"] == 10
    state.set_price("NSE:INFY", 1440.0)  # still falling: swept to 1430, below the band
    state.step()
    assert statuses(kite, exit_id)[-1] == "OPEN"
    state.set_price("NSE:INFY", 1445.0)  # a tick up: inside the band
    state.step()
    final = kite.order_history(exit_id)[-1]
    assert final["status"] == "COMPLETE" and final["average_price"] == 1445.0
    assert kite.positions()["net"][0]["quantity"] == 0


def test_resting_protected_order_can_be_modified_and_cancelled(
    simulator: RunningSimulator, kite_account: MakeAccount
) -> None:
    state = simulator.state
    state.config.fast_move_slippage = True
    state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    place(kite)
    state.set_price("NSE:INFY", 1400.0)
    chased = place(kite, transaction_type="SELL")  # automatic protection: 0.5% at this price
    assert statuses(kite, chased)[-1] == "OPEN"
    kite.modify_order("regular", chased, order_type="LIMIT", price=1400.0)  # re-priced at the price now: fills
    assert kite.order_history(chased)[-1]["status"] == "COMPLETE"

    place(kite)
    state.set_price("NSE:INFY", 1300.0)
    resting = place(kite, transaction_type="SELL")
    assert statuses(kite, resting)[-1] == "OPEN"
    kite.cancel_order("regular", resting)
    assert statuses(kite, resting)[-1] == "CANCELLED"


def test_band_switched_off_fills_at_any_price(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.fast_move_slippage = True
    state.config.market_protection_band = False
    state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    place(kite)
    state.set_price("NSE:INFY", 1450.0)
    exit_id = place(kite, transaction_type="SELL", market_protection=1)
    assert kite.order_history(exit_id)[-1]["average_price"] == 1400.0


def test_triggered_slm_rests_beyond_its_band(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.fast_move_slippage = True
    state.set_price("NSE:RELIANCE", 1400.0)
    kite = kite_account().kite
    place(kite, tradingsymbol="RELIANCE")
    stop = place(
        kite, tradingsymbol="RELIANCE", transaction_type="SELL", order_type="SL-M", trigger_price=1390.0,
        market_protection=1,
    )  # fmt: skip
    state.set_price("NSE:RELIANCE", 1350.0)  # gaps through the trigger: swept to 1300, below 1350 - 1%
    state.step()
    assert statuses(kite, stop)[-2:] == ["TRIGGER PENDING", "OPEN"]
    state.set_price("NSE:RELIANCE", 1345.0)  # a smaller step down: swept to 1340, inside the band (1336.50)
    state.step()
    final = kite.order_history(stop)[-1]
    assert final["status"] == "COMPLETE" and final["average_price"] == 1340.0


# --- modifications, market hours, the MIS square-off -----------------------------------------------------------


@pytest.fixture
def clock_restored(simulator: RunningSimulator) -> Iterator[ManualClock]:
    """The session's simulator clock, put back where it was after the test moves it."""
    clock = simulator.state.clock
    assert isinstance(clock, ManualClock)
    before = clock.now()
    yield clock
    clock.set(before)
    simulator.state.reset()


def test_an_order_is_modified_at_most_25_times(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.rate_limit_enabled = False  # 26 requests in a burst; the order caps are tested apart
    state.set_price("NSE:ITC", 420.0)
    kite = kite_account().kite
    order_id = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    for n in range(25):
        kite.modify_order("regular", order_id, price=380.0 + n * 0.05)
    with pytest.raises(kex.InputException, match="Maximum allowed order modifications exceeded"):
        kite.modify_order("regular", order_id, price=399.0)
    assert kite.order_history(order_id)[-1]["price"] == 381.2  # the 25th stands
    kite.cancel_order("regular", order_id)  # what is left: cancel and place anew
    assert statuses(kite, order_id)[-1] == "CANCELLED"
    (refused,) = [r for r in state.audit_records(api_key=kite.api_key) if r.outcome == "error"]
    assert (refused.action, refused.http_status) == ("modify", 400)

    state.config.modification_limit_enabled = False
    other = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    for _ in range(26):
        kite.modify_order("regular", other, price=390.0)


def test_regular_orders_outside_market_hours_are_refused_amo_accepted(
    simulator: RunningSimulator, kite_account: MakeAccount, clock_restored: ManualClock
) -> None:
    kite = kite_account().kite
    clock_restored.set(datetime(2025, 1, 6, 8, 30, tzinfo=IST))
    with pytest.raises(kex.InputException, match="Markets are closed"):
        place(kite)
    amo = place(kite, variety="amo")
    assert statuses(kite, amo)[-1] == "AMO REQ RECEIVED"
    clock_restored.set(datetime(2025, 1, 4, 11, 0, tzinfo=IST))  # a Saturday
    with pytest.raises(kex.InputException, match="Markets are closed"):
        place(kite, order_type="LIMIT", price=1500.0)
    simulator.state.config.market_hours_enforced = False
    assert place(kite)


def test_mis_positions_are_squared_off_at_the_cutoff_and_new_mis_refused(
    simulator: RunningSimulator, kite_account: MakeAccount, clock_restored: ManualClock
) -> None:
    state = simulator.state
    state.set_price("NSE:INFY", 1500.0)
    kite = kite_account().kite
    place(kite, tag="ours1")
    place(kite, tradingsymbol="SBIN", product="CNC", tag="ours2")
    resting = place(kite, order_type="LIMIT", price=1400.0, tag="ours3")
    clock_restored.set(datetime(2025, 1, 6, 15, 19, 59, tzinfo=IST))
    state.step()
    assert kite.positions()["net"][0]["quantity"] == 10  # not yet
    clock_restored.set(datetime(2025, 1, 6, 15, 20, tzinfo=IST))
    state.step()
    orders = kite.orders()
    (square_off,) = [o for o in orders if o["order_id"] in state.auto_square_offs]
    assert (square_off["transaction_type"], square_off["quantity"], square_off["status"]) == ("SELL", 10, "COMPLETE")
    assert square_off["tag"] is None and square_off["product"] == "MIS"
    assert statuses(kite, resting)[-1] == "CANCELLED"
    net = {p["tradingsymbol"]: p["quantity"] for p in kite.positions()["net"]}
    assert net == {"INFY": 0, "SBIN": 10}  # CNC is not squared off
    assert [r.action for r in state.audit_records(api_key=kite.api_key)] == ["place"] * 3  # nothing we sent
    with pytest.raises(kex.InputException, match="MIS orders are blocked after"):
        place(kite)
    assert place(kite, product="CNC")
    state.step()
    assert len(state.auto_square_offs) == 1  # once a day


def test_square_off_switched_off(
    simulator: RunningSimulator, kite_account: MakeAccount, clock_restored: ManualClock
) -> None:
    state = simulator.state
    state.config.mis_square_off_enabled = False
    kite = kite_account().kite
    place(kite)
    clock_restored.set(datetime(2025, 1, 6, 15, 25, tzinfo=IST))
    state.step()
    assert kite.positions()["net"][0]["quantity"] == 10 and place(kite)


# --- order caps and read limits ---------------------------------------------------------------------------------


def _rate_limited(call: Callable[[], object]) -> bool:
    try:
        call()
    except kex.NetworkException as exc:
        assert exc.code == 429
        return True
    return False


def test_per_minute_cap(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.orders_per_second = 100
    state.config.orders_per_minute = 5
    kite = kite_account().kite
    assert [_rate_limited(lambda: place(kite)) for _ in range(7)] == [False] * 5 + [True] * 2
    refused = [r for r in state.audit_records(api_key=kite.api_key) if r.http_status == 429]
    assert len(refused) == 2 and len(kite.orders()) == 5
    state.config.minute_limit_enabled = False
    assert not _rate_limited(lambda: place(kite))


def test_per_day_cap_counts_modify_and_cancel(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.orders_per_day = 3
    state.set_price("NSE:ITC", 420.0)
    kite = kite_account().kite
    order_id = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    kite.modify_order("regular", order_id, price=401.0)
    kite.cancel_order("regular", order_id)
    assert _rate_limited(lambda: place(kite))
    state.config.day_limit_enabled = False
    assert not _rate_limited(lambda: place(kite))


def test_per_second_limit_counts_modify_and_cancel(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    state = simulator.state
    state.config.orders_per_second = 2
    state.set_price("NSE:ITC", 420.0)
    kite = kite_account().kite
    order_id = place(kite, tradingsymbol="ITC", order_type="LIMIT", price=400.0)
    kite.modify_order("regular", order_id, price=401.0)
    assert _rate_limited(lambda: kite.cancel_order("regular", order_id))


def test_quotes_are_limited_to_one_a_second(simulator: RunningSimulator, kite_account: MakeAccount) -> None:
    kite = kite_account().kite
    assert not _rate_limited(lambda: kite.ltp(["NSE:INFY"]))
    assert _rate_limited(lambda: kite.quote(["NSE:INFY"]))
    assert kite.orders() == []  # other reads are not the quote family's
    simulator.state.config.read_limits_enabled = False
    assert not _rate_limited(lambda: kite.ohlc(["NSE:INFY"]))
    assert not _rate_limited(lambda: kite.ltp(["NSE:INFY"]))


def test_other_reads_are_limited_to_ten_a_second_apart_from_quotes(
    simulator: RunningSimulator, kite_account: MakeAccount
) -> None:
    simulator.state.config.other_reads_per_second = 3
    kite, other = kite_account().kite, kite_account().kite
    reads = [kite.orders, kite.positions, kite.profile]
    assert all(not _rate_limited(read) for read in reads)
    assert _rate_limited(kite.margins)  # the fourth read of any kind in the second
    assert not _rate_limited(lambda: kite.ltp(["NSE:INFY"]))  # quotes have a window of their own
    assert not _rate_limited(other.orders)  # and so has every api_key
    simulator.state.config.read_limits_enabled = False
    assert not _rate_limited(kite.trades)


# --- fields of Kite's fixtures -----------------------------------------------------------------------------------


def test_session_holdings_and_margins_carry_the_fixture_fields(simulator: RunningSimulator) -> None:
    creds = simulator.state.create_account("mock1", api_secret="s", holdings=[("NSE:INFY", 5, 1400.0)])
    kite = KiteConnect("mock1", root=simulator.rest_root)
    assert kite.generate_session(creds.request_token, "s")["silo"] == ""
    (holding,) = kite.holdings()
    assert holding["authorisation"] == {} and holding["short_quantity"] == 0
    assert holding["mtf"] == {"quantity": 0, "used_quantity": 0, "average_price": 0, "value": 0, "initial_margin": 0}
    margins = kite.margins()
    for part in ("available", "utilised"):
        assert margins["commodity"][part].keys() == margins["equity"][part].keys()

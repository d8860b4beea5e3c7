"""Kite's 2026 rules in the simulator, driven through the official client: market protection (and the band a
protected market order trades in), `algo_id`, and each rule's switch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kiteconnect import exceptions as kex

from connectors.kite_sim import RunningSimulator
from connectors.kite_sim.rules import NO_PROTECTION_MESSAGE
from tests.connectors.kite_sim.test_rest import place, statuses
from tests.fixtures.simulator import SimAccount

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

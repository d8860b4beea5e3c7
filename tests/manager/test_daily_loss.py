"""A trader's day P&L: realised from the fills of closed positions, unrealised from the last price of open ones."""

from __future__ import annotations

from decimal import Decimal

from storage.pnl import RunFills, Runs, day_pnl, open_instruments, run_pnl


def test_realised_and_unrealised_add_up_across_strategies_and_runs() -> None:
    runs: Runs = {
        # strategy 1, run 1: bought 10 at 100, stopped out at 95: -50 realised
        (1, 1): RunFills(
            "NSE:A", 10, [("BUY", "filled", Decimal("100"), "1"), ("STOPLOSS", "filled", Decimal("95"), "2")]
        ),
        # strategy 1 restarted (run 2): bought 10 at 96, open
        (1, 2): RunFills("NSE:A", 10, [("BUY", "filled", Decimal("96"), "3")]),
        # strategy 2: 5 bought at 200, open; a failed exit does not close it
        (2, 1): RunFills("NSE:B", 5, [("BUY", "filled", Decimal("200"), "4"), ("SELL", "failed", None, None)]),
        # strategy 3: its BUY was rejected: nothing held
        (3, 1): RunFills("NSE:C", 7, [("BUY", "rejected", None, None)]),
    }
    assert open_instruments(runs) == {"NSE:A", "NSE:B"}
    pnl = day_pnl(runs, {"NSE:A": 94.5, "NSE:B": 210.0})
    assert (pnl.realised, pnl.unrealised, pnl.total) == (-50.0, -15.0 + 50.0, -15.0)
    assert day_pnl(runs, {}).unrealised == 0.0  # no price known yet: nothing counted


def test_every_cycle_of_a_run_that_re_entered_counts() -> None:
    # Bought 10 at 100, stopped at 95 (-50); bought again at 95, stopped at 90 (-50); bought again at 90, open.
    history = [("BUY", "filled", Decimal("100"), "1"), ("STOPLOSS", "filled", Decimal("95"), "2"),
               ("BUY", "filled", Decimal("95"), "3"), ("STOPLOSS", "filled", Decimal("90"), "4"),
               ("BUY", "filled", Decimal("90"), "5")]  # fmt: skip
    pnl = day_pnl({(1, 1): RunFills("NSE:A", 10, history)}, {"NSE:A": 88.0})
    assert (pnl.realised, pnl.unrealised) == (-100.0, -20.0)
    run = run_pnl(RunFills("NSE:A", 10, history), {"NSE:A": 88.0})
    assert run is not None and (run.bought_quantity, run.sold_quantity, run.bought_value, run.sold_value) == (
        30,
        20,
        Decimal("2850.00"),
        Decimal("1850.00"),
    )


def test_a_run_is_one_lot_counted_in_exact_paise() -> None:
    closed = RunFills(
        "NSE:A", 3, [("BUY", "filled", Decimal("100.10"), "1"), ("TARGET", "filled", Decimal("100.30"), "2")]
    )
    pnl = run_pnl(closed, {"NSE:A": 1.0})
    assert pnl is not None and not pnl.open
    # 0.20 x 3 is 0.60 exactly (in floats 100.3 - 100.1 is 0.19999...).
    assert (pnl.bought_value, pnl.sold_value, pnl.realised, pnl.unrealised, pnl.last_price) == (
        Decimal("300.30"), Decimal("300.90"), Decimal("0.60"), Decimal("0"), None,
    )  # fmt: skip
    held = RunFills("NSE:A", 3, [("BUY", "filled", Decimal("100.10"), "1"), ("SELL", "rejected", None, None)])
    pnl = run_pnl(held, {"NSE:A": 99.95})
    assert pnl is not None and pnl.open
    assert (pnl.realised, pnl.unrealised, pnl.last_price) == (Decimal("0"), Decimal("-0.45"), Decimal("99.95"))
    assert run_pnl(RunFills("NSE:A", 3, [("BUY", "rejected", None, None)]), {}) is None

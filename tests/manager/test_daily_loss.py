"""A trader's day P&L: realised from the fills of closed positions, unrealised from the last price of open ones."""

from __future__ import annotations

from decimal import Decimal

from manager.daily_loss import Runs, day_pnl, open_instruments


def test_realised_and_unrealised_add_up_across_strategies_and_runs() -> None:
    runs: Runs = {
        # strategy 1, run 1: bought 10 at 100, stopped out at 95: -50 realised
        (1, 1): ("NSE:A", 10, [("BUY", "filled", Decimal("100"), "1"), ("STOPLOSS", "filled", Decimal("95"), "2")]),
        # strategy 1 restarted (run 2): bought 10 at 96, open
        (1, 2): ("NSE:A", 10, [("BUY", "filled", Decimal("96"), "3")]),
        # strategy 2: 5 bought at 200, open; a failed exit does not close it
        (2, 1): ("NSE:B", 5, [("BUY", "filled", Decimal("200"), "4"), ("SELL", "failed", None, None)]),
        # strategy 3: its BUY was rejected: nothing held
        (3, 1): ("NSE:C", 7, [("BUY", "rejected", None, None)]),
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
    pnl = day_pnl({(1, 1): ("NSE:A", 10, history)}, {"NSE:A": 88.0})
    assert (pnl.realised, pnl.unrealised) == (-100.0, -20.0)

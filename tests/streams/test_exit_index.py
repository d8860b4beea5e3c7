"""ExitIndex: a position's stop (price at or under) and target (at or above); the first reached takes both."""

from __future__ import annotations

from schemas.events import Action
from streams.exit_index import ExitIndex


def test_stop_and_target_each_exit_at_their_side() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:INFY", 1490.0, 1510.0)
    index.arm(2, "NSE:INFY", 1480.0, None)
    index.arm(3, "NSE:INFY", 1470.0, 1505.0)
    assert not index.crossed("NSE:INFY", 1500.0)
    assert index.trigger("NSE:INFY", 1500.0) == []
    assert index.trigger("NSE:INFY", 1505.0) == [(3, Action.TARGET)]
    assert 3 not in index  # its stop went with its target
    assert index.trigger("NSE:INFY", 1460.0) == [(2, Action.STOPLOSS), (1, Action.STOPLOSS)]
    assert len(index) == 0
    assert index.trigger("NSE:INFY", 1600.0) == []  # 1's target left with its stop


def test_a_target_ignores_prices_from_before_the_position() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:TCS", 3900.0, 4100.0, opened_at=100.0)
    assert index.trigger("NSE:TCS", 4150.0, seen_at=99.0) == []
    assert index.trigger("NSE:TCS", 4150.0, seen_at=101.0) == [(1, Action.TARGET)]


def test_rearming_without_a_target_drops_the_old_one() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:TCS", 3900.0, 4100.0)
    index.arm(1, "NSE:TCS", 3950.0, None)
    assert index.trigger("NSE:TCS", 4200.0) == []
    assert index.trigger("NSE:TCS", 3950.0) == [(1, Action.STOPLOSS)]

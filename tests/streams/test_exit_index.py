"""ExitIndex: a position's stop (price at or under) and target (at or above); the first reached takes both."""

from __future__ import annotations

from typing import Any

from schemas.events import Action, ExitKind
from streams.exit_index import ExitIndex, Trail


def pairs(hits: list[Any]) -> list[tuple[int, Action]]:
    return [(hit.strategy_id, hit.action) for hit in hits]


def test_stop_and_target_each_exit_at_their_side() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:INFY", 1490.0, 1510.0)
    index.arm(2, "NSE:INFY", 1480.0, None)
    index.arm(3, "NSE:INFY", 1470.0, 1505.0)
    assert not index.crossed("NSE:INFY", 1500.0)
    assert index.trigger("NSE:INFY", 1500.0) == []
    assert pairs(index.trigger("NSE:INFY", 1505.0)) == [(3, Action.TARGET)]
    assert 3 not in index  # its stop went with its target
    assert pairs(index.trigger("NSE:INFY", 1460.0)) == [(2, Action.STOPLOSS), (1, Action.STOPLOSS)]
    assert len(index) == 0
    assert index.trigger("NSE:INFY", 1600.0) == []  # 1's target left with its stop


def test_a_target_ignores_prices_from_before_the_position() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:TCS", 3900.0, 4100.0, opened_at=100.0)
    assert index.trigger("NSE:TCS", 4150.0, seen_at=99.0) == []
    assert pairs(index.trigger("NSE:TCS", 4150.0, seen_at=101.0)) == [(1, Action.TARGET)]


def test_rearming_without_a_target_drops_the_old_one() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:TCS", 3900.0, 4100.0)
    index.arm(1, "NSE:TCS", 3950.0, None)
    assert index.trigger("NSE:TCS", 4200.0) == []
    assert pairs(index.trigger("NSE:TCS", 3950.0)) == [(1, Action.STOPLOSS)]


def step(index: ExitIndex, instrument: str, price: float) -> list[Any]:
    return index.trigger(instrument, price) if index.crossed(instrument, price) else []


def test_a_trailing_stop_adds_to_the_stop_and_exits_at_the_higher_of_the_two() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:LT", 3450.0, None, trail=Trail(high=3500.0, points=20, activate_at=3520.0))
    assert step(index, "NSE:LT", 3515.0) == [] and index.level(1) == 3450.0  # not active yet: the stop alone
    assert step(index, "NSE:LT", 3560.0) == [] and index.level(1) == 3540.0
    [hit] = step(index, "NSE:LT", 3539.0)
    assert (hit.strategy_id, hit.action, hit.kind, hit.level) == (1, Action.STOPLOSS, ExitKind.TRAILING_STOP, 3540.0)
    assert 1 not in index and index.trails.level(1) is None


def test_move_to_cost_raises_the_stop_to_the_entry_once_the_price_is_far_enough_above_it() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:ITC", 440.0, 480.0, cost_at=455.0, entry=450.0)
    assert step(index, "NSE:ITC", 454.95) == [] and index.level(1) == 440.0
    assert step(index, "NSE:ITC", 455.0) == [] and index.level(1) == 450.0
    [hit] = step(index, "NSE:ITC", 449.5)
    assert (hit.action, hit.kind, hit.level) == (Action.STOPLOSS, ExitKind.COST_STOP, 450.0)
    assert step(index, "NSE:ITC", 490.0) == []  # its target went with it


def test_a_loss_limit_above_the_stop_is_the_stop_and_says_so() -> None:
    index = ExitIndex()
    index.arm(1, "NSE:WIPRO", 1400.0, loss_at=1475.0)
    index.arm(2, "NSE:WIPRO", 1480.0, loss_at=1475.0)  # its stop is higher: the loss limit adds nothing
    hits = sorted(step(index, "NSE:WIPRO", 1470.0), key=lambda hit: hit.strategy_id)
    assert [(h.strategy_id, h.kind, h.level) for h in hits] == [
        (1, ExitKind.LOSS_LIMIT, 1475.0),
        (2, ExitKind.STOP, 1480.0),
    ]

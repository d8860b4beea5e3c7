"""A stop or target given in points or percent becomes a price on the 0.05 tick, from the entry in paise."""

from __future__ import annotations

import pytest

from core.exit_prices import ExitRule


def test_an_absolute_stop_and_target_need_no_entry() -> None:
    rule = ExitRule(stop_loss=1480.05, target=1520.0)
    assert rule.stop_price(None) == 1480.05
    assert rule.target_price(None) == 1520.0


def test_relative_exits_wait_for_the_entry() -> None:
    rule = ExitRule(stop_loss_points=10, target_percent=2)
    assert rule.stop_price(None) is None
    assert rule.target_price(None) is None
    assert ExitRule(stop_loss=100).target_price(123.0) is None  # no target at all


@pytest.mark.parametrize(
    ("rule", "entry", "stop", "target"),
    [
        (ExitRule(stop_loss_points=12.5, target_points=20), 1000.0, 987.5, 1020.0),
        # 1497.10 * 0.985 = 1474.6435: rounded up to 1474.65 (a stop never further than asked)
        (ExitRule(stop_loss_percent=1.5, target_percent=1.5), 1497.10, 1474.65, 1519.55),
        # an average price off the tick: 1000.03 - 10 = 990.03 -> 990.05; + 10 = 1010.03 -> 1010.00
        (ExitRule(stop_loss_points=10, target_points=10), 1000.03, 990.05, 1010.0),
        # points beyond the entry still leave a stop: the lowest tick
        (ExitRule(stop_loss_points=500), 120.0, 0.05, None),
    ],
)
def test_relative_exits_resolve_on_the_tick(rule: ExitRule, entry: float, stop: float, target: float | None) -> None:
    assert rule.stop_price(entry) == stop
    assert rule.target_price(entry) == target


def test_the_entry_is_taken_in_paise_as_the_order_log_keeps_it() -> None:
    rule = ExitRule(stop_loss_percent=1)
    assert rule.stop_price(1000.004) == rule.stop_price(1000.00)


def test_a_loss_limit_is_the_price_at_which_the_position_has_lost_it() -> None:
    rule = ExitRule(stop_loss_points=100, max_loss=250)
    assert rule.loss_limit_price(1500.0, 10) == 1475.0
    assert rule.loss_limit_price(1500.0, 3) == 1416.7  # 1,416.666... rounded up: never a larger loss
    assert rule.loss_limit_price(None, 10) is None
    assert ExitRule(stop_loss=1400).loss_limit_price(1500.0, 10) is None

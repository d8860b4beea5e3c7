"""When a protected position's stop has risen a step: the thresholds are worked out in advance, so a tick that
reaches none costs a lookup, and the stop itself is always read from the exit index."""

from __future__ import annotations

from streams.exit_index import ExitIndex, Trail
from streams.stop_steps import StopSteps, _percent_high
from streams.trail_index import percent_level

INFY = "NSE:INFY"


def steps_over(prices: list[float], index: ExitIndex, steps: StopSteps) -> list[list[tuple[int, float]]]:
    seen = []
    for price in prices:
        index.crossed(INFY, price)
        seen.append(steps.risen(INFY, price, index))
    return seen


def test_a_trailing_stop_is_followed_once_per_step_of_its_rise() -> None:
    index, steps = ExitIndex(), StopSteps(step_ticks=20)  # a step of 1.00
    trail = Trail(high=1000.0, points=10.0)
    index.arm(1, INFY, 980.0, trail=trail)
    steps.follow(1, INFY, 980.0, trail=trail, cost_at=None, entry=1000.0)
    # Trailing from the entry at once: 990 at the first tick already, a step over 980. Then a step of the stop
    # (and of the high) at a time; a tick under the high changes nothing.
    risen = steps_over([990.0, 1000.95, 1001.0, 1001.5, 1001.95, 1002.0, 1001.0, 1005.0, 1005.05], index, steps)
    assert risen == [[(1, 990.0)], [], [(1, 991.0)], [], [], [(1, 992.0)], [], [(1, 995.0)], []]


def test_activation_percent_and_move_to_cost_thresholds() -> None:
    index, steps = ExitIndex(), StopSteps(step_ticks=1)
    activated = Trail(high=1000.0, points=10.0, activate_at=1020.0)
    index.arm(1, INFY, 950.0, trail=activated)
    steps.follow(1, INFY, 950.0, trail=activated, cost_at=None, entry=1000.0)
    index.arm(2, INFY, 882.0, cost_at=906.0, entry=900.0)
    steps.follow(2, "NSE:TCS", 882.0, trail=None, cost_at=906.0, entry=900.0)
    assert steps_over([1019.95, 1020.0, 1020.0], index, steps) == [[], [(1, 1010.0)], []]
    index.crossed("NSE:TCS", 906.0)
    assert steps.risen("NSE:TCS", 906.0, index) == [(2, 900.0)]
    assert len(steps) == 1  # moved to cost, it can rise no further: no longer followed
    for level in (95_000, 100_005, 123_450):
        for hundredths in (150, 600, 1000):
            high = _percent_high(level, hundredths)
            assert percent_level(high, hundredths) >= level > percent_level(high - 5, hundredths)


def test_an_exited_position_is_no_longer_followed() -> None:
    index, steps = ExitIndex(), StopSteps(step_ticks=1)
    trail = Trail(high=1000.0, points=10.0)
    index.arm(1, INFY, 980.0, trail=trail)
    steps.follow(1, INFY, 980.0, trail=trail, cost_at=None, entry=1000.0)
    index.crossed(INFY, 990.0)
    index.trigger(INFY, 990.0)
    assert steps_over([1000.0], index, steps) == [[]] and len(steps) == 0


def test_a_stop_already_a_step_up_when_armed_is_due_at_once_without_a_tick() -> None:
    index, steps = ExitIndex(), StopSteps(step_ticks=20)
    trail = Trail(high=1000.0, points=10.0)  # trailing from the entry: 990 at once, the SL-M at 980
    index.arm(1, INFY, 980.0, trail=trail)
    steps.follow(1, INFY, 980.0, trail=trail, cost_at=None, entry=1000.0)
    assert steps.due(1, index) == 990.0
    assert steps.due(1, index) is None  # sent: due again only a step further
    flat = Trail(high=1000.0, points=25.0)  # 975: under the SL-M's 980, nothing to raise
    index.arm(2, INFY, 980.0, trail=flat)
    steps.follow(2, INFY, 980.0, trail=flat, cost_at=None, entry=1000.0)
    assert steps.due(2, index) is None and steps.due(3, index) is None

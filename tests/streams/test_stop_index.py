"""StopIndex: a tick at price p triggers exactly the armed stops with stop_loss >= p, once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from streams.stop_index import StopIndex, to_paise


def test_triggers_exactly_the_stops_at_or_above_the_price() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1390.00)
    index.arm(2, "NSE:INFY", 1400.05)
    index.arm(3, "NSE:INFY", 1410.50)
    index.arm(4, "NSE:INFY", 1400.00)

    assert sorted(index.trigger("NSE:INFY", 1400.05)) == [2, 3]
    assert len(index) == 2
    assert 1 in index and 4 in index
    assert 2 not in index and 3 not in index


def test_a_price_equal_to_the_stop_triggers_it() -> None:
    index = StopIndex()
    index.arm(7, "NSE:SBIN", 812.35)
    assert index.trigger("NSE:SBIN", 812.40) == []
    assert index.trigger("NSE:SBIN", 812.35) == [7]


@pytest.mark.parametrize(
    ("tick", "triggers"),
    [
        (1399.9500001, True),  # float noise above the stop is the same paise
        (1399.9499999, True),
        (1399.95, True),
        (1399.96, False),
        (1400.00, False),
        (1399.94, True),
    ],
)
def test_prices_compare_in_paise(tick: float, triggers: bool) -> None:
    index = StopIndex()
    index.arm(11, "NSE:INFY", 1399.95)
    assert index.trigger("NSE:INFY", tick) == ([11] if triggers else [])
    assert (11 in index) is not triggers


def test_to_paise_absorbs_float_representation_error() -> None:
    assert to_paise(1399.95) == 139995
    assert to_paise(1399.9500001) == 139995
    assert to_paise(0.1 + 0.2) == 30
    assert to_paise(1e-9) == 0


def test_a_triggered_stop_is_removed_and_never_retriggers() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    assert index.trigger("NSE:INFY", 1399.0) == [1]
    assert index.trigger("NSE:INFY", 1399.0) == []
    assert index.trigger("NSE:INFY", 1.0) == []
    assert len(index) == 0
    assert 1 not in index


def test_a_non_triggering_tick_returns_nothing_and_changes_nothing() -> None:
    index = StopIndex()
    for sid in range(1_000):
        index.arm(sid, "NSE:INFY", 1000.0 + sid * 0.05)
    before = {sid: sid in index for sid in range(1_000)}

    assert index.trigger("NSE:INFY", 1000.0 + 1_000 * 0.05) == []  # above every stop
    assert index.trigger("NSE:TCS", 1.0) == []  # no stops on this instrument at all
    assert len(index) == 1_000
    assert {sid: sid in index for sid in range(1_000)} == before
    # The structure still answers correctly afterwards: the top stop is the only one at its price.
    assert index.trigger("NSE:INFY", 1000.0 + 999 * 0.05) == [999]


def test_disarm_removes_a_stop_and_reports_whether_it_was_armed() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    assert index.disarm(1) is True
    assert index.disarm(1) is False
    assert index.disarm(42) is False
    assert index.trigger("NSE:INFY", 1.0) == []
    assert len(index) == 0


def test_re_arming_moves_the_stop() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    index.arm(1, "NSE:INFY", 1350.0)  # trailing the stop down
    assert len(index) == 1
    assert index.trigger("NSE:INFY", 1380.0) == []  # the old level no longer triggers
    assert index.trigger("NSE:INFY", 1350.0) == [1]


def test_re_arming_on_another_instrument_leaves_nothing_behind_on_the_first() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    index.arm(1, "NSE:TCS", 3500.0)
    assert index.trigger("NSE:INFY", 1.0) == []
    assert index.trigger("NSE:TCS", 3500.0) == [1]


def test_disarm_then_arm_again_after_a_trigger() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    assert index.trigger("NSE:INFY", 1390.0) == [1]
    index.arm(1, "NSE:INFY", 1380.0)  # a new run arms again
    assert index.trigger("NSE:INFY", 1390.0) == []
    assert index.trigger("NSE:INFY", 1379.0) == [1]


def test_instruments_are_isolated() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    index.arm(2, "NSE:TCS", 1400.0)
    index.arm(3, "BSE:INFY", 1400.0)
    assert index.trigger("NSE:INFY", 1000.0) == [1]
    assert 2 in index and 3 in index
    assert index.trigger("NSE:TCS", 1000.0) == [2]
    assert index.trigger("BSE:INFY", 1000.0) == [3]


def test_many_strategies_with_the_same_stop_all_trigger_once() -> None:
    index = StopIndex()
    for sid in range(500):
        index.arm(sid, "NSE:INFY", 1400.0)
    hit = index.trigger("NSE:INFY", 1400.0)
    assert sorted(hit) == list(range(500))
    assert len(hit) == len(set(hit))
    assert len(index) == 0


def test_clear_forgets_everything() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0)
    index.arm(2, "NSE:TCS", 1400.0)
    index.clear()
    assert len(index) == 0
    assert index.trigger("NSE:INFY", 1.0) == []
    assert index.disarm(2) is False


# --------------------------------------------------------------------------------------- property test

INSTRUMENTS = ["NSE:INFY", "NSE:TCS", "BSE:INFY"]
STRATEGY_IDS = st.integers(min_value=0, max_value=30)
# Prices on the 5-paise tick grid around a level, plus float noise well under half a paise.
PRICES = st.builds(
    lambda ticks, noise: (100_000 + 5 * ticks) / 100 + noise,
    st.integers(min_value=-40, max_value=40),
    st.sampled_from([0.0, 1e-7, -1e-7, 0.0000001, -0.0000004]),
)


class StopIndexMachine(RuleBasedStateMachine):
    """Random arm/disarm/trigger sequences against a brute-force model: a dict of strategy -> stop."""

    def __init__(self) -> None:
        super().__init__()
        self.index = StopIndex()
        self.model: dict[int, tuple[str, int]] = {}

    @rule(sid=STRATEGY_IDS, instrument=st.sampled_from(INSTRUMENTS), stop=PRICES)
    def arm(self, sid: int, instrument: str, stop: float) -> None:
        self.index.arm(sid, instrument, stop)
        self.model[sid] = (instrument, round(stop * 100))

    @rule(sid=STRATEGY_IDS)
    def disarm(self, sid: int) -> None:
        assert self.index.disarm(sid) is (sid in self.model)
        self.model.pop(sid, None)

    @rule(instrument=st.sampled_from(INSTRUMENTS), price=PRICES)
    def trigger(self, instrument: str, price: float) -> None:
        paise = round(price * 100)
        expected = {sid for sid, (inst, stop) in self.model.items() if inst == instrument and stop >= paise}
        hit = self.index.trigger(instrument, price)
        assert len(hit) == len(set(hit)), "a strategy triggered twice in one tick"
        assert set(hit) == expected
        # Returned lowest stop first (the suffix of the sorted stops).
        assert [self.model[sid][1] for sid in hit] == sorted(self.model[sid][1] for sid in hit)
        for sid in expected:
            del self.model[sid]

    @invariant()
    def same_membership(self) -> None:
        assert len(self.index) == len(self.model)
        for sid in range(31):
            assert (sid in self.index) is (sid in self.model)


TestStopIndexAgainstModel = StopIndexMachine.TestCase
TestStopIndexAgainstModel.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@given(
    stops=st.lists(st.tuples(STRATEGY_IDS, PRICES), max_size=40),
    price=PRICES,
)
@settings(max_examples=200, deadline=None)
def test_one_tick_matches_brute_force(stops: list[tuple[int, float]], price: float) -> None:
    index = StopIndex()
    latest: dict[int, float] = {}
    for sid, stop in stops:
        index.arm(sid, "NSE:INFY", stop)
        latest[sid] = stop
    expected = {sid for sid, stop in latest.items() if to_paise(stop) >= to_paise(price)}
    assert set(index.trigger("NSE:INFY", price)) == expected
    assert len(index) == len(latest) - len(expected)
    assert index.trigger("NSE:INFY", price) == []


def test_a_price_seen_before_the_position_opened_never_triggers_its_stop() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0, opened_at=1_000.0)
    assert index.crossed("NSE:INFY", 1390.0)
    assert index.trigger("NSE:INFY", 1390.0, seen_at=999.9) == []
    assert 1 in index  # still armed, for the prices that come after
    assert index.trigger("NSE:INFY", 1390.0, seen_at=1_000.0) == [1]
    assert 1 not in index


def test_of_the_crossed_stops_only_those_open_by_the_tick_trigger() -> None:
    index = StopIndex()
    index.arm(1, "NSE:INFY", 1400.0, opened_at=100.0)
    index.arm(2, "NSE:INFY", 1410.0, opened_at=300.0)  # opened after the tick below
    index.arm(3, "NSE:INFY", 1420.0)  # no instant known (an older ARMED event): any price counts
    index.arm(4, "NSE:INFY", 1300.0, opened_at=100.0)  # not crossed
    assert sorted(index.trigger("NSE:INFY", 1395.0, seen_at=200.0)) == [1, 3]
    assert index.trigger("NSE:INFY", 1395.0, seen_at=200.0) == []
    assert index.trigger("NSE:INFY", 1405.0, seen_at=300.5) == [2]
    assert not index.crossed("NSE:INFY", 1300.05)
    assert index.trigger("NSE:INFY", 1299.0, seen_at=400.0) == [4]
    assert len(index) == 0

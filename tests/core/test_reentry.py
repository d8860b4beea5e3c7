"""Re-entry's rules without the pipeline: when a stopped-out cycle buys again, how the run's cycle and realised
loss derive from its order results, and how a later cycle's loss limit is lowered."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from core.reentry import ReentryMode, ReentryRule, loss_left
from manager.run_specs import armed_event
from schemas.events import (
    Action,
    LifecycleKind,
    OrderIntent,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    cycle_of,
    intent_id_for,
)
from storage.models import Strategy
from storage.positions import fold
from streams.execution.cycles import for_current_cycle, reentry_misfit
from streams.reentry_watch import stale_cycle

DAY = date(2025, 1, 15)
NOW = datetime(2025, 1, 15, 5, 0, tzinfo=UTC)


def spec(**fields: object) -> StrategySpec:
    return StrategySpec(strategy_id=7, user_id=3, exchange="NSE", tradingsymbol="INFY", instrument_token=1,
                        quantity=10, buy_time=time(9, 30), sell_time=time(15, 0), stop_loss=None,
                        stop_loss_points=10.0, **fields)  # type: ignore[arg-type]  # fmt: skip


def test_a_stopped_out_cycle_re_enters_while_re_entries_cut_off_and_loss_limit_allow() -> None:
    rule = ReentryRule(2, time(14, 0), ReentryMode.IMMEDIATE)
    assert rule.refusal(1, time(13, 59, 59), None) is None
    assert rule.refusal(2, time(10, 0), 500.0) is None
    assert rule.refusal(3, time(10, 0), None) == "all 2 re-entries used"
    assert rule.refusal(1, time(14, 0), None) == "re-entry cut-off 14:00:00 passed"
    assert rule.refusal(1, time(10, 0), 0.0) == "the loss limit is used up by earlier cycles"
    assert ReentryRule().refusal(1, time(10, 0), None) == "no re-entry configured"
    assert [rule.left(cycle) for cycle in (1, 2, 3, 4)] == [2, 1, 0, 0]


def test_the_realised_loss_lowers_the_limit_and_a_profit_does_not_raise_it() -> None:
    assert loss_left(1000.0, -300.0) == 700.0
    assert loss_left(1000.0, 250.0) == 1000.0
    assert loss_left(None, -300.0) is None


def test_cycles_and_realised_loss_derive_from_the_order_results() -> None:
    rows = [("BUY", "filled", 1000, "b1"), ("STOPLOSS", "filled", 990, "s1"), ("BUY", "skipped", None, None),
            ("BUY", "filled", 995, "b2")]  # fmt: skip
    position = fold(rows)
    assert (position.cycle, position.open, position.entry_price, position.realised(10)) == (2, True, 995.0, -100.0)
    position = fold([*rows, ("STOPLOSS", "filled", 985, "s2")])
    assert (position.cycle, position.exited, position.exit_action, position.realised(10)) == (
        2, True, "STOPLOSS", -200.0,
    )  # fmt: skip
    assert fold([]).cycle == 1


def test_a_later_cycle_is_armed_with_the_loss_limit_earlier_cycles_left() -> None:
    strategy = spec(max_loss=300.0)
    first = armed_event(strategy, 1, DAY, NOW, 1000.0, NOW)
    assert (first.cycle, first.loss_limit_price, first.stop_price) == (1, 970.0, 990.0)
    # Cycle 1 lost 100 (10 shares, 1000 -> 990): cycle 2, entered at 990, may lose 200 more: 20 a share.
    second = armed_event(strategy, 1, DAY, NOW, 990.0, NOW, cycle=2, realised=-100.0)
    assert (second.cycle, second.loss_limit_price, second.stop_price) == (2, 970.0, 980.0)


def test_intent_ids_name_their_cycle_and_read_back() -> None:
    first, third = intent_id_for(7, DAY, 2, Action.BUY), intent_id_for(7, DAY, 2, Action.BUY, 3)
    assert (first, third) == ("7:2025-01-15:2:BUY", "7:2025-01-15:2:c3:BUY")
    assert (cycle_of(first), cycle_of(third)) == (1, 3)


def test_a_time_exit_closes_the_current_cycle_under_that_cycle_s_id() -> None:
    sell = OrderIntent(intent_id=intent_id_for(7, DAY, 1, Action.SELL), strategy_id=7, user_id=3, run=1,
                       action=Action.SELL, trigger=Trigger.SCHEDULE, trading_day=DAY, instrument="NSE:INFY",
                       quantity=10, due_at=NOW, created_at=NOW)  # fmt: skip
    renamed = for_current_cycle(sell, fold([("BUY", "filled", 1000, "b1"), ("STOPLOSS", "filled", 990, "s1"),
                                            ("BUY", "filled", 995, "b2")]))  # fmt: skip
    assert (renamed.cycle, renamed.intent_id) == (2, "7:2025-01-15:1:c2:SELL")
    assert for_current_cycle(sell, fold([("BUY", "filled", 1000, "b1")])) is sell


@pytest.mark.parametrize(
    ("armed", "kind", "cycle", "stale"),
    [
        ({"run": 1, "cycle": 2}, LifecycleKind.REENTRY, 2, True),  # cycle 2 is bought: its re-entry is old news
        ({"run": 1, "cycle": 2}, LifecycleKind.ARMED, 1, True),
        ({"run": 1, "cycle": 2}, LifecycleKind.EXITED, 1, True),
        ({"run": 1, "cycle": 2, "reentry": True}, LifecycleKind.ARMED, 2, False),  # the watch gives way to it
        ({"run": 1, "cycle": 1}, LifecycleKind.REENTRY, 2, False),
        ({"run": 1, "cycle": 3}, LifecycleKind.STOPPED, 1, False),  # a stop always stops
        ({"run": 0, "cycle": 3}, LifecycleKind.ARMED, 1, False),  # another run
    ],
)
def test_an_event_about_an_earlier_cycle_leaves_a_later_one_armed(
    armed: dict[str, object], kind: LifecycleKind, cycle: int, stale: bool
) -> None:
    event = StrategyLifecycle(kind=kind, spec=spec(), run=1, cycle=cycle, trading_day=DAY, occurred_at=NOW)
    assert stale_cycle(armed, event) is stale


def test_a_re_entry_buy_fits_only_after_the_previous_cycle_s_stop_exit_and_before_the_cut_off() -> None:
    strategy = Strategy(reentry_max=1, reentry_until=time(14, 0), reentry_mode="immediate")
    buy = OrderIntent(intent_id=intent_id_for(7, DAY, 1, Action.BUY, 2), strategy_id=7, user_id=3, run=1, cycle=2,
                      action=Action.BUY, trigger=Trigger.RECOVERY, trading_day=DAY, instrument="NSE:INFY", quantity=10,
                      due_at=NOW, created_at=NOW)  # fmt: skip
    stopped = fold([("BUY", "filled", 1000, "b1"), ("STOPLOSS", "filled", 990, "s1")])
    assert reentry_misfit(buy, strategy, stopped, time(13, 59)) is None
    # Recovered after the cut-off: skipped (and the engine ends the strategy's day).
    assert reentry_misfit(buy, strategy, stopped, time(14, 0)) == "re-entry cut-off 14:00:00 passed"
    bought_again = fold(
        [("BUY", "filled", 1000, "b1"), ("STOPLOSS", "filled", 990, "s1"), ("BUY", "filled", 991, "b2")]
    )
    assert reentry_misfit(buy, strategy, bought_again, time(10, 0)) == "cycle 2 already bought"
    targeted = fold([("BUY", "filled", 1000, "b1"), ("TARGET", "filled", 1010, "t1")])
    assert reentry_misfit(buy, strategy, targeted, time(10, 0)) == "cycle 1 was not stopped out"
    still_open = fold([("BUY", "filled", 1000, "b1")])
    assert reentry_misfit(buy, strategy, still_open, time(10, 0)) == "cycle 1 was not stopped out"

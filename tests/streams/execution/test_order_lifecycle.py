"""The order state machine: every (state, event) pair is a transition or a refusal, and the rules that follow."""

from __future__ import annotations

import itertools
from datetime import date

import pytest

from schemas.events import Action, broker_tag_for, intent_id_for
from storage.models import StrategyStatus
from storage.runtime import RuntimeState
from streams.execution.order_lifecycle import (
    ATTEMPT_STATES,
    FINAL,
    RESULT_STATES,
    TRANSITIONS,
    UNCLEAR,
    WORKING,
    OrderEvent,
    OrderState,
    Refused,
    TrackedOrder,
    broker_event,
    strategy_state,
)

PAIRS = list(itertools.product(OrderState, OrderEvent))


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s.value}-{e.value}" for s, e in PAIRS])
def test_every_state_and_event_is_a_transition_or_a_refusal(state: OrderState, event: OrderEvent) -> None:
    order = TrackedOrder("1:2025-01-15:1:BUY", Action.BUY, "tag", state=state)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(Refused) as refused:
            order.apply(event)
        assert (refused.value.state, refused.value.event) == (state, event)
        assert order.state is state and order.history == []  # nothing applied
    else:
        assert order.apply(event) is expected
        assert order.history == [(state, event, expected)]


def test_an_order_is_sent_only_from_intended() -> None:
    assert {state for (state, event) in TRANSITIONS if event is OrderEvent.SEND} == {OrderState.INTENDED}


def test_a_sent_order_is_intended_again_only_when_nothing_reached_the_broker() -> None:
    into_intended = {(state, event) for (state, event), after in TRANSITIONS.items() if after is OrderState.INTENDED}
    assert into_intended == {
        (OrderState.SENDING, OrderEvent.NOT_FOUND),
        (OrderState.UNKNOWN, OrderEvent.NOT_FOUND),
        (OrderState.SENDING, OrderEvent.THROTTLED),  # a 429 is answered before the order is read
        (OrderState.SENDING, OrderEvent.UNSENT),  # the call was never made
    }


def test_final_states_refuse_every_event() -> None:
    assert not [pair for pair in TRANSITIONS if pair[0] in FINAL]


def test_a_given_up_order_stays_askable_and_a_late_fill_still_counts() -> None:
    order = TrackedOrder("i", Action.SELL, "t", state=OrderState.GIVEN_UP)
    assert order.state in UNCLEAR
    order.apply(OrderEvent.NOT_FOUND)
    assert order.state is OrderState.GIVEN_UP
    assert order.apply(OrderEvent.FILLED) is OrderState.FILLED


def test_every_state_is_reachable_from_intended() -> None:
    reached, frontier = {OrderState.INTENDED}, [OrderState.INTENDED]
    while frontier:
        state = frontier.pop()
        for (source, _), after in TRANSITIONS.items():
            if source is state and after not in reached:
                reached.add(after)
                frontier.append(after)
    assert reached == set(OrderState)


def test_the_order_log_words_cover_the_states_it_persists() -> None:
    persisted = set(ATTEMPT_STATES.values()) | set(RESULT_STATES.values())
    assert persisted == set(OrderState)


@pytest.mark.parametrize(
    ("status", "event"),
    [
        ("COMPLETE", OrderEvent.FILLED),
        ("REJECTED", OrderEvent.REJECTED),
        ("CANCELLED", OrderEvent.CANCELLED),
        ("TRIGGER PENDING", OrderEvent.TRIGGER_PENDING),
        ("OPEN", OrderEvent.ACKNOWLEDGED),
        ("OPEN PENDING", OrderEvent.ACKNOWLEDGED),
        ("VALIDATION PENDING", OrderEvent.ACKNOWLEDGED),
    ],
)
def test_kite_statuses_become_events(status: str, event: OrderEvent) -> None:
    assert broker_event(status) is event


@pytest.mark.parametrize(
    ("orders", "status", "expected"),
    [
        ({}, None, RuntimeState.IDLE),
        ({Action.BUY: OrderState.SENDING}, None, RuntimeState.BUYING),
        ({Action.BUY: OrderState.UNKNOWN}, None, RuntimeState.BUYING),
        ({Action.BUY: OrderState.SKIPPED}, None, RuntimeState.IDLE),
        ({Action.BUY: OrderState.FILLED}, None, RuntimeState.BOUGHT),
        ({Action.BUY: OrderState.FILLED, Action.PROTECT: OrderState.TRIGGER_PENDING}, None, RuntimeState.BOUGHT),
        ({Action.BUY: OrderState.FILLED, Action.SELL: OrderState.SENDING}, None, RuntimeState.SELLING),
        ({Action.BUY: OrderState.FILLED, Action.SELL: OrderState.OPEN}, None, RuntimeState.SELLING),
        ({Action.BUY: OrderState.FILLED, Action.SELL: OrderState.FILLED}, None, RuntimeState.SOLD),
        ({Action.BUY: OrderState.FILLED, Action.EXIT: OrderState.FILLED}, "stopped", RuntimeState.SOLD),
        ({Action.BUY: OrderState.FILLED, Action.STOPLOSS: OrderState.FILLED}, None, RuntimeState.EXITED_BY_SL),
        ({Action.BUY: OrderState.FILLED, Action.SELL: OrderState.GIVEN_UP}, "failed", RuntimeState.FAILED),
        ({}, StrategyStatus.STOPPED.value, RuntimeState.STOPPED),
    ],
)
def test_the_strategys_runtime_state_is_derived_from_its_orders(
    orders: dict[Action, OrderState], status: str | None, expected: RuntimeState
) -> None:
    assert strategy_state(orders, status) is expected


def test_unclear_states_are_exactly_those_the_broker_may_hold_unbeknown() -> None:
    assert UNCLEAR == {OrderState.SENDING, OrderState.UNKNOWN, OrderState.GIVEN_UP}


def test_a_cancelled_order_is_replaced_under_a_new_tag_and_a_live_or_filled_one_never_is() -> None:
    intent_id = intent_id_for(7, date(2025, 1, 15), 1, Action.SELL)
    first = TrackedOrder(intent_id, Action.SELL, broker_tag_for(intent_id), state=OrderState.OPEN, attempts=1)
    with pytest.raises(Refused):
        first.replacement()  # still working at the broker: a second order would be a second exit
    first.apply(OrderEvent.CANCELLED)
    second = first.replacement()
    assert (second.state, second.seq, second.attempts) == (OrderState.INTENDED, 2, 1)
    assert second.tag != first.tag and len(second.tag) == 20 and second.tag.isalnum()
    second.apply(OrderEvent.SEND)
    second.apply(OrderEvent.FILLED)
    with pytest.raises(Refused):
        second.replacement()


def test_intent_ids_name_the_cycle_and_keep_the_first_cycles_id() -> None:
    day = date(2025, 1, 15)
    assert intent_id_for(7, day, 2, Action.BUY) == "7:2025-01-15:2:BUY"  # rows and tags from before cycles
    assert intent_id_for(7, day, 2, Action.BUY, cycle=1) == "7:2025-01-15:2:BUY"
    assert intent_id_for(7, day, 2, Action.BUY, cycle=2) == "7:2025-01-15:2:c2:BUY"
    ids = {intent_id_for(7, day, run, action, cycle) for run in (1, 2) for action in Action for cycle in (1, 2, 3)}
    assert len(ids) == 2 * len(Action) * 3
    assert len({broker_tag_for(i, seq) for i in ids for seq in (1, 2)}) == len(ids) * 2
    with pytest.raises(ValueError, match="cycle"):
        intent_id_for(7, day, 2, Action.BUY, cycle=0)


def test_a_resting_order_is_repriced_or_cancelled_only_while_open() -> None:
    assert {state for (state, event) in TRANSITIONS if event is OrderEvent.REPRICE} == {OrderState.OPEN}
    # An open exit is cancelled to be chased; a protective stop out of modifications, to be placed anew.
    assert {state for (state, event) in TRANSITIONS if event is OrderEvent.CANCEL} == {
        OrderState.OPEN, OrderState.TRIGGER_PENDING,
    }  # fmt: skip
    assert TRANSITIONS[(OrderState.OPEN, OrderEvent.REPRICE)] is OrderState.OPEN


def test_a_protective_stop_is_modified_only_while_resting_and_its_answer_settles_it() -> None:
    assert {state for (state, event) in TRANSITIONS if event is OrderEvent.MODIFY} == {OrderState.TRIGGER_PENDING}
    order = TrackedOrder("1:2025-01-15:1:PROTECT", Action.PROTECT, "t1", state=OrderState.TRIGGER_PENDING)
    assert order.apply(OrderEvent.MODIFY) is OrderState.MODIFYING
    assert order.apply(OrderEvent.TIMED_OUT) is OrderState.MODIFYING  # modified or not: asked next time
    with pytest.raises(Refused):
        order.apply(OrderEvent.MODIFY)  # one modification in flight at a time
    assert order.apply(OrderEvent.TRIGGER_PENDING) is OrderState.TRIGGER_PENDING
    triggered = TrackedOrder("1:2025-01-15:1:PROTECT", Action.PROTECT, "t1", state=OrderState.MODIFYING)
    assert triggered.apply(OrderEvent.FILLED) is OrderState.FILLED  # executed while being modified
    with pytest.raises(Refused):
        triggered.replacement()
    order.apply(OrderEvent.CANCEL)
    with pytest.raises(Refused):
        order.replacement()  # never two live SL-M: only once the broker says it is cancelled
    order.apply(OrderEvent.CANCELLED)
    assert order.replacement().tag == broker_tag_for("1:2025-01-15:1:PROTECT", 2)
    assert ATTEMPT_STATES["modifying"] is OrderState.MODIFYING and OrderState.MODIFYING in WORKING


def test_an_order_being_cancelled_ends_as_the_broker_says_and_is_replaced_only_once_cancelled() -> None:
    order = TrackedOrder("1:2025-01-15:1:STOPLOSS", Action.STOPLOSS, "t1", state=OrderState.OPEN)
    order.apply(OrderEvent.CANCEL)
    assert order.apply(OrderEvent.ACKNOWLEDGED) is OrderState.CANCELLING  # still open: asked again
    assert order.apply(OrderEvent.TIMED_OUT) is OrderState.CANCELLING
    with pytest.raises(Refused):
        order.replacement()  # never two live orders
    filled = TrackedOrder("1:2025-01-15:1:STOPLOSS", Action.STOPLOSS, "t1", state=OrderState.CANCELLING)
    assert filled.apply(OrderEvent.FILLED) is OrderState.FILLED  # the fill came first: done, not replaced
    assert order.apply(OrderEvent.CANCELLED) is OrderState.CANCELLED
    assert order.replacement().seq == 2


def test_cancelling_is_persisted_and_counts_as_an_exit_in_flight() -> None:
    assert ATTEMPT_STATES["cancelling"] is OrderState.CANCELLING
    held = {Action.BUY: OrderState.FILLED, Action.STOPLOSS: OrderState.CANCELLING}
    assert strategy_state(held) is RuntimeState.SELLING

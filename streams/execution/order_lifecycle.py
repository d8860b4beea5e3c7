r"""One broker order's life, as a state machine: its states, the events that move it, and nothing else.

Every order the engine sends is tracked here, from the decision to the broker's last word on it. The order log
persists each state (the attempt rows while the order travels, the intent's result row once it settles), and
`TrackedOrder.apply` is the only way to change one: an event the current state has no transition for is
refused (`Refused`, logged by the caller), never applied.

```
INTENDED --send--> SENDING --acknowledged--> OPEN / TRIGGER_PENDING --filled--> FILLED
                      |  \--rejected / cancelled / filled--> ...           \--rejected / cancelled--> ...
                      |--timed out--> UNKNOWN --(asked by tag) found: its broker status / not found--> INTENDED
                      |--throttled (429: refused unread) / unsent (the call never started)--> INTENDED
                      '--given up--> GIVEN_UP --(asked again) found: its broker status
OPEN --reprice--> OPEN (a resting exit re-priced)     OPEN --cancel--> CANCELLING --cancelled--> CANCELLED (replaced)
                                                                                  \--filled--> FILLED
TRIGGER_PENDING --modify--> MODIFYING --trigger_pending--> TRIGGER_PENDING (a protective stop following the stop)
TRIGGER_PENDING --cancel--> CANCELLING --cancelled--> CANCELLED (out of modifications: placed anew)
```

Two rules follow from the table, and every path that sends orders relies on them:
- an order is sent only from INTENDED: an order whose fate is unclear (SENDING after a crash, UNKNOWN after a
  timeout) is first asked about by its tag, and only a "not found" lets it be sent again (or a 429, which the
  broker answers before reading the order, or a call that never started);
- FILLED, REJECTED, CANCELLED and SKIPPED are final: a redelivered or late event for them is refused.

The strategy's runtime state (idle, buying, bought, ...) is derived from its orders' states (`strategy_state`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from schemas.events import Action, broker_tag_for
from storage.models import StrategyStatus
from storage.runtime import RuntimeState


class OrderState(StrEnum):
    INTENDED = "intended"  # decided; nothing has left for the broker (or what left never arrived)
    SENDING = "sending"  # logged as sent; no answer yet (or its sender died waiting for one)
    UNKNOWN = "unknown"  # the call failed in transit (timeout, 5xx): the broker may hold the order
    OPEN = "open"  # the broker acknowledged it and it is working
    TRIGGER_PENDING = "trigger_pending"  # a stop order resting at the broker until its trigger price trades
    FILLED = "filled"
    REJECTED = "rejected"  # the broker refused it, or rejected it after accepting it
    CANCELLED = "cancelled"
    CANCELLING = "cancelling"  # a resting exit (or BUY) we asked the broker to cancel: ours to replace (or drop)
    MODIFYING = "modifying"  # a protective stop whose trigger we asked the broker to raise; no answer yet
    GIVEN_UP = "given_up"  # retries exhausted unanswered: failed for the trader, but asked again before any exit
    SKIPPED = "skipped"  # never sent: it did not fit the strategy's state, or was withdrawn before its time


class OrderEvent(StrEnum):
    SEND = "send"  # the attempt is logged; the broker call follows
    ACKNOWLEDGED = "acknowledged"  # the broker has it (an order id, or found by tag) and it is open
    TRIGGER_PENDING = "trigger_pending"  # ... and it rests until its trigger
    FILLED = "filled"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"  # a call about the order went unanswered
    THROTTLED = "throttled"  # the broker refused the call unread (429): nothing was placed
    UNSENT = "unsent"  # the call could not start within its attempt's window (`TrackedOrder.leave_by`): never made
    NOT_FOUND = "not_found"  # asked by tag, the broker has no such order
    GIVE_UP = "give_up"  # out of retries
    SKIP = "skip"  # does not fit / withdrawn before the call
    REPRICE = "reprice"  # a resting exit modified to a limit at the current price (Kite allows 25 per order)
    CANCEL = "cancel"  # a resting order is to be cancelled (an exit to be placed anew, a BUY dropped)
    MODIFY = "modify"  # a protective stop's trigger is to follow the position's risen stop


FINAL = frozenset({OrderState.FILLED, OrderState.REJECTED, OrderState.CANCELLED, OrderState.SKIPPED})
# States in which the broker may hold the order without our knowing its fate: ask by tag before anything else.
UNCLEAR = frozenset({OrderState.SENDING, OrderState.UNKNOWN, OrderState.GIVEN_UP})
WORKING = frozenset({OrderState.OPEN, OrderState.TRIGGER_PENDING, OrderState.CANCELLING, OrderState.MODIFYING})

_BROKER_ANSWERS = {
    OrderEvent.ACKNOWLEDGED: OrderState.OPEN,
    OrderEvent.TRIGGER_PENDING: OrderState.TRIGGER_PENDING,
    OrderEvent.FILLED: OrderState.FILLED,
    OrderEvent.REJECTED: OrderState.REJECTED,
    OrderEvent.CANCELLED: OrderState.CANCELLED,
}

TRANSITIONS: Mapping[tuple[OrderState, OrderEvent], OrderState] = {
    (OrderState.INTENDED, OrderEvent.SEND): OrderState.SENDING,
    (OrderState.INTENDED, OrderEvent.SKIP): OrderState.SKIPPED,
    # Refused before anything was sent (the broker session expired, the account is gone).
    (OrderState.INTENDED, OrderEvent.REJECTED): OrderState.REJECTED,
    (OrderState.INTENDED, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    **{(OrderState.SENDING, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.SENDING, OrderEvent.TIMED_OUT): OrderState.UNKNOWN,
    (OrderState.SENDING, OrderEvent.NOT_FOUND): OrderState.INTENDED,
    (OrderState.SENDING, OrderEvent.THROTTLED): OrderState.INTENDED,
    (OrderState.SENDING, OrderEvent.UNSENT): OrderState.INTENDED,
    (OrderState.SENDING, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    (OrderState.SENDING, OrderEvent.SKIP): OrderState.SKIPPED,  # withdrawn while held, before the call
    **{(OrderState.UNKNOWN, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.UNKNOWN, OrderEvent.TIMED_OUT): OrderState.UNKNOWN,
    (OrderState.UNKNOWN, OrderEvent.NOT_FOUND): OrderState.INTENDED,
    (OrderState.UNKNOWN, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    **{(OrderState.OPEN, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.OPEN, OrderEvent.TIMED_OUT): OrderState.OPEN,  # a status read went unanswered: still working
    (OrderState.OPEN, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    (OrderState.OPEN, OrderEvent.REPRICE): OrderState.OPEN,
    (OrderState.OPEN, OrderEvent.CANCEL): OrderState.CANCELLING,
    # Cancelling: the broker's answer settles it; a fill first means the exit is done, never replaced.
    **{(OrderState.CANCELLING, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.CANCELLING, OrderEvent.ACKNOWLEDGED): OrderState.CANCELLING,  # still open: the cancel is asked again
    (OrderState.CANCELLING, OrderEvent.TIMED_OUT): OrderState.CANCELLING,
    (OrderState.CANCELLING, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    **{(OrderState.TRIGGER_PENDING, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.TRIGGER_PENDING, OrderEvent.TIMED_OUT): OrderState.TRIGGER_PENDING,
    (OrderState.TRIGGER_PENDING, OrderEvent.GIVE_UP): OrderState.GIVEN_UP,
    # A protective stop follows a rising stop: modified (at most Kite's 25 times), then cancelled and placed anew.
    (OrderState.TRIGGER_PENDING, OrderEvent.MODIFY): OrderState.MODIFYING,
    (OrderState.TRIGGER_PENDING, OrderEvent.CANCEL): OrderState.CANCELLING,
    **{(OrderState.MODIFYING, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.MODIFYING, OrderEvent.TIMED_OUT): OrderState.MODIFYING,  # modified or not: its status read says
    **{(OrderState.GIVEN_UP, event): state for event, state in _BROKER_ANSWERS.items()},
    (OrderState.GIVEN_UP, OrderEvent.TIMED_OUT): OrderState.GIVEN_UP,
    (OrderState.GIVEN_UP, OrderEvent.NOT_FOUND): OrderState.GIVEN_UP,  # it may yet arrive: asked again later
}


class Refused(Exception):
    """An event the order's state has no transition for; nothing was changed."""

    def __init__(self, tag: str, state: OrderState, event: OrderEvent) -> None:
        super().__init__(f"order {tag}: {event.value} refused in state {state.value}")
        self.state = state
        self.event = event


def next_state(state: OrderState, event: OrderEvent) -> OrderState | None:
    """The state `event` moves an order in `state` to; None if the table refuses it."""
    return TRANSITIONS.get((state, event))


def broker_event(status: str) -> OrderEvent:
    """What an order-book status (Kite's words) tells the machine."""
    return {
        "COMPLETE": OrderEvent.FILLED,
        "REJECTED": OrderEvent.REJECTED,
        "CANCELLED": OrderEvent.CANCELLED,
        "TRIGGER PENDING": OrderEvent.TRIGGER_PENDING,
    }.get(status, OrderEvent.ACKNOWLEDGED)


@dataclass
class TrackedOrder:
    """One broker order of an intent: its tag, its state, and what the order log knows of it."""

    intent_id: str
    action: Action
    tag: str
    state: OrderState = OrderState.INTENDED
    attempts: int = 0  # attempts logged for the intent, across its orders
    recorded: bool = False  # the intent's result row exists
    sent_at: datetime | None = None  # when its last attempt was sent, while that attempt is unanswered
    # The last instant (time.monotonic()) this process may start the call of its last attempt: the attempt row
    # tells other processes the order left by `sent_at` plus a window (`Ledger.sent`), and the call keeps to it.
    leave_by: float | None = None
    # This process's monotonic instant of a send that failed in transit with no answer from the broker (a proxy
    # or connection dropped mid-request): the request may still be on its way.
    in_transit_since: float | None = None
    # A call of this order in this process could not start in its window (its grant came after it): from then on
    # its attempt rows are written only once the grant is in hand (`Placement`).
    late_call: bool = False
    order_id: str | None = None
    seq: int = 1  # which of the intent's broker orders this is (a cancelled one may be replaced)
    # Refused because the broker session had expired: a redelivery settling it tells the trader to reconnect.
    session_expired: bool = False
    history: list[tuple[OrderState, OrderEvent, OrderState]] = field(default_factory=list)

    def apply(self, event: OrderEvent) -> OrderState:
        """Move to the state `event` leads to; raises Refused (and changes nothing) if it leads nowhere."""
        after = next_state(self.state, event)
        if after is None:
            raise Refused(self.tag, self.state, event)
        self.history.append((self.state, event, after))
        self.state = after
        return after

    def replacement(self) -> TrackedOrder:
        """The intent's next broker order, once this one is off the book unfilled (cancelled or rejected): one
        decision never has two live orders, and a filled one is never replaced."""
        if self.state not in (OrderState.CANCELLED, OrderState.REJECTED):
            raise Refused(self.tag, self.state, OrderEvent.SEND)
        seq = self.seq + 1
        return TrackedOrder(self.intent_id, self.action, broker_tag_for(self.intent_id, seq), attempts=self.attempts,
                            seq=seq)  # fmt: skip

    @property
    def final(self) -> bool:
        return self.state in FINAL


# The order log's words for each state (attempt rows while the order travels, the result row once it settles).
# The words predate the machine; today's rows read the same way.
ATTEMPT_STATES = {
    "requested": OrderState.INTENDED,  # attempt 0: a square-off recorded before it went out on Kafka
    "unsent": OrderState.INTENDED,  # the call was never made (its message says why)
    "throttled": OrderState.INTENDED,  # refused unread at the broker's rate limit: nothing placed
    "sending": OrderState.SENDING,
    "unclear": OrderState.UNKNOWN,
    "placed": OrderState.OPEN,
    "refused": OrderState.REJECTED,
    "expired": OrderState.REJECTED,  # refused because the trader's broker session had expired (`session_expired`)
    "withdrawn": OrderState.SKIPPED,
    "resting": OrderState.TRIGGER_PENDING,
    "cancelling": OrderState.CANCELLING,
    # Cancelled by us, its intent not settled: a resting exit (or protective stop) to be placed anew.
    "cancelled": OrderState.CANCELLED,
    "modifying": OrderState.MODIFYING,
}
RESULT_STATES = {
    "placed": OrderState.OPEN,
    "filled": OrderState.FILLED,
    "rejected": OrderState.REJECTED,
    "failed": OrderState.GIVEN_UP,
    "skipped": OrderState.SKIPPED,
    "cancelled": OrderState.CANCELLED,
}


EXITED_STATE = {Action.STOPLOSS: RuntimeState.EXITED_BY_SL, Action.TARGET: RuntimeState.EXITED_BY_TARGET}


def strategy_state(
    orders: Mapping[Action, OrderState] | Iterable[tuple[Action, OrderState]], status: str | None = None
) -> RuntimeState:
    """A strategy run's runtime state, from its orders' states (and its status, for a stop or a failure)."""
    states = dict(orders.items() if isinstance(orders, Mapping) else orders)
    if status == StrategyStatus.FAILED.value:
        return RuntimeState.FAILED
    exits = {action: state for action, state in states.items() if action.is_exit and action is not Action.PROTECT}
    filled_exit = next((action for action, state in exits.items() if state is OrderState.FILLED), None)
    buy = states.get(Action.BUY)
    if filled_exit is not None:
        return EXITED_STATE.get(filled_exit, RuntimeState.SOLD)
    if buy in (OrderState.FILLED, OrderState.OPEN):
        in_flight = any(state in UNCLEAR or state in WORKING for state in exits.values())
        return RuntimeState.SELLING if in_flight else RuntimeState.BOUGHT
    if status == StrategyStatus.STOPPED.value:
        return RuntimeState.STOPPED
    if buy in UNCLEAR or buy is OrderState.TRIGGER_PENDING:
        return RuntimeState.BUYING
    return RuntimeState.IDLE

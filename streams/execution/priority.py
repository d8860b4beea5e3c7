"""Which order work goes first, and priority inheritance within a strategy's lane.

STOPLOSS and TARGET outrank SELL/EXIT, which outrank BUY, for an execution slot, a user's turn and a user's
broker rate budget. A chase step (modify or cancel of a resting exit) waits behind the placements of its class.

A strategy's intents run strictly in order in its lane, so a stop crossed while the same position's time exit is
still waiting for its turn would wait behind that SELL, itself behind every other STOPLOSS of the trader (crash
matrix: the SELL reached the broker 8 s after the restart and the stop's exit never left). Either exit closes the
position, so the running exit inherits the most urgent priority queued behind it: its waits in the queues it is in
are moved up, and the waits it starts later use that priority. The running intent of a strategy carries an
`Urgency` in its task's context; the gates and the rate limiter read it. A BUY inherits for an execution slot and a
turn (a redelivered BUY copy ahead of its strategy's STOPLOSS), never for the trader's broker budget: it would spend
the exits' reserve of the trader's day.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from schemas.events import Action

# A RAISE_STOP's modification of the protective SL-M comes after every exit (and every chase step) and before
# BUYs; like a BUY it leaves the minute's and the day's exit reserve alone, so following a stop never takes an
# exit's room.
PRIORITY = {
    Action.STOPLOSS: 0, Action.TARGET: 0, Action.EXIT: 2, Action.SELL: 2, Action.PROTECT: 2, Action.RAISE_STOP: 4,
    Action.BUY: 5,
}  # fmt: skip
BUY_PRIORITY = PRIORITY[Action.BUY]
# A BUY that an earlier delivery sent (its worker died, or its answer was lost) is a reconciliation, not a new
# order: until the broker says whether it holds it, the position it may have opened is unknown, and so is the stop
# that protects it, as exposed as a crossed stop. It goes with the STOPLOSS exits, never behind the time exits and
# BUYs that pile up after a restart, nor stepping aside for the exits of other positions (crash matrix: thirty such
# BUYs recorded 12 s after the system was up, their stops crossed meanwhile). Asking spends no order budget; sent
# again, it spends at a BUY's priority.
RECONCILE_PRIORITY = PRIORITY[Action.STOPLOSS]
RESERVED_FROM = PRIORITY[Action.RAISE_STOP]  # calls of this priority and lower leave the exit reserve alone


def chase_priority(action: Action) -> int:
    """A chase step waits behind the placements of its own class: a position with no order at the broker yet is
    more exposed than one whose exit rests there. In a fast move a trader's chased exits otherwise spent the
    per-second budget that a newly crossed stop was waiting for."""
    return PRIORITY[action] + 1


class Urgency:
    """The priority a running exit works at: its own, or a more urgent exit's of the same strategy queued behind
    it. Each queue the exit waits in registers how to move the wait up (`waiting`)."""

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self._requeues: list[Callable[[int], None]] = []

    def raise_to(self, priority: int) -> None:
        if priority >= self.priority:
            return
        self.priority = priority
        for requeue in list(self._requeues):
            requeue(priority)

    @contextlib.contextmanager
    def waiting(self, requeue: Callable[[int], None]) -> Iterator[None]:
        self._requeues.append(requeue)
        try:
            yield
        finally:
            self._requeues.remove(requeue)


_CURRENT: ContextVar[Urgency | None] = ContextVar("urgency", default=None)


@contextlib.contextmanager
def inherited(urgency: Urgency | None) -> Iterator[None]:
    """Run the block (one intent's execution) with `urgency` as the priority its waits may inherit."""
    token = _CURRENT.set(urgency)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def raise_current(priority: int) -> None:
    """Raise the running intent's urgency (if it runs in a lane) to `priority` for the rest of its waits."""
    urgency = _CURRENT.get()
    if urgency is not None:
        urgency.raise_to(priority)


def urgent() -> bool:
    """The running intent works at a STOPLOSS's priority: a stop's exit, a BUY being reconciled, or any intent a
    STOPLOSS of its strategy waits behind."""
    urgency = _CURRENT.get()
    return urgency is not None and urgency.priority <= PRIORITY[Action.STOPLOSS]


def effective(priority: int, *, spends_budget: bool = False) -> tuple[int, Urgency | None]:
    """The priority to wait at, and the urgency that may raise it while waiting (None: it cannot be raised).
    `spends_budget`: a wait for the trader's broker budget, where a BUY never inherits (it would spend the exits'
    reserve); for an execution slot or a turn it does (a BUY copy ahead of its own strategy's STOPLOSS in the lane
    is dropped unsent once it runs, and must not wait behind every other exit first)."""
    urgency = _CURRENT.get()
    if urgency is None or (spends_budget and priority >= BUY_PRIORITY):
        return priority, None
    return min(priority, urgency.priority), urgency


def waiting_in(urgency: Urgency | None, requeue: Callable[[int], None]) -> contextlib.AbstractContextManager[None]:
    return urgency.waiting(requeue) if urgency is not None else contextlib.nullcontext()


__all__ = [
    "BUY_PRIORITY",
    "PRIORITY",
    "RECONCILE_PRIORITY",
    "RESERVED_FROM",
    "Urgency",
    "chase_priority",
    "effective",
    "inherited",
    "raise_current",
    "urgent",
    "waiting_in",
]

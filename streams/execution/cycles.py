"""Which entry/exit cycle an intent belongs to, and whether a re-entry BUY still fits (core/reentry.py).

The run's current cycle is derived from its orders (`RunPosition.cycle`: each holding BUY begins one)."""

from __future__ import annotations

from datetime import time

from schemas.events import Action, OrderIntent, intent_id_for
from storage.models import Strategy
from storage.positions import RunPosition

REENTRY_CUTOFF = "re-entry cut-off"
FLAT_AT_SELL = "flat at sell_time"


def for_current_cycle(intent: OrderIntent, position: RunPosition) -> OrderIntent:
    """A time exit (SELL) is the clock's decision, not a cycle's: the scheduler and recovery name none, and it
    closes whichever cycle is current. Renamed for it, every delivery of it names the same intent (once the SELL
    has settled, the day is over and the cycle no longer changes)."""
    if intent.action is not Action.SELL or intent.cycle == position.cycle:
        return intent
    intent_id = intent_id_for(intent.strategy_id, intent.trading_day, intent.run, Action.SELL, position.cycle)
    return intent.model_copy(update={"cycle": position.cycle, "intent_id": intent_id})


def reentry_misfit(intent: OrderIntent, strategy: Strategy, position: RunPosition, local_now: time) -> str | None:
    """Why the BUY of cycle n (n >= 2) is not placed now; None if it is. It follows only cycle n-1's stop exit."""
    if position.bought and position.cycle >= intent.cycle:
        return f"cycle {intent.cycle} already bought"
    if position.cycle != intent.cycle - 1 or not position.exited or position.exit_action != Action.STOPLOSS.value:
        return f"cycle {intent.cycle - 1} was not stopped out"
    rule = strategy.reentry
    if rule.left(position.cycle) <= 0:
        return f"all {rule.max_reentries} re-entries used"
    if rule.past_cutoff(local_now):
        return f"{REENTRY_CUTOFF} {rule.until:%H:%M:%S} passed"
    return None

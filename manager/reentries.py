"""The follow-ups of a re-entry decision (core/reentry.py), built in one place for the engine and recovery.

The decision itself is made once, by the execution engine, when it records a cycle's filled STOPLOSS: in the
same transaction as that exit's result row the strategy either ends its day (status `completed`) or stays
`running`. A running strategy whose current cycle was stopped out *is* the persisted decision "buy again".
What follows from it is derived from that state and idempotent, so it can be repeated after any crash:
- `immediate`: the next cycle's BUY intent on `orders` (its id names the cycle: one order however often it is
  published);
- `at_entry`: a REENTRY lifecycle event; the worker that owns the instrument's ticks watches for a tick at or
  above the previous entry and then publishes that same BUY intent.
The engine checks the cut-off again when it executes the BUY: past it, the BUY is skipped and the day ends.
"""

from __future__ import annotations

from datetime import date, datetime

from core.reentry import ReentryMode
from schemas.events import (
    Action,
    Event,
    LifecycleKind,
    OrderIntent,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    intent_id_for,
)
from storage.models import Strategy, StrategyStatus
from storage.positions import RunPosition

ORDERS_TOPIC = "orders"
LIFECYCLE_TOPIC = "strategy-lifecycle"


def reentry_intent(
    strategy_id: int, user_id: int, instrument: str, quantity: int, run: int, trading_day: date, cycle: int,
    now: datetime, trigger: Trigger, trigger_price: float | None = None,
) -> OrderIntent:  # fmt: skip
    """The BUY of `cycle` (2 or more): due when decided, so no BUY-time grace applies to it."""
    return OrderIntent(
        intent_id=intent_id_for(strategy_id, trading_day, run, Action.BUY, cycle), strategy_id=strategy_id,
        user_id=user_id, run=run, cycle=cycle, action=Action.BUY, trigger=trigger, trading_day=trading_day,
        instrument=instrument, quantity=quantity, due_at=now, created_at=now, trigger_price=trigger_price,
    )  # fmt: skip


def reentry_event(
    spec: StrategySpec, run: int, trading_day: date, cycle: int, now: datetime, previous_entry: float | None,
) -> StrategyLifecycle:  # fmt: skip
    """REENTRY: the previous cycle's exits are disarmed and the jobs kept; in at_entry mode it carries the price
    the next BUY waits for."""
    at_entry = spec.reentry_mode is ReentryMode.AT_ENTRY
    return StrategyLifecycle(
        kind=LifecycleKind.REENTRY, spec=spec, run=run, cycle=cycle, trading_day=trading_day, occurred_at=now,
        opened_at=now, entry_price=previous_entry, reentry_price=previous_entry if at_entry else None,
        reason=f"re-entry {cycle - 1} of {spec.reentry_max}",
    )  # fmt: skip


def follow_ups(
    spec: StrategySpec, run: int, trading_day: date, cycle: int, now: datetime, previous_entry: float | None,
    trigger: Trigger,
) -> list[tuple[str, str | int, Event]]:  # fmt: skip
    """What a decision to buy `cycle` publishes: the REENTRY event, and in immediate mode the BUY itself."""
    items: list[tuple[str, str | int, Event]] = [
        (LIFECYCLE_TOPIC, spec.instrument, reentry_event(spec, run, trading_day, cycle, now, previous_entry))
    ]
    if spec.reentry_mode is ReentryMode.IMMEDIATE:
        buy = reentry_intent(spec.strategy_id, spec.user_id, spec.instrument, spec.quantity, run, trading_day, cycle,
                             now, trigger)  # fmt: skip
        items.append((ORDERS_TOPIC, spec.strategy_id, buy))
    return items


def awaiting_reentry(strategy: Strategy, position: RunPosition) -> bool:
    """Running, with its current cycle stopped out: the engine decided to buy again (see the module's doc)."""
    return (
        strategy.status == StrategyStatus.RUNNING.value
        and (strategy.reentry_max or 0) > 0
        and position.exited
        and position.exit_action == Action.STOPLOSS.value
    )

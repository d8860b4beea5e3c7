"""The worker's side of an at_entry re-entry: a watch in the exit index for a tick back at the previous entry,
and the rule that a lifecycle event about an older cycle leaves a newer one's exits alone."""

from __future__ import annotations

from typing import Any

from schemas.events import LifecycleKind, StrategyLifecycle


def reentry_watch(event: StrategyLifecycle) -> dict[str, Any]:
    """The `armed-stops` entry of a REENTRY in at_entry mode: no stop (0.0 is never reached), a target-like level
    at the previous entry; its hit is the next cycle's BUY, not a TARGET. Only ticks from the stop exit on count."""
    return {
        "instrument": event.spec.instrument,
        "stop_loss": 0.0,
        "target": event.reentry_price,
        "reentry": True,
        "user_id": event.spec.user_id,
        "run": event.run,
        "cycle": event.cycle,
        "trading_day": event.trading_day.isoformat(),
        "quantity": event.spec.quantity,
        "opened_at": event.opened_at.timestamp() if event.opened_at else None,
    }


def stale_cycle(armed: dict[str, Any] | None, event: StrategyLifecycle) -> bool:
    """An ARMED, REENTRY or EXITED of the run's earlier cycle arriving after a later cycle was armed (recovery or
    a repair re-announcing it) must not disarm the later position's exits."""
    if armed is None or event.kind is LifecycleKind.STARTED or armed.get("run") != event.run:
        return False
    if event.kind in (LifecycleKind.STOPPED, LifecycleKind.FAILED):
        return False
    armed_cycle = int(armed.get("cycle", 1))
    # A watch for cycle n is superseded by cycle n's ARMED; a position of cycle n by anything about n-1 or before.
    return event.cycle < armed_cycle or (event.cycle == armed_cycle and event.kind is LifecycleKind.REENTRY
                                          and not armed.get("reentry"))  # fmt: skip

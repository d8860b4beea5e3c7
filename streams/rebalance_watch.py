"""A rebalance that does not complete: the worker's stops go unchecked, and the operator hears where it hangs.

The tick feed reads a worker's `ticks` partitions only once Faust has recovered the `armed-stops` table of the
partitions it was given (`on_rebalance_complete`, streams/tick_feed.py). Until then the stops of those instruments
are checked by no one. Faust logs its recovery at INFO, which this project keeps quiet (core/logs.py), so a
recovery that hangs would be silent: this watch says so, with the recovery's own state (which changelog
partitions it still waits for, and how far), every STALLED_SECONDS while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

log = logging.getLogger(__name__)

STALLED_SECONDS = 10.0  # a rebalance here completes in 1 to 5 s (crash matrix, three workers)
CHECK_SECONDS = 1.0


class RebalanceWatch:
    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.assigned_at: float | None = None  # time.monotonic() of an assignment not yet followed by completion
        self._said_at = 0.0

    def assigned(self) -> None:
        if self.assigned_at is None:
            self.assigned_at = time.monotonic()

    def completed(self) -> None:
        if self.assigned_at is not None and (took := time.monotonic() - self.assigned_at) >= STALLED_SECONDS:
            log.warning("rebalance completed after %.1fs: this worker's stops are checked again", took)
        self.assigned_at = None

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.assigned_at is None else now - self.assigned_at

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            now = time.monotonic()
            if self.stalled_for(now) >= STALLED_SECONDS and now - self._said_at >= STALLED_SECONDS:
                self._said_at = now
                log.error("rebalance not completed %.0fs after this worker's partitions were assigned: the stops of "
                          "its instruments are not being checked; %s", self.stalled_for(now),
                          recovery_state(self.app))  # fmt: skip


def recovery_state(app: faust.App) -> str:
    """What Faust's table recovery is doing, from its own attributes (best effort: they are not public API)."""
    try:
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
        remaining = {f"{tp.topic}[{tp.partition}]": n for tp, n in recovery.active_remaining().items() if n}
        flags = {
            "recovery started": recovery.signal_recovery_start.is_set(),
            "actives caught up": recovery.signal_recovery_end.is_set(),
            "completed": recovery.completed.is_set(),
        }
        assignment = sorted(f"{tp.topic}[{tp.partition}]" for tp in app.consumer.assignment())
        return f"recovery {flags}, changelog records still to read {remaining or 'none'}, assignment {assignment}"
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the watch
        return f"recovery state unavailable ({type(exc).__name__})"

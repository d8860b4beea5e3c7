"""A rebalance that does not complete: the worker's stops go unchecked, so the worker restarts.

The tick feed reads a worker's `ticks` partitions only once Faust has recovered the `armed-stops` table of the
partitions it was given (`on_rebalance_complete`, streams/tick_feed.py). Until then the stops of those instruments
are checked by no one. A rebalance here completes in 0.1 to 5 s; in the three-worker crash matrix, after Kafka
restarted and a worker was added, Faust's recovery twice waited for ever for changelog records it never fetched
(41 of `armed-stops-changelog[4]`, its start signal taken, its end never set), and that worker's partitions
stayed unread for the rest of the day. The cause is inside Faust; the remedy is the one every crash here gets:
after STALLED_SECONDS the watch logs the recovery's state and stops the worker cleanly (SIGTERM: it commits and
leaves its groups at once), the other workers take its partitions over in the next rebalance, and the
supervisor starts it again (compose: `restart: unless-stopped`). A false alarm costs one restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import faust

log = logging.getLogger(__name__)

STALLED_SECONDS = 6.0
CHECK_SECONDS = 0.5


class RebalanceWatch:
    def __init__(self, app: faust.App, give_up: Callable[[], None]) -> None:
        self.app = app
        self.give_up = give_up  # stops the worker (its supervisor starts it again)
        self.assigned_at: float | None = None  # time.monotonic() of an assignment not yet followed by completion

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
            stalled = self.stalled_for(time.monotonic())
            if stalled >= STALLED_SECONDS:
                log.error("rebalance not completed %.1fs after this worker's partitions were assigned: the stops of "
                          "its instruments are not being checked; %s; stopping this worker so that the others take "
                          "its partitions over (it is started again)", stalled, recovery_state(self.app))  # fmt: skip
                self.assigned_at = None
                self.give_up()
                return


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
        paused = sorted(f"{tp.topic}[{tp.partition}]" for tp in getattr(app.consumer, "_paused_partitions", ()))
        return (f"recovery {flags}, changelog records still to read {remaining or 'none'}, assignment {assignment}, "
                f"paused {paused}, flow {'on' if app.flow_control.is_active() else 'suspended'}")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the watch
        return f"recovery state unavailable ({type(exc).__name__})"

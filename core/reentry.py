"""Re-entry after a stop-loss exit: whether a strategy buys again once a cycle's stop has sold it.

A run is a sequence of entry/exit cycles. Cycle 1 is the BUY at `buy_time`; after a STOPLOSS exit (the stop,
a trailing stop or a stop moved to cost, never the loss limit) a strategy with `reentry_max` > 0 may buy again,
at most `reentry_max` times, never at or after `reentry_until` (exchange time): at once (`immediate`) or once a
tick is back at or above the previous cycle's entry (`at_entry`). Any other exit ends the strategy's day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time
from enum import StrEnum

REENTRY_MAX_LIMIT = 10  # a sane bound: each cycle is a round trip of brokerage and slippage


class ReentryMode(StrEnum):
    IMMEDIATE = "immediate"  # the next cycle's BUY goes out as soon as the stop exit has filled
    AT_ENTRY = "at_entry"  # ... once a tick comes back to (>=) the previous cycle's entry price


@dataclass(frozen=True, slots=True)
class ReentryRule:
    max_reentries: int = 0
    until: time | None = None
    mode: ReentryMode = ReentryMode.IMMEDIATE

    def left(self, cycle: int) -> int:
        """Re-entries still allowed while in `cycle` (cycle 1 is the first entry, not a re-entry)."""
        return max(self.max_reentries - (cycle - 1), 0)

    def refusal(self, cycle: int, local_now: time, loss_left: float | None) -> str | None:
        """Why the position of `cycle`, just stopped out, is not bought again; None if it is. `loss_left`: what
        remains of the strategy's max_loss after the realised loss (None without a limit)."""
        if self.max_reentries <= 0:
            return "no re-entry configured"
        if self.left(cycle) <= 0:
            return f"all {self.max_reentries} re-entries used"
        if self.until is not None and local_now >= self.until:
            return f"re-entry cut-off {self.until:%H:%M:%S} passed"
        if loss_left is not None and loss_left <= 0:
            return "the loss limit is used up by earlier cycles"
        return None

    def past_cutoff(self, local_now: time) -> bool:
        return self.until is not None and local_now >= self.until


def loss_left(max_loss: float | None, realised: float) -> float | None:
    """The strategy's loss limit for the next cycle: `max_loss` lowered by the realised loss of earlier cycles
    (a realised profit does not raise it)."""
    if max_loss is None:
        return None
    return round(max_loss + min(realised, 0.0), 2)

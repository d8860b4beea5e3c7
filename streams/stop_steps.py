"""When a protected position's stop has risen a step: the worker's side of the protective SL-M following the stop.

A position with a protective SL-M at the broker (`protective_stop`) and a stop that can rise (a trailing stop, a
move to cost) is followed here. Its stop rises only with the instrument's price: the stop reaches the last level
sent to the broker plus the step (`protective_stop_step_ticks`) exactly when the price reaches a threshold that
can be worked out in advance (the trail above it, the activation, the move-to-cost price). The thresholds sit in a
sorted index of negated prices (the targets' index), so a tick that reaches none costs a lookup and a comparison,
however many positions are followed; one that reaches some costs O(log n) each, and each of those is a
modification at the broker anyway. The position's stop itself is always read from the exit index: the threshold
only says when to look.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.exit_index import ExitIndex, Trail
from streams.stop_index import StopIndex, to_paise
from streams.trail_index import TICK_PAISE, percent_level


@dataclass(slots=True)
class _Followed:
    instrument: str
    sent: int  # paise: the stop the broker's SL-M was last asked to hold
    trail: Trail | None
    cost_at: int | None  # paise
    entry: int | None  # paise


class StopSteps:
    def __init__(self, step_ticks: int) -> None:
        self.step = step_ticks * TICK_PAISE
        self._thresholds = StopIndex()  # negated prices: "price >= threshold" is "-price <= -threshold"
        self._followed: dict[int, _Followed] = {}

    def __len__(self) -> int:
        return len(self._followed)

    def follow(
        self, strategy_id: int, instrument: str, sent: float, *, trail: Trail | None, cost_at: float | None,
        entry: float | None,
    ) -> None:  # fmt: skip
        """Follow a position whose broker stop holds `sent`. Its first tick looks at once: the stop may be a step up
        already (trailing from the entry, a loss limit above the stop, a high from before a restart)."""
        self.unfollow(strategy_id)
        if trail is None and cost_at is None:
            return
        followed = _Followed(instrument, to_paise(sent), trail, None if cost_at is None else to_paise(cost_at),
                             None if entry is None else to_paise(entry))  # fmt: skip
        self._followed[strategy_id] = followed
        self._thresholds.arm(strategy_id, instrument, -0.0)  # any price

    def due(self, strategy_id: int, index: ExitIndex) -> float | None:
        """A followed position's stop if it is a step or more above the level sent already as it is armed (trailing
        from the entry, a high from before a restart); that level is now the one sent. Its next tick may be long
        in coming on a quiet instrument, or have been read before the position was armed."""
        followed = self._followed.get(strategy_id)
        level = index.level(strategy_id)
        if followed is None or level is None or to_paise(level) < followed.sent + self.step:
            return None
        followed.sent = to_paise(level)
        return level

    def unfollow(self, strategy_id: int) -> None:
        if self._followed.pop(strategy_id, None) is not None:
            self._thresholds.disarm(strategy_id)

    def risen(self, instrument: str, price: float, index: ExitIndex) -> list[tuple[int, float]]:
        """(strategy id, its stop now) of the followed positions whose stop the price (taken in by `index`
        already) raised a step or more above the level last sent; that level is now the one sent."""
        if not self._thresholds.crossed(instrument, -price):
            return []
        risen: list[tuple[int, float]] = []
        paise = to_paise(price)
        for strategy_id in self._thresholds.trigger(instrument, -price):
            followed = self._followed[strategy_id]
            level = index.level(strategy_id)
            if level is None:  # exited meanwhile
                del self._followed[strategy_id]
                continue
            if to_paise(level) >= followed.sent + self.step:
                followed.sent = to_paise(level)
                risen.append((strategy_id, level))
            self._arm(strategy_id, followed, paise)
        return risen

    def clear(self) -> None:
        self._thresholds.clear()
        self._followed.clear()

    # ------------------------------------------------------------------------------------------- internals

    def _arm(self, strategy_id: int, followed: _Followed, price: int) -> None:
        threshold = self._threshold(followed)
        if threshold is None:
            del self._followed[strategy_id]  # it can rise no further (moved to cost, no trail)
            return
        # Never at or under the price just seen: the stop did not rise a step at it, so not before a higher one.
        threshold = max(threshold, price + TICK_PAISE)
        self._thresholds.arm(strategy_id, followed.instrument, -threshold / 100)

    def _threshold(self, followed: _Followed) -> int | None:
        """The lowest price (paise, on the tick) at which the stop is at least a step above the level sent."""
        wanted = followed.sent + self.step
        candidates: list[int] = []
        if followed.cost_at is not None and followed.entry is not None and followed.entry >= wanted:
            candidates.append(followed.cost_at)
        trail = followed.trail
        if trail is not None:
            start = 0 if trail.activate_at is None else to_paise(trail.activate_at)
            if trail.points is not None:
                high = wanted + to_paise(trail.points)
            else:
                high = _percent_high(wanted, round((trail.percent or 0.0) * 100))
            candidates.append(max(high, start))
        return min(candidates) if candidates else None


def _percent_high(level: int, hundredths: int) -> int:
    """The lowest high on the tick whose percent trailing stop is at or above `level` (paise)."""
    high = -(-level * 10_000 // max(10_000 - hundredths, 1))
    high = -(-high // TICK_PAISE) * TICK_PAISE
    while high > TICK_PAISE and percent_level(high - TICK_PAISE, hundredths) >= level:
        high -= TICK_PAISE
    while percent_level(high, hundredths) < level:
        high += TICK_PAISE
    return high

"""A position's price exits on one instrument: its stop (price at or under), a trailing stop, a move of the stop
to cost, and a target (at or above).

* Stops: a sorted index (streams/stop_index.py). A stop moved to cost is re-armed there at the entry price.
* Targets and move-to-cost thresholds: the same index with prices negated, so that "price >= target" is
  "-price <= -target" and the same suffix bisect finds the crossed ones.
* Trailing stops: streams/trail_index.py, whose per-tick cost does not grow with their number.

A tick that crosses nothing costs a dictionary lookup and a comparison in each. Whichever exit a position reaches
first takes the others with it: one exit per position, however the price moves afterwards. A trailing stop only
adds to the position's own stop (the exit comes at the higher of the two), so the stop never falls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from core.exit_prices import ExitRule
from schemas.events import Action, ExitKind
from streams.stop_index import StopIndex
from streams.trail_index import TrailIndex


@dataclass(frozen=True, slots=True)
class Trail:
    """A trailing stop as armed: `points` or `percent` under the high since activation (at `activate_at`, or at
    once from `high`, the entry)."""

    high: float
    points: float | None = None
    percent: float | None = None
    activate_at: float | None = None


@dataclass(frozen=True, slots=True)
class ExitHit:
    strategy_id: int
    action: Action
    kind: ExitKind
    level: float  # the stop or target the price reached


class ExitIndex:
    def __init__(self) -> None:
        self.stops = StopIndex()
        self.targets = StopIndex()  # negated prices
        self.to_cost = StopIndex()  # negated prices: where the stop moves up to the entry
        self.trails = TrailIndex()
        self._levels: dict[int, tuple[float, ExitKind]] = {}  # strategy id -> its stop's price and kind
        self._entry: dict[int, float] = {}  # for a move to cost
        self._target_levels: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.stops)  # every armed position has a stop; the rest only beside it

    def __contains__(self, strategy_id: int) -> bool:
        return strategy_id in self.stops

    def arm(
        self, strategy_id: int, instrument: str, stop: float, target: float | None = None,
        opened_at: float | None = None, *, trail: Trail | None = None, cost_at: float | None = None,
        entry: float | None = None, loss_at: float | None = None, seen_high: float | None = None,
    ) -> None:  # fmt: skip
        """`loss_at`: where the strategy's loss limit is reached; the position's stop is the higher of the two.
        `seen_high`: the highest price read since the position was first armed, if known (re-armed after a restart
        or a rebalance): the trailing stop goes on from it, and a move to cost it reached is made at once."""
        self.disarm(strategy_id)
        kind = ExitKind.STOP
        if loss_at is not None and loss_at > stop:
            stop, kind = loss_at, ExitKind.LOSS_LIMIT
        if seen_high is not None:
            if trail is not None and trail.activate_at is None:
                trail = replace(trail, high=max(trail.high, seen_high))
            elif trail is not None and trail.activate_at is not None and seen_high >= trail.activate_at:
                trail = replace(trail, high=seen_high, activate_at=None)
            if cost_at is not None and entry is not None and seen_high >= cost_at and entry > stop:
                stop, kind, cost_at = entry, ExitKind.COST_STOP, None
        self.stops.arm(strategy_id, instrument, stop, opened_at)
        self._levels[strategy_id] = (stop, kind)
        if target is not None:
            self.targets.arm(strategy_id, instrument, -target, opened_at)
            self._target_levels[strategy_id] = target
        if trail is not None:
            self.trails.arm(strategy_id, instrument, high=trail.high, points=trail.points, percent=trail.percent,
                            activate_at=trail.activate_at, opened_at=opened_at)  # fmt: skip
        if cost_at is not None and entry is not None and entry > stop:
            self._entry[strategy_id] = entry
            self.to_cost.arm(strategy_id, instrument, -cost_at, opened_at)

    def disarm(self, strategy_id: int) -> bool:
        had_stop = self.stops.disarm(strategy_id)
        self.targets.disarm(strategy_id)
        self.to_cost.disarm(strategy_id)
        self.trails.disarm(strategy_id)
        self._levels.pop(strategy_id, None)
        self._entry.pop(strategy_id, None)
        self._target_levels.pop(strategy_id, None)
        return had_stop

    def level(self, strategy_id: int) -> float | None:
        """The position's stop now: the higher of its own (perhaps moved to cost) and its trailing stop."""
        own = self._levels.get(strategy_id)
        trailing = self.trails.level(strategy_id)
        if own is None:
            return trailing
        return own[0] if trailing is None else max(own[0], trailing)

    def crossed(self, instrument: str, price: float) -> bool:
        """Take in the price (trailing highs, moves to cost), then whether it reaches any exit. Once per tick."""
        if self.to_cost.crossed(instrument, -price):
            self._move_to_cost(instrument, price)
        trailing = self.trails.crossed(instrument, price)  # first, always: it takes in the new high
        return trailing or self.stops.crossed(instrument, price) or self.targets.crossed(instrument, -price)

    def trigger(self, instrument: str, price: float, seen_at: float = math.inf) -> list[ExitHit]:
        """Remove and return the positions the price (seen at `seen_at`) exits."""
        hits: list[ExitHit] = []
        if self.stops.crossed(instrument, price):
            for strategy_id in self.stops.trigger(instrument, price, seen_at):
                level, kind = self._levels[strategy_id]
                self._forget(strategy_id)
                hits.append(ExitHit(strategy_id, Action.STOPLOSS, kind, level))
        for strategy_id, level in self.trails.trigger(instrument, price, seen_at):
            self._forget(strategy_id)
            hits.append(ExitHit(strategy_id, Action.STOPLOSS, ExitKind.TRAILING_STOP, level))
        if self.targets.crossed(instrument, -price):
            for strategy_id in self.targets.trigger(instrument, -price, seen_at):
                level = self._target_levels[strategy_id]
                self._forget(strategy_id)
                hits.append(ExitHit(strategy_id, Action.TARGET, ExitKind.TARGET, level))
        return hits

    def instruments(self) -> set[str]:
        return self.stops.instruments() | self.targets.instruments() | self.trails.instruments()

    def clear(self) -> None:
        for index in (self.stops, self.targets, self.to_cost, self.trails):
            index.clear()
        self._levels.clear()
        self._entry.clear()
        self._target_levels.clear()

    def kind(self, strategy_id: int) -> ExitKind | None:
        """Which stop the position's stop now is (`level`)."""
        own = self._levels.get(strategy_id)
        trailing = self.trails.level(strategy_id)
        if trailing is not None and (own is None or trailing > own[0]):
            return ExitKind.TRAILING_STOP
        return own[1] if own is not None else None

    # ------------------------------------------------------------------------------------------- internals

    def _forget(self, strategy_id: int) -> None:
        """The position exits: every other exit of it goes."""
        self.disarm(strategy_id)

    def _move_to_cost(self, instrument: str, price: float) -> None:
        for strategy_id in self.to_cost.trigger(instrument, -price):
            entry = self._entry.pop(strategy_id, None)
            current = self._levels.get(strategy_id)
            if entry is None or current is None or strategy_id not in self.stops or current[0] >= entry:
                continue
            opened_at = self.stops.opened_at(strategy_id)
            self.stops.arm(strategy_id, instrument, entry, opened_at)
            self._levels[strategy_id] = (entry, ExitKind.COST_STOP)


def position_stop(exits: ExitRule, entry: float | None, quantity: int, seen_high: float | None) -> float | None:
    """A position's stop as the worker's index holds it, from its exits, its entry and the highest price read
    since it was armed (recovery's check of the stops crossed while the system was down)."""
    stop = exits.stop_price(entry)
    if stop is None:
        return None
    index = ExitIndex()
    trail = None
    if exits.trails and entry is not None:
        trail = Trail(high=entry, points=exits.trail_points, percent=exits.trail_percent,
                      activate_at=exits.trail_activation_price(entry))  # fmt: skip
    index.arm(0, "", stop, trail=trail, cost_at=exits.move_to_cost_price(entry), entry=entry,
              loss_at=exits.loss_limit_price(entry, quantity), seen_high=seen_high)  # fmt: skip
    return index.level(0)

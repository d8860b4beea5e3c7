"""Trailing stops of each instrument, at a per-tick cost that does not grow with how many there are.

A trailing stop sits a distance (points, or a percent) under the highest price since it was activated, and only
ever rises. Kept one by one, a new high would move every stop of the instrument: 100,000 positions, 100,000
updates per tick. Instead stops are kept by their *distance* under a running high they share:

* A cohort is a set of active trailing stops whose highs are equal. It holds the high once, and its stops sorted
  by distance (points in paise; percents in hundredths of a percent). A tick at a new high only changes that one
  number: every stop of the cohort rose with it.
* A stop's level is `high - distance` (points) or `high * (1 - percent)` rounded up to the tick, so the stops a
  tick at price p reaches are those of distance at most `high - p`: a prefix of the sorted distances, found by
  one bisect and removed in one slice.
* Stops activated at different times may have different highs (one activated after the price fell from its peak
  has a lower high than one that saw the peak). The instrument's cohorts are kept sorted by high, highest first;
  a tick at price p raises every cohort whose high is under p to p, and those are the last ones of the list: they
  merge into one (the smaller into the larger). So the number of cohorts only grows with activations below the
  running high and shrinks at each new high; in a rising market there is one.
* A stop with an activation price waits in a sorted list until a tick reaches it (a prefix again), and joins the
  cohort of that tick's price.

A tick costs O(cohorts * log n + stops it activates or triggers); each stop is activated, merged (O(log n) times
at most, smaller into larger) and triggered once in its life.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from streams.stop_index import to_paise

TICK_PAISE = 5
PERCENT_SCALE = 10_000  # a trail percent in hundredths of a percent: 1.5% -> 150 of 10,000


def percent_level(high: int, hundredths: int) -> int:
    """The stop `hundredths`/100 percent under `high` (paise), rounded up to the tick (never a larger loss)."""
    scaled = high * (PERCENT_SCALE - hundredths)
    ticks = -(-scaled // (PERCENT_SCALE * TICK_PAISE))
    return ticks * TICK_PAISE


@dataclass(eq=False)
class _Cohort:
    high: int
    points: SortedList = field(default_factory=SortedList)  # (distance paise, strategy id)
    percent: SortedList = field(default_factory=SortedList)  # (hundredths of a percent, strategy id)

    def __len__(self) -> int:
        return len(self.points) + len(self.percent)

    def add(self, strategy_id: int, kind: str, distance: int) -> None:
        (self.points if kind == "points" else self.percent).add((distance, strategy_id))

    def discard(self, strategy_id: int, kind: str, distance: int) -> None:
        (self.points if kind == "points" else self.percent).discard((distance, strategy_id))

    def absorb(self, other: _Cohort) -> None:
        self.points.update(other.points)
        self.percent.update(other.percent)

    def crossed(self, price: int) -> bool:
        return bool(
            (self.points and self.points[0][0] <= self.high - price)
            or (self.percent and percent_level(self.high, self.percent[0][0]) >= price)
        )

    def take(self, price: int) -> list[tuple[int, int]]:
        """Remove and return (strategy id, stop level in paise) of the stops at or above `price`."""
        hit: list[tuple[int, int]] = []
        if self.points and self.points[0][0] <= self.high - price:
            end = self.points.bisect_right((self.high - price, math.inf))
            hit.extend((sid, self.high - distance) for distance, sid in self.points[:end])
            del self.points[:end]
        if self.percent and percent_level(self.high, self.percent[0][0]) >= price:
            low, high = 0, len(self.percent)  # the first whose level is under the price
            while low < high:
                middle = (low + high) // 2
                if percent_level(self.high, self.percent[middle][0]) >= price:
                    low = middle + 1
                else:
                    high = middle
            hit.extend((sid, percent_level(self.high, distance)) for distance, sid in self.percent[:low])
            del self.percent[:low]
        return hit


@dataclass
class _Trail:
    instrument: str
    kind: str  # "points" | "percent"
    distance: int
    activate_at: int | None  # paise; None once active
    cohort: _Cohort | None = None


class TrailIndex:
    def __init__(self) -> None:
        self._cohorts: dict[str, list[_Cohort]] = {}  # highs strictly descending
        self._pending: dict[str, SortedList] = {}  # (activation paise, strategy id)
        self._trails: dict[int, _Trail] = {}
        self._opened: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._trails)

    def __contains__(self, strategy_id: int) -> bool:
        return strategy_id in self._trails

    def arm(
        self, strategy_id: int, instrument: str, *, high: float, points: float | None = None,
        percent: float | None = None, activate_at: float | None = None, opened_at: float | None = None,
    ) -> None:  # fmt: skip
        """A trailing stop `points` rupees (or `percent`) under the highest price since activation: at once, with
        the running high starting at `high` (the entry), or when a price reaches `activate_at`."""
        self.disarm(strategy_id)
        if points is not None:
            trail = _Trail(instrument, "points", to_paise(points), None)
        elif percent is not None:
            trail = _Trail(instrument, "percent", round(percent * 100), None)
        else:
            raise ValueError("a trailing stop needs points or percent")
        self._trails[strategy_id] = trail
        if opened_at is not None:
            self._opened[strategy_id] = opened_at
        if activate_at is not None:
            trail.activate_at = to_paise(activate_at)
            self._pending.setdefault(instrument, SortedList()).add((trail.activate_at, strategy_id))
        else:
            self._join(strategy_id, trail, self._cohort_at(instrument, to_paise(high)))

    def disarm(self, strategy_id: int) -> bool:
        trail = self._trails.pop(strategy_id, None)
        self._opened.pop(strategy_id, None)
        if trail is None:
            return False
        if trail.cohort is not None:
            trail.cohort.discard(strategy_id, trail.kind, trail.distance)
            if not trail.cohort:
                self._drop(trail.instrument, trail.cohort)
        elif trail.activate_at is not None:
            pending = self._pending[trail.instrument]
            pending.discard((trail.activate_at, strategy_id))
            if not pending:
                del self._pending[trail.instrument]
        return True

    def level(self, strategy_id: int) -> float | None:
        """The trailing stop's price now; None while it waits for its activation."""
        trail = self._trails.get(strategy_id)
        if trail is None or trail.cohort is None:
            return None
        high = trail.cohort.high
        paise = high - trail.distance if trail.kind == "points" else percent_level(high, trail.distance)
        return paise / 100

    def crossed(self, instrument: str, price: float) -> bool:
        """Take in the price (raising the running highs, activating stops it reaches), then whether it reaches
        any active trailing stop. Called once per tick, before `trigger`."""
        paise = to_paise(price)
        cohorts = self._cohorts.get(instrument)
        if cohorts and cohorts[-1].high <= paise:
            self._raise(instrument, cohorts, paise)
        pending = self._pending.get(instrument)
        if pending and pending[0][0] <= paise:
            self._activate(instrument, pending, paise)
        cohorts = self._cohorts.get(instrument)
        return bool(cohorts) and any(cohort.crossed(paise) for cohort in cohorts)  # type: ignore[union-attr]

    def trigger(self, instrument: str, price: float, seen_at: float = math.inf) -> list[tuple[int, float]]:
        """Remove and return (strategy id, stop price) of the trailing stops `price` reaches, of positions open
        when it was seen."""
        paise = to_paise(price)
        hits: list[tuple[int, float]] = []
        for cohort in list(self._cohorts.get(instrument, ())):
            taken = cohort.take(paise)
            for strategy_id, level in taken:
                if self._opened.get(strategy_id, -math.inf) > seen_at:  # a price from before the position
                    cohort.add(strategy_id, self._trails[strategy_id].kind, self._trails[strategy_id].distance)
                    continue
                del self._trails[strategy_id]
                self._opened.pop(strategy_id, None)
                hits.append((strategy_id, level / 100))
            if not cohort:
                self._drop(instrument, cohort)
        return hits

    def instruments(self) -> set[str]:
        return set(self._cohorts) | set(self._pending)

    def clear(self) -> None:
        self._cohorts.clear()
        self._pending.clear()
        self._trails.clear()
        self._opened.clear()

    # ------------------------------------------------------------------------------------------- internals

    def _join(self, strategy_id: int, trail: _Trail, cohort: _Cohort) -> None:
        trail.activate_at, trail.cohort = None, cohort
        cohort.add(strategy_id, trail.kind, trail.distance)

    def _cohort_at(self, instrument: str, high: int) -> _Cohort:
        """The cohort whose high is `high`, made (in its place by high) if there is none."""
        cohorts = self._cohorts.setdefault(instrument, [])
        index = bisect.bisect_left(cohorts, -high, key=lambda cohort: -cohort.high)
        if index < len(cohorts) and cohorts[index].high == high:
            return cohorts[index]
        cohort = _Cohort(high)
        cohorts.insert(index, cohort)
        return cohort

    def _raise(self, instrument: str, cohorts: list[_Cohort], price: int) -> None:
        """Every cohort with a high at or under `price` now has `price` as its high: one cohort (the largest
        absorbs the others, so each stop moves O(log n) times in its life)."""
        start = len(cohorts)
        while start > 0 and cohorts[start - 1].high <= price:
            start -= 1
        rising = cohorts[start:]
        largest = max(rising, key=len)
        for cohort in rising:
            if cohort is not largest:
                largest.absorb(cohort)
                for _, strategy_id in (*cohort.points, *cohort.percent):
                    self._trails[strategy_id].cohort = largest
        largest.high = price
        cohorts[start:] = [largest]

    def _activate(self, instrument: str, pending: SortedList, price: int) -> None:
        end = pending.bisect_right((price, math.inf))
        cohort = self._cohort_at(instrument, price)
        for _, strategy_id in pending[:end]:
            self._join(strategy_id, self._trails[strategy_id], cohort)
        del pending[:end]
        if not pending:
            del self._pending[instrument]

    def _drop(self, instrument: str, cohort: _Cohort) -> None:
        cohorts = self._cohorts.get(instrument)
        if cohorts is None:
            return
        cohorts[:] = [c for c in cohorts if c is not cohort]
        if not cohorts:
            del self._cohorts[instrument]

"""The armed stops of each instrument, kept sorted so a tick costs O(log n + triggered).

A tick at price p triggers every stop with stop_loss >= p. Stops are sorted ascending by
(stop in paise, strategy id), so the triggered ones are a suffix found by one bisect; a tick that
triggers nothing costs a dictionary lookup and a bisect however many stops the instrument has.

A stop judges only prices from after its position existed: each stop keeps the instant its position's BUY
was due (`opened_at`), and a price seen before it (a feed reading behind, a replay of older ticks, a stale
last price) leaves the stop armed. Only the crossed suffix is looked at for that, never the other stops.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


def to_paise(price: float) -> int:
    """Prices compare as integer paise: no float drift between 1399.95 and a tick of 1399.9500001."""
    return round(price * 100)


@dataclass
class _InstrumentStops:
    keys: list[tuple[int, int]] = field(default_factory=list)  # (stop_paise, strategy_id), sorted


class StopIndex:
    def __init__(self) -> None:
        self._by_instrument: dict[str, _InstrumentStops] = {}
        self._armed: dict[int, tuple[str, int]] = {}  # strategy_id -> (instrument, stop_paise)
        self._opened: dict[int, float] = {}  # strategy_id -> unix seconds (project clock); absent: any price

    def __len__(self) -> int:
        return len(self._armed)

    def __contains__(self, strategy_id: int) -> bool:
        return strategy_id in self._armed

    def arm(self, strategy_id: int, instrument: str, stop_loss: float, opened_at: float | None = None) -> None:
        """Arm (or move) a stop; with `opened_at`, prices seen before that instant never trigger it."""
        self.disarm(strategy_id)
        if opened_at is not None:
            self._opened[strategy_id] = opened_at
        stop = to_paise(stop_loss)
        stops = self._by_instrument.setdefault(instrument, _InstrumentStops())
        bisect.insort(stops.keys, (stop, strategy_id))
        self._armed[strategy_id] = (instrument, stop)

    def opened_at(self, strategy_id: int) -> float | None:
        return self._opened.get(strategy_id)

    def disarm(self, strategy_id: int) -> bool:
        entry = self._armed.pop(strategy_id, None)
        self._opened.pop(strategy_id, None)
        if entry is None:
            return False
        instrument, stop = entry
        stops = self._by_instrument[instrument]
        index = bisect.bisect_left(stops.keys, (stop, strategy_id))
        if index < len(stops.keys) and stops.keys[index] == (stop, strategy_id):
            del stops.keys[index]
        if not stops.keys:
            del self._by_instrument[instrument]
        return True

    def crossed(self, instrument: str, price: float) -> bool:
        """Whether the price reaches any stop of the instrument (whatever its age): one bisect, nothing moved."""
        stops = self._by_instrument.get(instrument)
        return stops is not None and stops.keys[-1][0] >= to_paise(price)

    def trigger(self, instrument: str, price: float, seen_at: float = math.inf) -> list[int]:
        """Remove and return the strategies whose stop the price, seen at `seen_at` (unix seconds, project
        clock), has reached (price <= stop_loss) and whose position was open by then."""
        stops = self._by_instrument.get(instrument)
        if stops is None:
            return []
        # First key with stop >= price: (price_paise, -1) sorts before every real (price_paise, id >= 0).
        start = bisect.bisect_left(stops.keys, (to_paise(price), -1))
        if start == len(stops.keys):
            return []
        opened = self._opened
        hit: list[int] = []
        early: list[tuple[int, int]] = []  # crossed, but opened after the price was seen: stay armed, in order
        for key in stops.keys[start:]:
            if opened.get(key[1], -math.inf) > seen_at:
                early.append(key)
            else:
                hit.append(key[1])
        stops.keys[start:] = early
        for strategy_id in hit:
            del self._armed[strategy_id]
            opened.pop(strategy_id, None)
        if not stops.keys:
            del self._by_instrument[instrument]
        return hit

    def instruments(self) -> set[str]:
        return set(self._by_instrument)

    def clear(self) -> None:
        self._by_instrument.clear()
        self._armed.clear()
        self._opened.clear()

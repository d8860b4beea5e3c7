"""The armed stops of each instrument, kept sorted so a tick costs O(log n + triggered).

A tick at price p triggers every stop with stop_loss >= p. Stops are sorted ascending by
(stop in paise, strategy id), so the triggered ones are a suffix found by one bisect; a tick that
triggers nothing costs a dictionary lookup and a bisect however many stops the instrument has.
"""

from __future__ import annotations

import bisect
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

    def __len__(self) -> int:
        return len(self._armed)

    def __contains__(self, strategy_id: int) -> bool:
        return strategy_id in self._armed

    def arm(self, strategy_id: int, instrument: str, stop_loss: float) -> None:
        self.disarm(strategy_id)
        stop = to_paise(stop_loss)
        stops = self._by_instrument.setdefault(instrument, _InstrumentStops())
        bisect.insort(stops.keys, (stop, strategy_id))
        self._armed[strategy_id] = (instrument, stop)

    def disarm(self, strategy_id: int) -> bool:
        entry = self._armed.pop(strategy_id, None)
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

    def trigger(self, instrument: str, price: float) -> list[int]:
        """Remove and return the strategies whose stop the price has reached (price <= stop_loss)."""
        stops = self._by_instrument.get(instrument)
        if stops is None:
            return []
        # First key with stop >= price: (price_paise, -1) sorts before every real (price_paise, id >= 0).
        start = bisect.bisect_left(stops.keys, (to_paise(price), -1))
        if start == len(stops.keys):
            return []
        hit = [strategy_id for _, strategy_id in stops.keys[start:]]
        del stops.keys[start:]
        for strategy_id in hit:
            del self._armed[strategy_id]
        if not stops.keys:
            del self._by_instrument[instrument]
        return hit

    def instruments(self) -> set[str]:
        return set(self._by_instrument)

    def clear(self) -> None:
        self._by_instrument.clear()
        self._armed.clear()

"""A position's price exits on one instrument: its stop (price at or under) and its target (at or above).

Two sorted indexes (streams/stop_index.py): the stops as they are, the targets with their prices negated, so that
"price >= target" is "-price <= -target" and the same suffix bisect finds the crossed ones. A tick that crosses
nothing costs a dictionary lookup and a comparison in each. Whichever exit a position reaches first takes the
other with it: one exit per position, however the price moves afterwards.
"""

from __future__ import annotations

import math

from schemas.events import Action
from streams.stop_index import StopIndex


class ExitIndex:
    def __init__(self) -> None:
        self.stops = StopIndex()
        self.targets = StopIndex()

    def __len__(self) -> int:
        return len(self.stops)  # every armed position has a stop; a target only beside it

    def __contains__(self, strategy_id: int) -> bool:
        return strategy_id in self.stops or strategy_id in self.targets

    def arm(
        self, strategy_id: int, instrument: str, stop: float, target: float | None = None,
        opened_at: float | None = None,
    ) -> None:  # fmt: skip
        self.stops.arm(strategy_id, instrument, stop, opened_at)
        if target is not None:
            self.targets.arm(strategy_id, instrument, -target, opened_at)
        else:
            self.targets.disarm(strategy_id)

    def disarm(self, strategy_id: int) -> bool:
        had_stop = self.stops.disarm(strategy_id)
        had_target = self.targets.disarm(strategy_id)
        return had_stop or had_target

    def crossed(self, instrument: str, price: float) -> bool:
        return self.stops.crossed(instrument, price) or self.targets.crossed(instrument, -price)

    def trigger(self, instrument: str, price: float, seen_at: float = math.inf) -> list[tuple[int, Action]]:
        """Remove and return the positions the price (seen at `seen_at`) exits, with the exit's kind."""
        hits: list[tuple[int, Action]] = []
        if self.stops.crossed(instrument, price):
            for strategy_id in self.stops.trigger(instrument, price, seen_at):
                self.targets.disarm(strategy_id)
                hits.append((strategy_id, Action.STOPLOSS))
        if self.targets.crossed(instrument, -price):
            for strategy_id in self.targets.trigger(instrument, -price, seen_at):
                self.stops.disarm(strategy_id)
                hits.append((strategy_id, Action.TARGET))
        return hits

    def instruments(self) -> set[str]:
        return self.stops.instruments() | self.targets.instruments()

    def clear(self) -> None:
        self.stops.clear()
        self.targets.clear()

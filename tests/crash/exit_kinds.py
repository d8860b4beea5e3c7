"""The crash matrix's price paths and the exit kinds it trades beside the fixed stop.

Each instrument's path is a step function of the day's real seconds: the base price, a rise (targets hit, trailing
stops activate and climb, stops move to cost), a drop through the "hit" stops, a recovery to the base (at-entry
re-entries buy again) and a second, deeper drop (re-entered positions are stopped out once more). The "safe"
stops (80% of the base) are never crossed.

A share of the healthy users' strategies (`MatrixConfig.exit_kinds`) trades one of `KINDS` instead of the fixed
stop; one user has a daily loss limit. These are judged for integrity, one exit per entry and cycle, never two
live decisions, like every other strategy; the stop-exit latency bound is judged on the fixed stops, whose
crossing moment the path alone decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

RISE = 1.02  # the path rises to 102% of its base ...
DROP = 0.95  # ... falls to 95% ...
RECOVER = 1.0  # ... comes back to the base ...
DROP_AGAIN = 0.90  # ... and falls to 90%
HIT_STOP = 0.97  # the "hit" group's stop (a price): crossed by the first drop
SAFE_STOP = 0.80  # the "safe" group's: never crossed

# target: a take-profit 1.5% above the entry (the rise reaches it from an entry at the base), stop 3% under it.
# trailing: 2% under the highest price once 1% above the entry. cost: the stop moves to the entry 1% above it.
# reentry: a 2% stop and two re-entries, at once or at the entry price. max_loss: the strategy's loss limit.
KINDS = ("target", "trailing", "cost", "reentry", "max_loss")


@dataclass(frozen=True)
class PricePath:
    """An instrument's price as `(real seconds after the day's start, fraction of the base)` steps."""

    base: float
    steps: tuple[tuple[float, float], ...]

    @classmethod
    def draw(cls, base: float, drop: float, day: float, rng: random.Random) -> PricePath:
        # Close together: a re-entered position is to meet the second drop before the day's SELLs.
        rise = drop - rng.uniform(0.05 * day, 0.15 * day)
        recover = drop + rng.uniform(0.04 * day, 0.08 * day)
        again = recover + rng.uniform(0.04 * day, 0.08 * day)
        return cls(base, ((0.0, 1.0), (max(rise, 0.05 * day), RISE), (drop, DROP), (recover, RECOVER),
                          (again, DROP_AGAIN)))  # fmt: skip

    @property
    def drop(self) -> float:
        return self.steps[2][0]

    def level(self, offset: float) -> float:
        """The fraction of the base in force at `offset`."""
        return next((level for at, level in reversed(self.steps) if at <= offset), self.steps[0][1])

    def price(self, level: float) -> float:
        return round(self.base * level, 2)

    def first_at_or_under(self, price: float, offset: float) -> float | None:
        """The first moment at or after `offset` at which the price is at or under `price` (None: never)."""
        if self.price(self.level(offset)) <= price:
            return offset
        return next((at for at, level in self.steps if at > offset and self.price(level) <= price), None)


@dataclass(frozen=True)
class ExitKind:
    name: str
    fields: dict[str, Any]  # what the strategy's create body carries instead of the fixed stop
    reentries: int = 0


def draw_kind(rng: random.Random, base: float) -> ExitKind:
    name = KINDS[rng.randrange(len(KINDS))]
    if name == "target":
        return ExitKind(name, {"stop_loss_percent": "3", "target_percent": "1.5"})
    if name == "trailing":
        return ExitKind(name, {"stop_loss": round(base * SAFE_STOP, 1), "trail_percent": "2",
                               "trail_activation_percent": "1"})  # fmt: skip
    if name == "cost":
        return ExitKind(name, {"stop_loss_points": str(round(base * 0.03, 1)), "move_to_cost_percent": "1"})
    if name == "reentry":
        mode = "immediate" if rng.random() < 0.5 else "at_entry"
        return ExitKind(name, {"stop_loss_percent": "2", "reentry_max": 2, "reentry_mode": mode}, reentries=2)
    # The loss limit is 4% of the base for one share: the first drop reaches it from any entry.
    return ExitKind(name, {"stop_loss": round(base * SAFE_STOP, 1), "max_loss": str(round(base * 0.04, 2))})

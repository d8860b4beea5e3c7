"""A strategy's stop-loss and target as prices, from how the trader gave them and the position's entry.

A stop is given as a price, as points below the entry, or as a percent below it; a target as a price, or points
or percent above the entry. The relative ones become prices when the BUY fills (its average price is the entry),
in this one function, so the worker's stop index, recovery, the protective order and the trader's status all
read the same price. Prices are integer paise on the exchange's 0.05 tick: a resolved stop is rounded up to the
tick (never a larger loss than asked for), a resolved target down (never further away than asked for), both
from the entry in paise.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

TICK = Decimal("0.05")
PAISA = Decimal("0.01")


EXIT_FIELDS = (
    "stop_loss", "stop_loss_points", "stop_loss_percent", "target", "target_points", "target_percent",
    "trail_points", "trail_percent", "trail_activation_points", "trail_activation_percent",
    "move_to_cost_points", "move_to_cost_percent", "max_loss",
)  # fmt: skip
"""Every field of a strategy that says how it exits, in ExitRule's order (API, database, events, Redis)."""


@dataclass(frozen=True, slots=True)
class ExitRule:
    """At most one of each group is set; a strategy has exactly one stop and at most one target."""

    stop_loss: float | None = None
    stop_loss_points: float | None = None
    stop_loss_percent: float | None = None
    target: float | None = None
    target_points: float | None = None
    target_percent: float | None = None
    trail_points: float | None = None
    trail_percent: float | None = None
    trail_activation_points: float | None = None
    trail_activation_percent: float | None = None
    move_to_cost_points: float | None = None
    move_to_cost_percent: float | None = None
    max_loss: float | None = None  # rupees: the strategy's loss limit

    @property
    def stop_is_relative(self) -> bool:
        return self.stop_loss is None

    @property
    def has_target(self) -> bool:
        return any(v is not None for v in (self.target, self.target_points, self.target_percent))

    def stop_price(self, entry: float | None) -> float | None:
        """The stop as a price; None while a relative stop has no entry yet."""
        if self.stop_loss is not None:
            return self.stop_loss
        if entry is None:
            return None
        base = _entry(entry)
        if self.stop_loss_points is not None:
            price = base - Decimal(str(self.stop_loss_points))
        elif self.stop_loss_percent is not None:
            price = base * (1 - Decimal(str(self.stop_loss_percent)) / 100)
        else:
            return None
        # Points at or beyond the entry would leave no stop at all: the lowest tick still is one.
        return _on_tick(max(price, TICK), ROUND_CEILING)

    def target_price(self, entry: float | None) -> float | None:
        """The target as a price; None without a target, or while a relative one has no entry yet."""
        if self.target is not None:
            return self.target
        if entry is None:
            return None
        base = _entry(entry)
        if self.target_points is not None:
            price = base + Decimal(str(self.target_points))
        elif self.target_percent is not None:
            price = base * (1 + Decimal(str(self.target_percent)) / 100)
        else:
            return None
        return _on_tick(price, ROUND_FLOOR)

    @property
    def trails(self) -> bool:
        return self.trail_points is not None or self.trail_percent is not None

    def trail_activation_price(self, entry: float | None) -> float | None:
        """Where a trailing stop with an activation starts trailing (rounded up: never earlier than asked)."""
        return _above(entry, self.trail_activation_points, self.trail_activation_percent)

    def move_to_cost_price(self, entry: float | None) -> float | None:
        """The price at which the stop becomes the entry price (rounded up: never earlier than asked)."""
        return _above(entry, self.move_to_cost_points, self.move_to_cost_percent)

    def loss_limit_price(self, entry: float | None, quantity: int) -> float | None:
        """The price at which the position has lost `max_loss` rupees (rounded up: never a larger loss). With one
        position a run and nothing realised before it, the strategy's loss limit is this stop."""
        if self.max_loss is None or entry is None or quantity <= 0:
            return None
        price = _entry(entry) - Decimal(str(self.max_loss)) / quantity
        return _on_tick(max(price, TICK), ROUND_CEILING)

    def describe_stop(self) -> str:
        if self.stop_loss is not None:
            return f"{self.stop_loss:.2f}"
        if self.stop_loss_points is not None:
            return f"{self.stop_loss_points:g} points below entry"
        return f"{self.stop_loss_percent:g}% below entry"


def _above(entry: float | None, points: float | None, percent: float | None) -> float | None:
    if entry is None or (points is None and percent is None):
        return None
    base = _entry(entry)
    price = base + Decimal(str(points)) if points is not None else base * (1 + Decimal(str(percent)) / 100)
    return _on_tick(price, ROUND_CEILING)


def _entry(entry: float) -> Decimal:
    # In paise, as the order log and the status keep it: recovery, re-arming from the order log, resolves the same.
    return Decimal(str(entry)).quantize(PAISA, rounding=ROUND_HALF_UP)


def _on_tick(price: Decimal, rounding: str) -> float:
    return float((price / TICK).to_integral_value(rounding=rounding) * TICK)

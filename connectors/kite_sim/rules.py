"""Kite's rules in force since 1 April 2026 (SEBI's retail-algo framework), as the simulator enforces them.

Each rule is switched by a `SimConfig` field (all on by default) so a test can turn one off; the messages,
statuses and error types are the ones Kite answers with. docs/kite-rules.md lists them all.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import date

from connectors.kite_sim import errors
from connectors.kite_sim.errors import KiteError

PROTECTED_ORDER_TYPES = frozenset({"MARKET", "SL-M"})
AUTOMATIC_PROTECTION = -1.0
NO_PROTECTION_MESSAGE = (
    "Market orders without market protection are not allowed via API. "
    "Please set market protection or use a Limit order."
)
MAX_MODIFICATIONS_MESSAGE = "Maximum allowed order modifications exceeded."
MARKET_CLOSED_MESSAGE = "Markets are closed right now. Use GTT for placing long standing orders instead."
MIS_BLOCKED_MESSAGE = "MIS orders are blocked after the intraday square-off time ({cutoff}). Use product CNC or NRML."
RATE_LIMIT_MESSAGE = "Too many requests"


def parse_market_protection(raw: str | None) -> float:
    """The form value as Kite reads it: a decimal; missing means 0 (none). A boolean is refused as Kite does."""
    text = (raw or "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise errors.input_error(
            f"failed to decode market_protection: {text!r} is not a valid value, expected decimal"
        ) from None
    if math.isnan(value) or not (value == AUTOMATIC_PROTECTION or 0 <= value <= 100):
        raise errors.input_error(
            "Invalid `market_protection`: give -1 (automatic) or a percentage above 0, at most 100."
        )
    return value


def require_protection(order_type: str, protection: float) -> None:
    """MARKET and SL-M orders sent through the API must carry market protection."""
    if order_type in PROTECTED_ORDER_TYPES and protection == 0:
        raise errors.input_error(NO_PROTECTION_MESSAGE)


def automatic_protection_percent(last_price_paise: int) -> float:
    """The exchange's guideline for automatic protection (equity), by the instrument's price."""
    if last_price_paise < 100_00:
        return 2.0
    if last_price_paise <= 500_00:
        return 1.0
    return 0.5


def band_price(side: str, reference_paise: int, protection: float, tick: int) -> int:
    """The worst price a protected market order may trade at: reference +/- protection, on the tick grid
    and inside the band (a BUY's limit rounds down, a SELL's up)."""
    percent = automatic_protection_percent(reference_paise) if protection < 0 else protection
    tick = max(tick, 1)
    if side == "BUY":
        return int(reference_paise * (100 + percent) / 100) // tick * tick
    limit = math.ceil(reference_paise * (100 - percent) / 100 / tick) * tick
    return max(tick, limit)


def within_band(side: str, price: int, band: int) -> bool:
    return price <= band if side == "BUY" else price >= band


@dataclass(slots=True)
class OrderRateWindows:
    """One api_key's order requests (place, modify, cancel): per second and per minute as sliding windows of
    real (monotonic) time, per day by the exchange's trading day."""

    second: deque[float] = field(default_factory=deque)
    minute: deque[float] = field(default_factory=deque)
    day: date | None = None
    day_count: int = 0

    def admit(
        self, now: float, today: date, per_second: int | None, per_minute: int | None, per_day: int | None
    ) -> None:
        """Count the request, or raise 429 (uncounted) when any enabled cap is reached."""
        if self.day != today:
            self.day, self.day_count = today, 0
        for window, span, cap in ((self.second, 1.0, per_second), (self.minute, 60.0, per_minute)):
            while window and now - window[0] >= span:
                window.popleft()
            if cap is not None and len(window) >= cap:
                raise rate_limited()
        if per_day is not None and self.day_count >= per_day:
            raise rate_limited()
        self.second.append(now)
        self.minute.append(now)
        self.day_count += 1


@dataclass(slots=True)
class ReadWindow:
    """A per-api_key sliding one-second window for one family of reads (quote 1/s, historical 3/s)."""

    times: deque[float] = field(default_factory=deque)

    def admit(self, now: float, per_second: int) -> None:
        while self.times and now - self.times[0] >= 1.0:
            self.times.popleft()
        if len(self.times) >= per_second:
            raise rate_limited()
        self.times.append(now)


def rate_limited() -> KiteError:
    return errors.rate_limit_error(RATE_LIMIT_MESSAGE)

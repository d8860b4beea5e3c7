"""Exit prices checked against the market before a strategy may be created or started.

A stop at or above the last price (or a target at or under it) would fire on the first tick after the BUY:
the trader meant something else, so create and start refuse it, naming the field and the price it was
checked against. Only absolute prices are checked here: a stop or target given in points or percent of the
entry lies on the right side of any entry by construction.
"""

from __future__ import annotations

from decimal import Decimal

from api.errors import FieldError
from connectors.broker import KiteBroker


def refuse_wrong_side(instrument: str, last_price: float, stop_loss: Decimal | None, target: Decimal | None) -> None:
    """FieldError (422) for the first exit price on the wrong side of `last_price`."""
    last = Decimal(str(last_price)).quantize(Decimal("0.01"))
    if stop_loss is not None and stop_loss >= last:
        raise FieldError(
            "stop_loss",
            f"stop_loss {stop_loss} must be below the last price {last} of {instrument}: a stop at or above the "
            "market would sell as soon as the position opens",
        )
    if target is not None and target <= last:
        raise FieldError(
            "target",
            f"target {target} must be above the last price {last} of {instrument}: a target at or under the "
            "market would sell as soon as the position opens",
        )


async def check_exit_sides(
    broker: KiteBroker, instrument: str, stop_loss: Decimal | None, target: Decimal | None = None
) -> None:
    """Ask the broker for the instrument's last price and refuse exit prices on its wrong side."""
    if stop_loss is None and target is None:
        return
    refuse_wrong_side(instrument, await broker.last_price(instrument), stop_loss, target)

"""The checks a strategy's settings pass beyond the request model, shared by create and edit (PATCH): market
hours, the broker's MIS square-off, the instrument list, and exit prices on the right side of the market."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from api.broker_accounts import live_broker
from api.errors import FieldError
from api.exit_levels import check_exit_sides
from connectors.broker import Instrument
from core.crypto import SecretBox
from core.market import MarketCalendar
from core.settings import Settings
from schemas.api import StrategyCreateRequest
from schemas.events import Product


async def checked_instrument(
    body: StrategyCreateRequest, user_id: int, session: AsyncSession, settings: Settings, calendar: MarketCalendar,
    box: SecretBox, now: datetime,
) -> Instrument:  # fmt: skip
    """The instrument `body` names, or the 4xx (field and reason) of the first check it fails."""
    hours = f"{calendar.open:%H:%M}-{calendar.close:%H:%M}"
    for field in ("buy_time", "sell_time"):
        if not calendar.within_hours(getattr(body, field)):
            raise FieldError(field, f"{field} must be within market hours {hours} exchange time")
    cutoff = settings.broker_mis_square_off
    if body.product is Product.MIS and body.sell_time >= cutoff:
        # The broker squares the position off itself at the cut-off (a fee per order) and refuses our SELL.
        raise FieldError(
            "sell_time",
            f"sell_time must be before the broker's MIS square-off at {cutoff:%H:%M} exchange time "
            "(or use product CNC)",
        )
    broker = await live_broker(session, user_id, box, settings, now)
    assert body.exchange is not None and body.tradingsymbol is not None  # noqa: S101 - set by the model
    instrument = await broker.lookup(body.exchange.value, body.tradingsymbol)
    if instrument is None:
        raise FieldError("symbol", f"unknown instrument {body.instrument}: not in the broker's instrument list")
    await check_exit_sides(broker, f"{instrument.exchange}:{instrument.tradingsymbol}", body.stop_loss, body.target)
    return instrument

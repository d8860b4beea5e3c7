"""The P&L view for the app: per strategy per exchange day, and the trader's day in total. Counted from the order
log and the last prices the workers write to Redis, as the daily loss limit counts it (`storage/pnl.py`).
Archived strategies are included: archiving hides a strategy, not the money it made."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CalendarDep, ClockDep, CurrentUser, RuntimeDep, SessionDep
from api.errors import FieldError
from api.openapi import responses
from api.routes.strategies import StrategyIdPath, owned_strategy
from core.market import MarketCalendar
from schemas.api import PNL_NOTE, DayPnlResponse, PnlRow, StrategyPnlResponse
from storage.pnl import PAISE, RunPnl, Runs, open_instruments, run_pnl, runs_opened_between
from storage.runtime import RuntimeStore

router = APIRouter(tags=["pnl"])

MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30
ZERO = Decimal("0.00")


@dataclass
class DayTally:
    """The runs of one strategy on one day, added up."""

    symbol: str
    runs: int = 0
    bought: int = 0
    sold: int = 0
    bought_value: Decimal = ZERO
    sold_value: Decimal = ZERO
    last_price: Decimal | None = None
    realised: Decimal = ZERO
    unrealised: Decimal = ZERO

    def add(self, pnl: RunPnl) -> None:
        self.runs += 1
        self.bought += pnl.bought_quantity
        self.bought_value += pnl.bought_value
        self.sold += pnl.sold_quantity
        self.sold_value += pnl.sold_value
        self.last_price = pnl.last_price if pnl.open else self.last_price
        self.realised += pnl.realised
        self.unrealised += pnl.unrealised

    def row(self, strategy_id: int, day: date) -> PnlRow:
        return PnlRow(
            strategy_id=strategy_id, symbol=self.symbol, day=day, runs=self.runs, bought_quantity=self.bought,
            sold_quantity=self.sold, open_quantity=self.bought - self.sold,
            average_buy_price=average(self.bought_value, self.bought),
            average_sell_price=average(self.sold_value, self.sold),
            last_price=self.last_price if self.bought > self.sold else None,
            realised=self.realised, unrealised=self.unrealised, total=self.realised + self.unrealised,
        )  # fmt: skip


@dataclass
class Totals:
    realised: Decimal = ZERO
    unrealised: Decimal = ZERO
    rows: list[PnlRow] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return self.realised + self.unrealised


def average(value: Decimal, quantity: int) -> Decimal | None:
    return (value / quantity).quantize(PAISE, ROUND_HALF_UP) if quantity else None


def local_midnight(calendar: MarketCalendar, day: date) -> datetime:
    return calendar.at(day, time(0)).astimezone(UTC)


async def tally(runs: Runs, runtime: RuntimeStore, calendar: MarketCalendar) -> Totals:
    """Rows per (strategy, day) in day then strategy order, and the totals."""
    holding = open_instruments(runs)
    prices = await runtime.last_prices(sorted(holding))
    days: dict[tuple[date, int], DayTally] = defaultdict(lambda: DayTally(""))
    for (strategy_id, _), fills in runs.items():
        if (pnl := run_pnl(fills, prices)) is None or fills.opened_at is None:
            continue
        day_tally = days[(calendar.local(fills.opened_at).date(), strategy_id)]
        day_tally.symbol = fills.instrument
        day_tally.add(pnl)
    totals = Totals()
    for (day, strategy_id), day_tally in sorted(days.items()):
        totals.rows.append(day_tally.row(strategy_id, day))
        totals.realised += day_tally.realised
        totals.unrealised += day_tally.unrealised
    return totals


@router.get(
    "/pnl",
    response_model=DayPnlResponse,
    summary="Your P&L of one exchange day: a row per strategy that traded, and the total (fees not included)",
    description=PNL_NOTE,
    responses=responses(401, 422),
)
async def day_pnl_view(
    user: CurrentUser, session: SessionDep, runtime: RuntimeDep, calendar: CalendarDep, clock: ClockDep,
    day: Annotated[date | None, Query(description="Exchange day YYYY-MM-DD; default: today")] = None,
) -> DayPnlResponse:  # fmt: skip
    day = day or calendar.local(clock.now()).date()
    start = local_midnight(calendar, day)
    runs = await runs_opened_between(session, user.id, start, local_midnight(calendar, day + timedelta(days=1)))
    await session.close()  # the prices come from Redis: no connection held meanwhile
    totals = await tally(runs, runtime, calendar)
    return DayPnlResponse(day=day, strategies=totals.rows, realised=totals.realised, unrealised=totals.unrealised,
                          total=totals.total)  # fmt: skip


@router.get(
    "/strategy/{strategy_id}/pnl",
    response_model=StrategyPnlResponse,
    summary="One strategy's P&L per exchange day it traded, from..to inclusive (fees not included)",
    description=PNL_NOTE,
    responses=responses(401, 404, 422),
)
async def strategy_pnl_view(
    strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep, runtime: RuntimeDep,
    calendar: CalendarDep, clock: ClockDep,
    from_day: Annotated[date | None, Query(alias="from", description=f"First exchange day; default: "
                                           f"{DEFAULT_RANGE_DAYS - 1} days before `to`")] = None,
    to_day: Annotated[date | None, Query(alias="to", description="Last exchange day; default: today")] = None,
) -> StrategyPnlResponse:  # fmt: skip
    strategy = await owned_strategy(session, strategy_id, user.id)
    to_day = to_day or calendar.local(clock.now()).date()
    from_day = from_day or to_day - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if from_day > to_day:
        raise FieldError("from", f"from {from_day} must be on or before to {to_day}")
    if (to_day - from_day).days >= MAX_RANGE_DAYS:
        raise FieldError("from", f"at most {MAX_RANGE_DAYS} days at a time: from {from_day} to {to_day} is longer")
    start, end = local_midnight(calendar, from_day), local_midnight(calendar, to_day + timedelta(days=1))
    runs = await runs_opened_between(session, user.id, start, end, strategy_id=strategy.id)
    symbol = strategy.instrument
    await session.close()
    totals = await tally(runs, runtime, calendar)
    return StrategyPnlResponse(
        strategy_id=strategy_id, symbol=symbol, from_day=from_day, to_day=to_day, days=totals.rows,
        realised=totals.realised, unrealised=totals.unrealised, total=totals.total,
    )  # fmt: skip

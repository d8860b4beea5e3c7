"""Profit and loss from the order log: realised from the fills of closed positions, unrealised at the last price
of open ones. Shared by the trader's daily loss limit (`manager/daily_loss.py`) and the P&L view of the API.

A strategy run holds one lot at a time: each cycle is one BUY and at most one exit (SELL, STOPLOSS, TARGET,
EXIT) of the same quantity, and a run re-enters after a stop exit with a new cycle. A cycle's realised P&L is
(exit average price - BUY average price) x quantity, so FIFO and average cost agree; cycles and runs are never
matched against each other. A run belongs to the exchange day its first BUY result was recorded. Fees, taxes and
slippage against a quoted price are not included: the prices are the broker's average fill prices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import OrderLog, OrderLogKind, Strategy
from storage.positions import BUY, cycles, fold

PAISE = Decimal("0.01")

# (action, status, price, broker_order_id) of one result row, oldest first: what `fold` reads.
Fill = tuple[str, str, object, str | None]


@dataclass(slots=True)
class RunFills:
    """One strategy run's order results. `quantity` is the order log's (an edited strategy keeps its history)."""

    instrument: str
    quantity: int
    history: list[Fill] = field(default_factory=list)
    opened_at: datetime | None = None


Runs = dict[tuple[int, int], RunFills]


@dataclass(frozen=True, slots=True)
class RunPnl:
    """A run's money over its cycles."""

    instrument: str
    bought_quantity: int
    bought_value: Decimal
    sold_quantity: int
    sold_value: Decimal
    last_price: Decimal | None  # None: nothing open, or no price known yet
    realised: Decimal
    unrealised: Decimal

    @property
    def open(self) -> bool:
        return self.bought_quantity > self.sold_quantity


@dataclass(frozen=True, slots=True)
class DayPnl:
    realised: float
    unrealised: float

    @property
    def total(self) -> float:
        return self.realised + self.unrealised


def money(value: object) -> Decimal:
    """A price from the database (Numeric(12, 2)) or Redis (a float's repr) as exact rupees and paise."""
    return Decimal(str(value)).quantize(PAISE)


def aware(instant: datetime) -> datetime:
    # SQLite keeps no offset: every stored instant is UTC.
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


async def runs_opened_between(
    session: AsyncSession, user_id: int, start: datetime, end: datetime, strategy_id: int | None = None
) -> Runs:
    """The user's strategy runs whose BUY result was recorded in [start, end), with every result row of each
    (an exit recorded later included): (strategy, run) -> fills."""
    opened = select(OrderLog.strategy_id, OrderLog.run).where(
        OrderLog.user_id == user_id, OrderLog.kind == OrderLogKind.RESULT.value, OrderLog.action == BUY,
        OrderLog.created_at >= start, OrderLog.created_at < end,
    )  # fmt: skip
    if strategy_id is not None:
        opened = opened.where(OrderLog.strategy_id == strategy_id)
    runs_in_window = opened.subquery()
    rows = await session.execute(
        select(Strategy.id, Strategy.exchange, Strategy.tradingsymbol, OrderLog.run, OrderLog.action,
               OrderLog.status, OrderLog.price, OrderLog.broker_order_id, OrderLog.quantity, OrderLog.created_at)
        .join(OrderLog, and_(OrderLog.strategy_id == Strategy.id, OrderLog.kind == OrderLogKind.RESULT.value))
        .join(runs_in_window, and_(runs_in_window.c.strategy_id == OrderLog.strategy_id,
                                   runs_in_window.c.run == OrderLog.run))
        .where(Strategy.user_id == user_id)
        .order_by(OrderLog.id)
    )  # fmt: skip
    runs: Runs = {}
    for sid, exchange, symbol, run, action, status, price, order_id, quantity, at in rows:
        fills = runs.setdefault((sid, run), RunFills(f"{exchange}:{symbol}", quantity))
        fills.history.append((action, status, price, order_id))
        if action == BUY:
            fills.quantity, fills.opened_at = quantity, aware(at)
    return runs


def open_instruments(runs: Runs) -> set[str]:
    return {fills.instrument for fills in runs.values() if fold(fills.history).open}


def run_pnl(fills: RunFills, last_prices: Mapping[str, float]) -> RunPnl | None:
    """The run's P&L over its cycles; None when it bought nothing (or a fill's price is not known: nothing to say
    rather than a guess)."""
    taken = cycles(fills.history)
    if not taken:
        return None
    quantity = fills.quantity
    bought_value = sold_value = realised = unrealised = Decimal("0.00")
    sold, last_price = 0, None
    for entry, closed, exit_price in taken:
        if entry is None or (closed and exit_price is None):
            return None
        buy = money(entry)
        bought_value += buy * quantity
        if closed:
            sell = money(exit_price)
            sold += quantity
            sold_value += sell * quantity
            realised += (sell - buy) * quantity
        elif (last := last_prices.get(fills.instrument)) is not None:  # no price known yet: nothing counted
            last_price = money(last)
            unrealised += (last_price - buy) * quantity
    return RunPnl(fills.instrument, len(taken) * quantity, bought_value, sold, sold_value, last_price, realised,
                  unrealised)  # fmt: skip


def day_pnl(runs: Runs, last_prices: Mapping[str, float]) -> DayPnl:
    """Realised from the fills of closed positions, unrealised from the last price of open ones."""
    realised = unrealised = Decimal("0.00")
    for fills in runs.values():
        if (pnl := run_pnl(fills, last_prices)) is not None:
            realised += pnl.realised
            unrealised += pnl.unrealised
    return DayPnl(float(realised), float(unrealised))

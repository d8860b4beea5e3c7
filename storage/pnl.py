"""Profit and loss from the order log: realised from the fills of closed positions, unrealised at the last price
of open ones. Shared by the trader's daily loss limit (`manager/daily_loss.py`) and the P&L view of the API.

A strategy run is one lot: one BUY, at most one exit (SELL, STOPLOSS, TARGET, EXIT), the same quantity. Its
realised P&L is (exit average price - BUY average price) x quantity, so FIFO and average cost agree; runs are
never matched against each other. A run belongs to the exchange day its BUY result was recorded. Fees, taxes and
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
from storage.positions import BUY, fold

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
    instrument: str
    quantity: int
    buy_price: Decimal
    sell_price: Decimal | None  # None: still open
    last_price: Decimal | None  # None: closed, or no price known yet
    realised: Decimal
    unrealised: Decimal

    @property
    def open(self) -> bool:
        return self.sell_price is None


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
    """The run's P&L; None when it bought nothing (or a fill's price is not known)."""
    position = fold(fills.history)
    if not position.bought or position.entry_price is None:
        return None
    entry = money(position.entry_price)
    if position.exited:
        if position.exit_price is None:
            return None  # sold at a price not known: nothing to say rather than a guess
        exit_price = money(position.exit_price)
        return RunPnl(fills.instrument, fills.quantity, entry, exit_price, None,
                      (exit_price - entry) * fills.quantity, Decimal("0.00"))  # fmt: skip
    last = last_prices.get(fills.instrument)
    last_price = money(last) if last is not None else None
    # No price known yet: nothing counted rather than a guess.
    unrealised = (last_price - entry) * fills.quantity if last_price is not None else Decimal("0.00")
    return RunPnl(fills.instrument, fills.quantity, entry, None, last_price, Decimal("0.00"), unrealised)


def day_pnl(runs: Runs, last_prices: Mapping[str, float]) -> DayPnl:
    """Realised from the fills of closed positions, unrealised from the last price of open ones."""
    realised = unrealised = Decimal("0.00")
    for fills in runs.values():
        if (pnl := run_pnl(fills, last_prices)) is not None:
            realised += pnl.realised
            unrealised += pnl.unrealised
    return DayPnl(float(realised), float(unrealised))

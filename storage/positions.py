"""A strategy run's position, derived from the order log: the database is the source of truth."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus

BUY = "BUY"
HOLDING_BUY_STATUSES = frozenset({"filled", "placed"})


@dataclass(frozen=True)
class RunPosition:
    """The run's current entry/exit cycle (the latest BUY's position), and what its earlier cycles realised."""

    bought: bool = False
    exited: bool = False
    entry_price: float | None = None
    exit_price: float | None = None
    buy_order_id: str | None = None
    exit_order_id: str | None = None
    exit_action: str | None = None
    last_action: str | None = None
    cycle: int = 1  # the cycle of the latest BUY (1 before any)
    realised_per_share: float = 0.0  # sum of (exit - entry) of the cycles closed so far, this one's if exited

    @property
    def open(self) -> bool:
        return self.bought and not self.exited

    def realised(self, quantity: int) -> float:
        """Rupees realised by the run's closed cycles (negative: a loss)."""
        return round(self.realised_per_share * quantity, 2)


def fold(rows: Iterable[tuple[str, str, object, str | None]]) -> RunPosition:
    """(action, status, price, broker_order_id) result rows of one run, oldest first -> its current cycle's
    position. Each holding BUY begins a cycle (a re-entry after a stop exit is the run's next BUY)."""
    position = RunPosition()
    buys = 0
    for action, status, price, order_id in rows:
        value = float(price) if price is not None else None  # type: ignore[arg-type]
        if action == BUY and status in HOLDING_BUY_STATUSES:
            buys += 1
            position = RunPosition(True, False, value, None, order_id, None, None, BUY, buys,
                                   position.realised_per_share)  # fmt: skip
        elif action != BUY and status == "filled":
            realised = position.realised_per_share
            if not position.exited and position.entry_price is not None and value is not None:
                realised += value - position.entry_price
            position = RunPosition(
                position.bought, True, position.entry_price, value, position.buy_order_id, order_id, action, action,
                position.cycle, realised,
            )  # fmt: skip
    return position


def cycles(rows: Iterable[tuple[str, str, object, str | None]]) -> list[tuple[object, bool, object]]:
    """(entry price, closed, exit price) of each entry/exit cycle of one run, oldest first, from its result rows
    as `fold` reads them: each holding BUY opens a cycle, the first filled exit after it closes it."""
    taken: list[tuple[object, bool, object]] = []
    for action, status, price, _ in rows:
        if action == BUY and status in HOLDING_BUY_STATUSES:
            taken.append((price, False, None))
        elif action != BUY and status == "filled" and taken and not taken[-1][1]:
            taken[-1] = (taken[-1][0], True, price)
    return taken


async def positions_of(session: AsyncSession, runs: Iterable[tuple[int, int]]) -> dict[int, RunPosition]:
    """Positions of a few (strategy_id, run) pairs (the execution engine asks for one at a time)."""
    positions: dict[int, RunPosition] = {}
    for strategy_id, run in runs:
        rows = await session.execute(
            select(OrderLog.action, OrderLog.status, OrderLog.price, OrderLog.broker_order_id)
            .where(OrderLog.strategy_id == strategy_id, OrderLog.run == run, OrderLog.kind == OrderLogKind.RESULT.value)
            .order_by(OrderLog.id)
        )
        positions[strategy_id] = fold(rows.tuples())
    return positions


async def running_positions(session: AsyncSession) -> dict[int, RunPosition]:
    """Every running strategy's current-run position in one query (recovery reads thousands at once)."""
    return await positions_by_status(session, StrategyStatus.RUNNING)


async def positions_by_status(
    session: AsyncSession, status: StrategyStatus, trading_day: date | None = None
) -> dict[int, RunPosition]:
    """The current-run position of every strategy in `status` (of `trading_day`, if given) that has an order
    result, in one query.

    A join rather than an IN list of (strategy, run) pairs: PostgreSQL refuses ten thousand of those.
    """
    query = (
        select(Strategy.id, OrderLog.action, OrderLog.status, OrderLog.price, OrderLog.broker_order_id)
        .join(OrderLog, and_(OrderLog.strategy_id == Strategy.id, OrderLog.run == Strategy.run))
        .where(Strategy.status == status.value, OrderLog.kind == OrderLogKind.RESULT.value)
        .order_by(OrderLog.id)
    )
    if trading_day is not None:
        query = query.where(Strategy.trading_day == trading_day)
    rows = await session.execute(query)
    grouped: dict[int, list[tuple[str, str, object, str | None]]] = {}
    for strategy_id, action, outcome, price, order_id in rows:
        grouped.setdefault(strategy_id, []).append((action, outcome, price, order_id))
    return {sid: fold(history) for sid, history in grouped.items()}

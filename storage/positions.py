"""A strategy run's position, derived from the order log: the database is the source of truth."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import aware
from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus

BUY = "BUY"
HOLDING_BUY_STATUSES = frozenset({"filled", "placed"})
GIVEN_UP_EXITS = frozenset({"SELL", "STOPLOSS", "EXIT"})  # a resting protective stop (PROTECT) is not an exit


@dataclass(frozen=True)
class RunPosition:
    bought: bool = False
    exited: bool = False
    entry_price: float | None = None
    exit_price: float | None = None
    buy_order_id: str | None = None
    exit_order_id: str | None = None
    exit_action: str | None = None
    last_action: str | None = None

    @property
    def open(self) -> bool:
        return self.bought and not self.exited


def fold(rows: Iterable[tuple[str, str, object, str | None]]) -> RunPosition:
    """(action, status, price, broker_order_id) result rows of one run, oldest first -> its position."""
    position = RunPosition()
    for action, status, price, order_id in rows:
        value = float(price) if price is not None else None  # type: ignore[arg-type]
        if action == BUY and status in HOLDING_BUY_STATUSES:
            position = RunPosition(True, False, value, None, order_id, None, None, BUY)
        elif action != BUY and status == "filled":
            position = RunPosition(
                position.bought, True, position.entry_price, value, position.buy_order_id, order_id, action, action
            )
    return position


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


@dataclass(frozen=True)
class RunHistory:
    """Every order-log row of one strategy run, oldest first: what the execution engine needs to decide an
    intent (its result, its attempts, the position, the run's orders with an unknown outcome), read at once."""

    rows: tuple[OrderLog, ...]

    @property
    def position(self) -> RunPosition:
        return fold(
            (row.action, row.status, row.price, row.broker_order_id)
            for row in self.rows
            if row.kind == OrderLogKind.RESULT.value
        )

    def result_of(self, intent_id: str) -> OrderLog | None:
        return next(
            (row for row in self.rows if row.intent_id == intent_id and row.kind == OrderLogKind.RESULT.value), None
        )

    def attempts_of(self, intent_id: str) -> int:
        return max(
            (row.attempt for row in self.rows if row.intent_id == intent_id and row.kind == OrderLogKind.ATTEMPT.value),
            default=0,
        )

    def sending_since(self, intent_id: str) -> datetime | None:
        """When the intent's last attempt was sent, if its sender never heard back (it died mid-call)."""
        attempts = [r for r in self.rows if r.intent_id == intent_id and r.kind == OrderLogKind.ATTEMPT.value]
        last = max(attempts, key=lambda row: row.attempt, default=None)
        return aware(last.created_at) if last is not None and last.status == "sending" else None

    def given_up_exits(self) -> set[str]:
        """Exits recorded as failed once their retries went unanswered (timeouts, 5xx, 429). The broker did not
        have them when the engine last asked, but an answer lost on the way may still have been an order."""
        return {
            row.action
            for row in self.rows
            if row.kind == OrderLogKind.RESULT.value and row.status == "failed" and row.action in GIVEN_UP_EXITS
        }

    def unrecorded_actions(self) -> set[str]:
        """Actions sent to the broker (an attempt numbered from 1) whose intent has no result row."""
        resolved = {row.intent_id for row in self.rows if row.kind == OrderLogKind.RESULT.value}
        return {
            row.action
            for row in self.rows
            if row.kind == OrderLogKind.ATTEMPT.value and row.attempt > 0 and row.intent_id not in resolved
        }


async def run_history(session: AsyncSession, strategy_id: int, run: int) -> RunHistory:
    rows = await session.execute(
        select(OrderLog).where(OrderLog.strategy_id == strategy_id, OrderLog.run == run).order_by(OrderLog.id)
    )
    return RunHistory(tuple(rows.scalars()))


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

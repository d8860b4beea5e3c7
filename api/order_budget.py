"""Whether a START fits the trader's day of orders: Kite takes at most BROKER_ORDERS_PER_DAY order requests a day
per api_key, and a run that starts must be able to exit. Checked at START, so a trader learns it then, not at
buy time (the execution engine still skips a BUY that does not fit, and never refuses an exit)."""

from __future__ import annotations

from datetime import UTC, time

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.clock import Clock
from core.market import MarketCalendar
from core.settings import Settings
from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus

ORDERS_PER_RUN = 2  # its BUY and its exit
ORDERS_PER_PROTECTIVE_STOP = 2  # the broker-side SL-M is placed after the BUY and cancelled before a normal exit


def orders_for(strategy: Strategy) -> int:
    return ORDERS_PER_RUN + (ORDERS_PER_PROTECTIVE_STOP if strategy.protective_stop else 0)


async def start_refusal(
    session: AsyncSession, strategy: Strategy, settings: Settings, calendar: MarketCalendar, clock: Clock
) -> str | None:
    """Why starting `strategy` would not fit the day's budget, or None. Conservative: a running strategy's orders
    already sent count both as used and as still needed."""
    day_start = calendar.at(calendar.trading_day_of(clock.now()), time(0)).astimezone(UTC)
    used = (
        await session.execute(
            select(func.count()).select_from(OrderLog).where(
                OrderLog.user_id == strategy.user_id, OrderLog.kind == OrderLogKind.ATTEMPT.value,
                OrderLog.created_at >= day_start,
            )
        )
    ).scalar_one()  # fmt: skip
    running = (
        await session.execute(
            select(Strategy).where(
                Strategy.user_id == strategy.user_id, Strategy.status == StrategyStatus.RUNNING.value,
                Strategy.id != strategy.id,
            )
        )
    ).scalars()  # fmt: skip
    needed = sum(orders_for(s) for s in running) + orders_for(strategy)
    cap = settings.broker_orders_per_day
    if used + needed <= cap:
        return None
    return (
        f"the day's orders cannot fit the broker's limit of {cap} a day: {used} sent today and {needed} needed by "
        "this and your running strategies (a BUY and an exit each, two more with a protective stop)"
    )

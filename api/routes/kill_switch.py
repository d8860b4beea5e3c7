"""The trader's kill switch: one call stops every running strategy and squares every position off, and no
strategy starts again until the trader releases it or the trading day ends.

Engaged in the database first (a START checks it there), then every running strategy is stopped as a trader's
STOP with square_off would; strategies that a START racing the switch got running meanwhile are stopped too.
"""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import CalendarDep, ClockDep, CurrentUser, ManagerDep, SessionDep
from api.errors import ApiError
from api.openapi import responses
from schemas.api import KillSwitchResponse
from storage.models import Strategy, StrategyStatus, User

router = APIRouter(tags=["strategies"])

# A START racing the switch commits its run after our first read at worst once per round.
MAX_ROUNDS = 5


async def engaged_day(session: AsyncSession, user_id: int, today: date) -> date | None:
    """The day the user's kill switch holds, if it still holds today (it ends with its trading day)."""
    day = (await session.execute(select(User.kill_switch_day).where(User.id == user_id))).scalar_one_or_none()
    return day if day is not None and day >= today else None


async def refuse_start_if_engaged(session: AsyncSession, user_id: int, today: date) -> None:
    if (day := await engaged_day(session, user_id, today)) is not None:
        raise ApiError(409, f"kill switch engaged for {day}: no strategy starts until you release it with "
                            "DELETE /kill-switch or the trading day ends")  # fmt: skip


@router.post(
    "/kill-switch",
    response_model=KillSwitchResponse,
    summary="Stop every running strategy, square every position off, refuse starts until released or the day ends",
    responses=responses(401, 503),
)
async def engage(
    user: CurrentUser, session: SessionDep, manager: ManagerDep, clock: ClockDep, calendar: CalendarDep
) -> KillSwitchResponse:
    today = calendar.local(clock.now()).date()
    await manager.runtime.hold_buys(user.id)  # first: a BUY about to leave is withdrawn from now on
    await session.execute(update(User).where(User.id == user.id).values(kill_switch_day=today))
    await session.commit()
    stopped = squared_off = 0
    for _ in range(MAX_ROUNDS):
        running = (
            await session.scalars(
                select(Strategy.id).where(Strategy.user_id == user.id, Strategy.status == StrategyStatus.RUNNING.value)
            )
        ).all()
        await session.rollback()  # the manager works in sessions of its own; hold no transaction meanwhile
        if not running:
            break
        # A stop that fails raises (503): the switch stays engaged, and calling it again stops the rest.
        for strategy_id in running:
            outcome = await manager.stop(
                strategy_id, user_id=user.id, square_off=True, reason="kill switch", end_repetition=False
            )  # it holds for the day only
            stopped += not outcome.already_stopped
            squared_off += outcome.squared_off
    return KillSwitchResponse(
        engaged=True, trading_day=today, strategies_stopped=stopped, positions_squared_off=squared_off,
        message=f"kill switch engaged for {today}: {stopped} strategies stopped, EXIT sent for {squared_off} open "
        "positions; no strategy starts until you release it (DELETE /kill-switch) or the day ends",
    )  # fmt: skip


@router.get("/kill-switch", response_model=KillSwitchResponse, summary="Is the kill switch engaged?",
            responses=responses(401))  # fmt: skip
async def state(user: CurrentUser, session: SessionDep, clock: ClockDep, calendar: CalendarDep) -> KillSwitchResponse:
    day = await engaged_day(session, user.id, calendar.local(clock.now()).date())
    message = f"engaged for {day}" if day is not None else "released: strategies may start"
    return KillSwitchResponse(engaged=day is not None, trading_day=day, message=message)


@router.delete("/kill-switch", response_model=KillSwitchResponse, summary="Release the kill switch",
               responses=responses(401))  # fmt: skip
async def release(user: CurrentUser, session: SessionDep, manager: ManagerDep) -> KillSwitchResponse:
    await session.execute(update(User).where(User.id == user.id).values(kill_switch_day=None))
    await session.commit()
    await manager.runtime.release_buys(user.id)
    return KillSwitchResponse(engaged=False, message="released: strategies may start again (stopped ones stay "
                                                     "stopped until you start them)")  # fmt: skip

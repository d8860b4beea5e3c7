"""Closing an account. Its running strategies are stopped first, each squaring off an open position (as a
STOP with square_off does); then every token is revoked and the account can no longer log in.

With nothing squared off, the account's data is erased at once. A square-off needs the broker account and the
strategy rows until its EXIT is placed, so then the closed account is kept, unusable, and erased a day later
(`storage.accounts`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from api.deps import ClockDep, CurrentUser, ManagerDep, PasswordsDep, ServicesDep, SessionDep, ThrottleDep
from api.errors import ApiError
from api.openapi import responses
from api.routes.auth import confirm_password
from schemas.api import AccountDeletedResponse, AccountDeleteRequest
from storage.accounts import close_account, erase_account
from storage.models import Strategy, StrategyStatus, User

router = APIRouter(tags=["account"])


@router.delete(
    "/account",
    response_model=AccountDeletedResponse,
    summary="Close the account: running strategies are stopped and their positions squared off, tokens revoked",
    responses=responses(401, 403, 422, 429, 503),
)
async def close(
    body: AccountDeleteRequest,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    manager: ManagerDep,
    clock: ClockDep,
    passwords: PasswordsDep,
    throttle: ThrottleDep,
) -> AccountDeletedResponse:
    account = await session.get(User, user.id)
    if account is None or account.deleted_at is not None:
        raise ApiError(401, "account closed", {"WWW-Authenticate": "Bearer"})
    await confirm_password(request, throttle, passwords, account, body.password)
    running = (
        await session.scalars(
            select(Strategy.id).where(Strategy.user_id == user.id, Strategy.status == StrategyStatus.RUNNING.value)
        )
    ).all()
    await session.rollback()  # the manager works in sessions of its own; hold no transaction meanwhile

    # A stop that fails raises (503) before anything is closed: the trader retries, and stops are idempotent.
    stopped = squared_off = 0
    for strategy_id in running:
        outcome = await manager.stop(strategy_id, user_id=user.id, square_off=True, reason="account closed")
        stopped += not outcome.already_stopped
        squared_off += outcome.squared_off

    now = clock.now()
    if squared_off:
        await close_account(session, user.id, now)
        message = (
            f"account closed: {stopped} strategies stopped, EXIT sent for {squared_off} open positions; "
            "the broker connection is kept until they are placed, and everything is erased within a day"
        )
    else:
        await erase_account(session, user.id)
        message = f"account closed and erased: {stopped} strategies stopped, no open position"
    await session.commit()
    await services.revocations.generation_changed(user.id, None)
    return AccountDeletedResponse(strategies_stopped=stopped, positions_squared_off=squared_off, message=message)

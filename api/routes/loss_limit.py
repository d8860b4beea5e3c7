"""The trader's daily loss limit across all strategies (checked by the workers: manager/daily_loss.py)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select, update

from api.deps import CurrentUser, SessionDep
from api.openapi import responses
from schemas.api import DailyLossLimit
from storage.models import User

router = APIRouter(tags=["strategies"])


@router.put(
    "/daily-loss-limit",
    response_model=DailyLossLimit,
    summary="Set (or clear, with null) the daily loss limit",
    responses=responses(401, 422),
)
async def set_limit(body: DailyLossLimit, user: CurrentUser, session: SessionDep) -> DailyLossLimit:
    await session.execute(update(User).where(User.id == user.id).values(daily_max_loss=body.daily_max_loss))
    await session.commit()
    return body


@router.get(
    "/daily-loss-limit", response_model=DailyLossLimit, summary="The daily loss limit", responses=responses(401)
)
async def get_limit(user: CurrentUser, session: SessionDep) -> DailyLossLimit:
    limit = (await session.execute(select(User.daily_max_loss).where(User.id == user.id))).scalar_one_or_none()
    return DailyLossLimit(daily_max_loss=limit)

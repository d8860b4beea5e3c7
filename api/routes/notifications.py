"""What the app shows the trader (order filled, stop-loss triggered, order failed ...), own only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.broker_accounts import as_aware
from api.deps import CurrentUser, SessionDep
from api.openapi import responses
from schemas.api import MAX_ID, NotificationListResponse, NotificationResponse
from storage.models import Notification

router = APIRouter(tags=["notifications"])


@router.get(
    "/notifications",
    response_model=NotificationListResponse,
    summary="Your notifications, newest first",
    responses=responses(401, 422),
)
async def list_notifications(
    user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200, description="At most this many")] = 50,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Page: only ids below this")] = None,
) -> NotificationListResponse:
    query = select(Notification).where(Notification.user_id == user.id)
    if before_id is not None:
        query = query.where(Notification.id < before_id)
    rows = (await session.execute(query.order_by(Notification.id.desc()).limit(limit))).scalars().all()
    return NotificationListResponse(
        notifications=[
            NotificationResponse(
                id=n.id,
                strategy_id=n.strategy_id,
                kind=n.kind,
                title=n.title,
                message=n.message,
                created_at=as_aware(n.created_at),
            )
            for n in rows
        ]
    )

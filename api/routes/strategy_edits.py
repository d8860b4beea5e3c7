"""Edit (PATCH) and archive a strategy that is not running. The edited strategy is validated exactly as a new one
(the same model, the same 422s); its id, owner, order log and status history stay, and the next START uses the
new values. Another user's strategy is answered like a missing one (404)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import CalendarDep, ClockDep, CurrentUser, SecretsDep, SessionDep, SettingsDep
from api.errors import ApiError, FieldError
from api.openapi import responses
from api.routes.strategies import StrategyIdPath, owned_strategy, strategy_response
from api.strategy_checks import checked_instrument
from schemas.api import (
    MOVE_TO_COST_FIELDS,
    STOP_FIELDS,
    TARGET_FIELDS,
    TRAIL_ACTIVATION_FIELDS,
    TRAIL_FIELDS,
    StrategyCreateRequest,
    StrategyResponse,
)
from storage.models import Strategy, StrategyStatus
from storage.positions import positions_of

router = APIRouter(tags=["strategies"])

INSTRUMENT_FIELDS = ("symbol", "exchange", "tradingsymbol")
# Giving one field of a group replaces the group: a stop in points replaces a stop given as a price.
EXCLUSIVE_GROUPS = (STOP_FIELDS, TARGET_FIELDS, TRAIL_FIELDS, TRAIL_ACTIVATION_FIELDS, MOVE_TO_COST_FIELDS)

PATCH_EXAMPLES: dict[str, Any] = {
    "quantity": {"summary": "Buy 20 shares instead", "value": {"quantity": 20}},
    "stop": {"summary": "A stop 1.5% under the entry instead of a price", "value": {"stop_loss_percent": "1.5"}},
    "clear": {"summary": "No target any more", "value": {"target_points": None}},
    "symbol": {"summary": "Another instrument, later", "value": {"symbol": "NSE:TCS", "buy_time": "10:15"}},
}


def not_running(strategy: Strategy, action: str) -> None:
    if strategy.status == StrategyStatus.RUNNING.value:
        raise ApiError(
            409, f"{action} refused: the strategy is running; stop it first (POST /strategy/{strategy.id}/stop)"
        )
    if strategy.archived_at is not None and action == "edit":
        raise ApiError(409, f"edit refused: the strategy is archived; unarchive it first "
                            f"(POST /strategy/{strategy.id}/unarchive)")  # fmt: skip


def stored_settings(strategy: Strategy) -> dict[str, Any]:
    """The strategy as a create request would give it (the instrument as exchange and tradingsymbol)."""
    return {
        name: getattr(strategy, name)
        for name in StrategyCreateRequest.model_fields
        if name != "symbol" and hasattr(strategy, name)
    }


def merged(strategy: Strategy, changes: dict[str, Any]) -> StrategyCreateRequest:
    """The stored settings with `changes` over them, validated by the create model (its 422s, field and reason)."""
    settings = stored_settings(strategy)
    if "symbol" in changes:
        settings.pop("exchange"), settings.pop("tradingsymbol")
    for group in EXCLUSIVE_GROUPS:
        if any(name in changes for name in group):
            for name in group:
                settings.pop(name, None)
    settings.update(changes)
    try:
        return StrategyCreateRequest.model_validate(settings)
    except ValidationError as exc:
        # The same shape as a create's 422: located in the body, named by field.
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def column_values(body: StrategyCreateRequest) -> dict[str, Any]:
    values = {name: getattr(body, name) for name in StrategyCreateRequest.model_fields if name not in INSTRUMENT_FIELDS}
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


async def refuse_instrument_change_while_holding(session: AsyncSession, strategy: Strategy, instrument: str) -> None:
    """A stopped strategy may still hold its last run's shares (stopped without square-off): its P&L is priced
    on its instrument, so that instrument stays until the position is closed."""
    if instrument == strategy.instrument or strategy.run == 0:
        return
    if (await positions_of(session, [(strategy.id, strategy.run)]))[strategy.id].open:
        raise FieldError(
            "symbol", f"run {strategy.run} still holds {strategy.instrument}: the instrument cannot change until "
            "that position is sold", status_code=409,
        )  # fmt: skip


async def write_if_not_running(session: AsyncSession, strategy: Strategy, values: dict[str, Any]) -> None:
    """Compare-and-set: a START (or an archive) that got in between wins, and this edit is refused."""
    done = await session.execute(
        update(Strategy)
        .where(Strategy.id == strategy.id, Strategy.status != StrategyStatus.RUNNING.value,
               Strategy.archived_at.is_(None))
        .values(**values)
    )  # fmt: skip
    if done.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        await session.refresh(strategy)
        not_running(strategy, "edit")
        raise ApiError(409, "the strategy changed meanwhile; read it again and retry")
    await session.commit()
    await session.refresh(strategy)


@router.patch(
    "/strategy/{strategy_id}",
    response_model=StrategyResponse,
    summary="Edit a strategy that is not running: give only the fields to change (null clears an optional one)",
    responses=responses(401, 404, 409, 422, 503),
)
async def edit_strategy(
    strategy_id: StrategyIdPath,
    changes: Annotated[dict[str, Any], Body(openapi_examples=PATCH_EXAMPLES)],
    user: CurrentUser, session: SessionDep, settings: SettingsDep, calendar: CalendarDep, box: SecretsDep,
    clock: ClockDep,
) -> StrategyResponse:  # fmt: skip
    strategy = await owned_strategy(session, strategy_id, user.id)
    not_running(strategy, "edit")
    if not changes:
        raise FieldError("body", "give at least one field to change")
    body = merged(strategy, changes)
    now = clock.now()
    instrument = await checked_instrument(body, user.id, session, settings, calendar, box, now)
    await refuse_instrument_change_while_holding(session, strategy, f"{instrument.exchange}:{instrument.tradingsymbol}")
    values = column_values(body) | {
        "exchange": instrument.exchange, "tradingsymbol": instrument.tradingsymbol,
        "instrument_token": instrument.instrument_token, "updated_at": now,
    }  # fmt: skip
    await write_if_not_running(session, strategy, values)
    return strategy_response(strategy)


async def set_archived(session: AsyncSession, strategy: Strategy, at: datetime | None, now: datetime) -> None:
    done = await session.execute(
        update(Strategy)
        .where(Strategy.id == strategy.id, Strategy.status != StrategyStatus.RUNNING.value)
        .values(archived_at=at, updated_at=now)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        await session.refresh(strategy)
        not_running(strategy, "archive")
    await session.commit()
    await session.refresh(strategy)


@router.post(
    "/strategy/{strategy_id}/archive",
    response_model=StrategyResponse,
    summary="Archive a strategy that is not running: hidden from the list, never started; its orders and P&L stay",
    responses=responses(401, 404, 409, 422),
)
async def archive_strategy(
    strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep, clock: ClockDep
) -> StrategyResponse:
    strategy = await owned_strategy(session, strategy_id, user.id)
    if strategy.archived_at is None:  # archiving an archived strategy changes nothing
        not_running(strategy, "archive")
        now = clock.now()
        await set_archived(session, strategy, now, now)
    return strategy_response(strategy)


@router.post(
    "/strategy/{strategy_id}/unarchive",
    response_model=StrategyResponse,
    summary="Bring an archived strategy back to the list (it can be edited and started again)",
    responses=responses(401, 404, 422),
)
async def unarchive_strategy(
    strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep, clock: ClockDep
) -> StrategyResponse:
    strategy = await owned_strategy(session, strategy_id, user.id)
    if strategy.archived_at is not None:
        await set_archived(session, strategy, None, clock.now())
    return strategy_response(strategy)

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
from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

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
from schemas.events import Action
from storage.models import OrderLog, OrderLogKind, Strategy, StrategyStatus
from storage.positions import positions_of

router = APIRouter(tags=["strategies"])

INSTRUMENT_FIELDS = ("symbol", "exchange", "tradingsymbol")
# What the execution engine reads from the strategy to place a run's orders.
ORDER_FIELDS = ("exchange", "tradingsymbol", "instrument_token", "quantity", "product")
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


async def unsettled(session: AsyncSession, strategy: Strategy) -> str | None:
    """Why the current run's orders are not done with: an order the broker may still have (an attempt without a
    result, a requested EXIT included), or shares still held (stopped without square-off). None: settled."""
    if strategy.run == 0:
        return None
    attempt, result = aliased(OrderLog), aliased(OrderLog)
    pending = await session.scalar(
        select(attempt.action)
        .outerjoin(result, and_(result.intent_id == attempt.intent_id, result.kind == OrderLogKind.RESULT.value))
        .where(attempt.strategy_id == strategy.id, attempt.run == strategy.run,
               attempt.kind == OrderLogKind.ATTEMPT.value, attempt.action != Action.PROTECT.value, result.id.is_(None))
        .limit(1)
    )  # fmt: skip
    if pending is not None:
        return f"run {strategy.run}'s {pending} order is not settled yet"
    if (await positions_of(session, [(strategy.id, strategy.run)]))[strategy.id].open:
        return f"run {strategy.run} still holds {strategy.quantity} {strategy.instrument}"
    return None


async def refuse_order_changes_while_unsettled(
    session: AsyncSession, strategy: Strategy, values: dict[str, Any]
) -> None:
    """The execution engine places (and recovery re-sends) a run's orders with the strategy's instrument, quantity
    and product as stored: they stay until that run's orders are settled, or an EXIT would sell something else."""
    changed = [name for name in ORDER_FIELDS if values[name] != getattr(strategy, name)]
    if changed and (reason := await unsettled(session, strategy)) is not None:
        field = "symbol" if changed[0] in ("exchange", "tradingsymbol", "instrument_token") else changed[0]
        raise FieldError(field, f"{field} cannot change yet: {reason}", status_code=409)


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
    values = column_values(body) | {
        "exchange": instrument.exchange, "tradingsymbol": instrument.tradingsymbol,
        "instrument_token": instrument.instrument_token, "updated_at": now,
    }  # fmt: skip
    await refuse_order_changes_while_unsettled(session, strategy, values)
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

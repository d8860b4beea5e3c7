"""Sequences 3, 4, 8 and 12: create, start, stop, poll. Every query is scoped to the token's user; another
user's strategy is answered exactly like a missing one (404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, status
from fastapi.responses import Response
from sqlalchemy import select

from api.broker_accounts import as_aware, live_broker
from api.deps import (
    CalendarDep,
    ClockDep,
    CurrentUser,
    ManagerDep,
    SecretsDep,
    SessionDep,
    SettingsDep,
    authenticate,
)
from api.errors import JSON, ApiError, not_found
from api.exit_levels import check_exit_sides
from api.openapi import responses
from api.order_budget import start_refusal
from api.routes.kill_switch import refuse_start_if_engaged
from api.services import Services
from api.status import StatusNotFound
from api.strategy_checks import checked_instrument
from core.exit_prices import EXIT_FIELDS
from manager.strategy_manager import StartOutcome, StopOutcome, StrategyArchived
from schemas.api import (
    MAX_ID,
    OrderListResponse,
    OrderLogResponse,
    StartResponse,
    StatusResponse,
    StopOptions,
    StopResponse,
    StrategyCreateRequest,
    StrategyIdRequest,
    StrategyListResponse,
    StrategyResponse,
    StrategyStopRequest,
)
from storage.models import OrderLog, Strategy, StrategyStatus, StrategyStatusChange

router = APIRouter(tags=["strategies"])

StrategyIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Strategy id", examples=[101])]


def strategy_response(strategy: Strategy) -> StrategyResponse:
    return StrategyResponse(
        strategy_id=strategy.id,
        symbol=strategy.instrument,
        exchange=strategy.exchange,
        tradingsymbol=strategy.tradingsymbol,
        instrument_token=strategy.instrument_token,
        quantity=strategy.quantity,
        buy_time=strategy.buy_time,
        sell_time=strategy.sell_time,
        **{name: getattr(strategy, name) for name in EXIT_FIELDS},
        product=strategy.product,
        protective_stop=strategy.protective_stop,
        reentry_max=strategy.reentry_max or 0,
        reentry_until=strategy.reentry_until,
        reentry_mode=strategy.reentry.mode,
        status=strategy.status,
        status_reason=strategy.status_reason,
        run=strategy.run,
        trading_day=strategy.trading_day,
        repeat=strategy.repeat,
        next_run_day=strategy.next_run_day,
        created_at=as_aware(strategy.created_at),
        updated_at=as_aware(strategy.updated_at),
        archived_at=as_aware(strategy.archived_at) if strategy.archived_at is not None else None,
    )


async def owned_strategy(session: SessionDep, strategy_id: int, user_id: int) -> Strategy:
    strategy = (
        await session.execute(select(Strategy).where(Strategy.id == strategy_id, Strategy.user_id == user_id))
    ).scalar_one_or_none()
    if strategy is None:
        raise not_found()
    return strategy


@router.get(
    "/strategy/status/{strategy_id}",
    response_model=StatusResponse,
    summary="Poll: last action, position, last price, status (from the runtime; the database as fallback)",
    responses=responses(401, 404, 422),
    # Authenticated by hand below (one dependency fewer on the hottest path); documented the same way.
    openapi_extra={"security": [{"HTTPBearer": []}]},
)
async def strategy_status(strategy_id: StrategyIdPath, request: Request) -> Response:
    services: Services = request.app.state.services
    user_id = (await authenticate(services, request.headers.get("authorization"))).id
    try:
        body = await services.status.read(strategy_id, user_id)
    except StatusNotFound:
        raise not_found() from None
    # Already JSON (orjson): skips response-model validation on the hottest endpoint; the model documents it.
    return Response(body, media_type=JSON)


@router.post(
    "/strategy/create",
    status_code=status.HTTP_201_CREATED,
    response_model=StrategyResponse,
    summary="Create a strategy (validated against market hours and the broker's instrument list)",
    responses=responses(401, 409, 422, 503),
)
async def create_strategy(
    body: StrategyCreateRequest,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    calendar: CalendarDep,
    box: SecretsDep,
    clock: ClockDep,
) -> StrategyResponse:
    now = clock.now()
    instrument = await checked_instrument(body, user.id, session, settings, calendar, box, now)
    strategy = Strategy(
        user_id=user.id,
        exchange=instrument.exchange,
        tradingsymbol=instrument.tradingsymbol,
        instrument_token=instrument.instrument_token,
        quantity=body.quantity,
        buy_time=body.buy_time,
        sell_time=body.sell_time,
        **{name: getattr(body, name) for name in EXIT_FIELDS},
        product=body.product.value,
        protective_stop=body.protective_stop,
        reentry_max=body.reentry_max,
        reentry_until=body.reentry_until,
        reentry_mode=body.reentry_mode.value,
        repeat=body.repeat.value,
        status=StrategyStatus.CREATED.value,
        run=0,
        created_at=now,
        updated_at=now,
    )
    session.add(strategy)
    await session.flush()
    session.add(StrategyStatusChange(strategy_id=strategy.id, status=strategy.status, reason="created", at=now))
    await session.commit()
    return strategy_response(strategy)


def start_response(outcome: StartOutcome) -> StartResponse:
    when = "today" if outcome.trading_day_is_today else "the next trading day"
    if outcome.already_running:
        message = f"already running (run {outcome.run}) for {outcome.trading_day}; nothing changed"
    else:
        # buy_at/sell_at are in the exchange's timezone: the times the trader entered.
        message = (
            f"running for {when} {outcome.trading_day}: BUY at {outcome.buy_at:%H:%M:%S}, "
            f"SELL at {outcome.sell_at:%H:%M:%S} exchange time"
        )
    return StartResponse(
        strategy_id=outcome.strategy_id,
        status=outcome.status,
        run=outcome.run,
        trading_day=outcome.trading_day,
        trading_day_is_today=outcome.trading_day_is_today,
        buy_at=outcome.buy_at,
        sell_at=outcome.sell_at,
        already_running=outcome.already_running,
        message=message,
    )


def stop_response(outcome: StopOutcome) -> StopResponse:
    if outcome.already_stopped:
        message = f"not running (status {outcome.status}); nothing changed"
    elif outcome.squared_off:
        message = "stopped; EXIT order sent for the open position"
    else:
        message = "stopped; no open position"
    return StopResponse(
        strategy_id=outcome.strategy_id,
        status=outcome.status,
        squared_off=outcome.squared_off,
        already_stopped=outcome.already_stopped,
        message=message,
    )


def archived_start(strategy_id: int) -> ApiError:
    return ApiError(
        409, f"START refused: the strategy is archived; unarchive it first (POST /strategy/{strategy_id}/unarchive)"
    )


async def _start(
    strategy_id: int, user: CurrentUser, session: SessionDep, manager: ManagerDep, settings: SettingsDep,
    box: SecretsDep, clock: ClockDep, calendar: CalendarDep,
) -> StartResponse:  # fmt: skip
    strategy = await owned_strategy(session, strategy_id, user.id)
    if strategy.archived_at is not None:
        raise archived_start(strategy_id)
    if strategy.status != StrategyStatus.RUNNING.value:
        await refuse_start_if_engaged(session, user.id, manager.calendar.local(clock.now()).date())
        # A strategy that cannot reach the broker would only fail at buy_time: refuse now instead. The market
        # may have moved since create: a stop now at or above it is refused as at create.
        broker = await live_broker(session, user.id, box, settings, clock.now(), orders=True)
        await check_exit_sides(broker, strategy.instrument, strategy.stop_loss, strategy.target)
        if (refusal := await start_refusal(session, strategy, settings, calendar, clock)) is not None:
            raise ApiError(409, f"START refused: {refusal}")
    await session.close()
    try:
        return start_response(await manager.start(strategy_id, user_id=user.id))
    except StrategyArchived:
        raise archived_start(strategy_id) from None  # archived while this START was being checked


START_DOC = {
    "response_model": StartResponse,
    "summary": "Start: load into the runtime and schedule BUY/SELL (idempotent)",
    "responses": responses(401, 404, 409, 422, 503),
}
STOP_DOC = {
    "response_model": StopResponse,
    "summary": "Stop at any time; squares off an open position unless square_off is false (idempotent)",
    "responses": responses(401, 404, 422, 503),
}


@router.post("/strategy/start", **START_DOC)  # type: ignore[arg-type]
async def start_strategy(
    body: StrategyIdRequest, user: CurrentUser, session: SessionDep, manager: ManagerDep,
    settings: SettingsDep, box: SecretsDep, clock: ClockDep, calendar: CalendarDep,
) -> StartResponse:  # fmt: skip
    return await _start(body.strategy_id, user, session, manager, settings, box, clock, calendar)


@router.post("/strategy/{strategy_id}/start", **START_DOC)  # type: ignore[arg-type]
async def start_strategy_by_path(
    strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep, manager: ManagerDep,
    settings: SettingsDep, box: SecretsDep, clock: ClockDep, calendar: CalendarDep,
) -> StartResponse:  # fmt: skip
    return await _start(strategy_id, user, session, manager, settings, box, clock, calendar)


@router.post("/strategy/stop", **STOP_DOC)  # type: ignore[arg-type]
async def stop_strategy(body: StrategyStopRequest, user: CurrentUser, manager: ManagerDep) -> StopResponse:
    return stop_response(await manager.stop(body.strategy_id, user_id=user.id, square_off=body.square_off))


@router.post("/strategy/{strategy_id}/stop", **STOP_DOC)  # type: ignore[arg-type]
async def stop_strategy_by_path(
    strategy_id: StrategyIdPath,
    user: CurrentUser,
    manager: ManagerDep,
    options: Annotated[StopOptions | None, Body()] = None,
) -> StopResponse:
    square_off = options.square_off if options is not None else True
    return stop_response(await manager.stop(strategy_id, user_id=user.id, square_off=square_off))


@router.get(
    "/strategies",
    response_model=StrategyListResponse,
    summary="Your strategies, newest first (archived ones only with include_archived=true)",
    responses=responses(401, 422),
)
async def list_strategies(
    user: CurrentUser,
    session: SessionDep,
    include_archived: Annotated[bool, Query(description="Also list the strategies you archived")] = False,
) -> StrategyListResponse:
    query = select(Strategy).where(Strategy.user_id == user.id)
    if not include_archived:
        query = query.where(Strategy.archived_at.is_(None))
    rows = (await session.execute(query.order_by(Strategy.id.desc()))).scalars().all()
    return StrategyListResponse(strategies=[strategy_response(s) for s in rows])


@router.get(
    "/strategy/{strategy_id}",
    response_model=StrategyResponse,
    summary="One of your strategies",
    responses=responses(401, 404, 422),
)
async def get_strategy(strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep) -> StrategyResponse:
    return strategy_response(await owned_strategy(session, strategy_id, user.id))


@router.get(
    "/strategy/{strategy_id}/orders",
    response_model=OrderListResponse,
    summary="The strategy's order log (every broker attempt and every result), oldest first",
    responses=responses(401, 404, 422),
)
async def strategy_orders(strategy_id: StrategyIdPath, user: CurrentUser, session: SessionDep) -> OrderListResponse:
    await owned_strategy(session, strategy_id, user.id)
    rows = (
        (
            await session.execute(
                select(OrderLog)
                .where(OrderLog.strategy_id == strategy_id, OrderLog.user_id == user.id)
                .order_by(OrderLog.id)
            )
        )
        .scalars()
        .all()
    )
    return OrderListResponse(
        strategy_id=strategy_id,
        orders=[
            OrderLogResponse(
                id=r.id,
                intent_id=r.intent_id,
                run=r.run,
                action=r.action,
                kind=r.kind,
                attempt=r.attempt,
                status=r.status,
                broker_order_id=r.broker_order_id,
                price=r.price,
                quantity=r.quantity,
                message=r.message,
                created_at=as_aware(r.created_at),
            )
            for r in rows
        ],
    )

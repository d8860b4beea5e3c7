"""The mobile app's REST API. Build it with `create_app(settings)`; run it with
`uvicorn api.main:create_app --factory`. Nothing here touches the event loop at import time: the engine,
Redis client and Kafka producer are made in the lifespan and live on `app.state.services`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from api.body_limit import BodyLimitMiddleware
from api.book_metrics import BookMetrics
from api.errors import RequestIdMiddleware, install_error_handlers
from api.login_throttle import LoginThrottle
from api.passwords import PasswordService
from api.readiness import ReadinessCache
from api.revocation import Revocations
from api.routes import (
    account,
    auth,
    broker,
    health,
    kill_switch,
    loss_limit,
    metrics,
    notifications,
    pnl,
    strategies,
    strategy_edits,
)
from api.services import EventBus, Services
from api.status import StatusReader
from api.tokens import TokenService
from core.clock import get_clock
from core.crypto import SecretBox
from core.market import MarketCalendar
from core.settings import Settings, get_settings
from manager.strategy_manager import StrategyManager
from storage.accounts import purge_closed_accounts
from storage.db import create_engine, session_factory
from storage.runtime import RuntimeStore, connect_redis

log = logging.getLogger("api")

PURGE_INTERVAL_SECONDS = 3600

TAGS = [
    {"name": "auth", "description": "Register, log in, refresh, log out, change the password (sequence 1)."},
    {"name": "account", "description": "Close the account."},
    {"name": "broker", "description": "Connect a Zerodha Kite account (sequence 2)."},
    {
        "name": "strategies",
        "description": "Create, edit, archive, start, stop and poll strategies (sequences 3, 4, 8, 12).",
    },
    {"name": "pnl", "description": "Profit and loss per strategy and per day, from the fills (fees not included)."},
    {"name": "notifications", "description": "Messages for the trader."},
    {"name": "health", "description": "Liveness for anyone; dependency readiness and metrics for operators."},
]


def build_services(settings: Settings) -> Services:
    """The API's collaborators; no I/O happens until they are used."""
    clock = get_clock()
    calendar = MarketCalendar(settings)
    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    # A bounded pool: under load, requests wait for a connection instead of opening thousands. A request
    # does not wait out a Redis restart: after a second it gets 503 (or the database's answer for status).
    redis = connect_redis(settings.redis_url, max_connections=256, ride_out_seconds=1.0)
    runtime = RuntimeStore(redis)
    events = EventBus(settings)
    tokens = TokenService(settings, clock)
    return Services(
        settings=settings,
        clock=clock,
        calendar=calendar,
        engine=engine,
        session_factory=sessions,
        redis=redis,
        runtime=runtime,
        events=events,
        manager=StrategyManager(sessions, runtime, events, clock, calendar),
        tokens=tokens,
        status=StatusReader(redis, sessions),
        secrets=SecretBox(settings),
        passwords=PasswordService(settings),
        throttle=LoginThrottle(settings, redis),
        revocations=Revocations(redis, sessions, tokens.real_ttl),
        readiness=ReadinessCache(settings),
    )


async def _purge_closed_accounts(services: Services) -> None:
    """Erases closed accounts once their square-offs no longer need them (`storage.accounts`); every API worker
    runs it, which is harmless: the delete is idempotent."""
    while True:
        try:
            if erased := await purge_closed_accounts(services.session_factory, services.clock.now()):
                log.info("erased %d closed accounts past their retention", erased)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not purge closed accounts (%s); next try in an hour", exc)
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        app.state.book_metrics = BookMetrics(services.session_factory)
        try:
            # Topics and the producer up front when Kafka answers; if it does not, the API still serves
            # (reads, /health says why) and the producer starts on first use.
            await services.events.producer()
        except Exception as exc:  # noqa: BLE001 - any failure here is "Kafka down", reported on /health
            log.warning("Kafka not available at startup (%s); will retry on first publish", exc)
        purging = asyncio.create_task(_purge_closed_accounts(services))
        # uvicorn's own start-up lines are library chatter (core.logs): this is the one an operator reads.
        log.info("api ready")
        try:
            yield
        finally:
            purging.cancel()
            services.passwords.close()
            await services.events.close()
            await services.redis.aclose()
            await services.engine.dispose()

    app = FastAPI(
        title="Algo trading API",
        version="0.1.0",
        summary="Time-based BUY/SELL strategies with a mandatory stop-loss, on Zerodha Kite Connect",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Inside the request id (its 413 carries one), outside everything that reads a body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    # Strategies first: routes match in order, and the status poll is the hot path.
    for module in (
        strategies,
        strategy_edits,
        pnl,
        kill_switch,
        loss_limit,
        auth,
        account,
        broker,
        notifications,
        health,
        metrics,
    ):
        app.include_router(module.router)
    return app

"""FastAPI dependencies as `Annotated` aliases. Nothing here opens a connection until a request needs it.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, which the status hot path
cannot afford.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import ApiError
from api.login_throttle import LoginThrottle
from api.passwords import PasswordService
from api.services import EventBus, Services
from api.status import StatusReader
from api.tokens import InvalidToken, TokenService
from core.clock import Clock
from core.crypto import SecretBox
from core.market import MarketCalendar
from core.settings import Settings
from manager.strategy_manager import StrategyManager
from storage.runtime import RuntimeStore


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings_dep(services: ServicesDep) -> Settings:
    return services.settings


async def get_clock_dep(services: ServicesDep) -> Clock:
    return services.clock


async def get_calendar(services: ServicesDep) -> MarketCalendar:
    return services.calendar


async def get_redis(services: ServicesDep) -> Redis:
    return services.redis


async def get_runtime(services: ServicesDep) -> RuntimeStore:
    return services.runtime


async def get_events(services: ServicesDep) -> EventBus:
    return services.events


async def get_manager(services: ServicesDep) -> StrategyManager:
    return services.manager


async def get_tokens(services: ServicesDep) -> TokenService:
    return services.tokens


async def get_status_reader(services: ServicesDep) -> StatusReader:
    return services.status


async def get_passwords(services: ServicesDep) -> PasswordService:
    return services.passwords


async def get_secrets(services: ServicesDep) -> SecretBox:
    return services.secrets


async def get_throttle(services: ServicesDep) -> LoginThrottle:
    return services.throttle


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    """A session per request; routes commit explicitly, anything uncommitted is rolled back."""
    async with services.session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ClockDep = Annotated[Clock, Depends(get_clock_dep)]
CalendarDep = Annotated[MarketCalendar, Depends(get_calendar)]
RedisDep = Annotated[Redis, Depends(get_redis)]
RuntimeDep = Annotated[RuntimeStore, Depends(get_runtime)]
EventsDep = Annotated[EventBus, Depends(get_events)]
ManagerDep = Annotated[StrategyManager, Depends(get_manager)]
TokensDep = Annotated[TokenService, Depends(get_tokens)]
StatusReaderDep = Annotated[StatusReader, Depends(get_status_reader)]
PasswordsDep = Annotated[PasswordService, Depends(get_passwords)]
SecretsDep = Annotated[SecretBox, Depends(get_secrets)]
ThrottleDep = Annotated[LoginThrottle, Depends(get_throttle)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]

# auto_error=False: a missing header must get our 401 (with WWW-Authenticate), not the framework's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="JWT from POST /auth/login")


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """The token's user. Not loaded from the database: the hot path stays query-free (`api.revocation`)."""

    id: int
    generation: int
    session_id: str


def _unauthorized(message: str, error: str | None = None) -> ApiError:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return ApiError(401, message, {"WWW-Authenticate": challenge})


NOT_AUTHENTICATED = "not authenticated: send Authorization: Bearer <token> from POST /auth/login"


async def authenticate(services: Services, authorization: str | None) -> AuthenticatedUser:
    """The user of an `Authorization` header value, or a 401 with a WWW-Authenticate challenge."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(NOT_AUTHENTICATED)
    try:
        claims = services.tokens.verify(token.strip())
    except InvalidToken as exc:
        raise _unauthorized(f"{exc}: log in again", "invalid_token") from exc
    if not await services.revocations.honoured(claims):
        raise _unauthorized("token revoked (logged out, password changed or account closed): log in again",
                            "invalid_token")  # fmt: skip
    return AuthenticatedUser(claims.user_id, claims.generation, claims.session_id)


async def get_current_user(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> AuthenticatedUser:
    if credentials is None:
        raise _unauthorized(NOT_AUTHENTICATED)
    return await authenticate(services, f"{credentials.scheme} {credentials.credentials}")


CurrentUser = Annotated[AuthenticatedUser, Depends(get_current_user)]

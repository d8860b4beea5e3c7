"""Sequence 1 and the session around it: register, log in, refresh, log out, change the password.

A login answers a short-lived access token and a single-use refresh token (`api.refresh_tokens`); attempts are
throttled per address and per account without letting a stranger lock the owner out (`api.login_throttle`);
passwords are checked in a bounded pool (`api.passwords`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Request, status
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api import refresh_tokens
from api.deps import ClockDep, CurrentUser, PasswordsDep, ServicesDep, SessionDep, ThrottleDep
from api.errors import ApiError, FieldError
from api.openapi import AUTHENTICATED, responses
from api.passwords import email_fingerprint
from api.services import Services
from schemas.api import (
    LoginRequest,
    LogoutRequest,
    PasswordChangeRequest,
    RefreshRequest,
    RegisterRequest,
    TokenResponse,
)
from storage.models import User

router = APIRouter(prefix="/auth", tags=["auth"])


def client_host(request: Request) -> str | None:
    # Behind a reverse proxy, uvicorn's --proxy-headers/FORWARDED_ALLOW_IPS make this the client's address.
    return request.client.host if request.client is not None else None


def issue_tokens(
    services: Services, session: AsyncSession, user: User, now: datetime, family_id: str | None = None
) -> TokenResponse:
    """An access token and the login's next refresh token (added to `session`; the caller commits)."""
    refresh = refresh_tokens.issue(session, user.id, now, timedelta(days=services.settings.refresh_ttl_days), family_id)
    access = services.tokens.issue(user.id, user.token_generation, refresh.family_id)
    return TokenResponse(
        access_token=access.token,
        expires_at=access.expires_at,
        user_id=user.id,
        refresh_token=refresh.token,
        refresh_expires_at=refresh.expires_at,
    )


async def check_new_password(passwords: PasswordsDep, field: str, password: str, email: str) -> None:
    if (problem := await passwords.weakness(password, email)) is not None:
        raise FieldError(field, problem)


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenResponse,
    summary="Create an account and get tokens",
    responses=responses(409, 422, 429, 503),
)
async def register(
    body: RegisterRequest,
    request: Request,
    session: SessionDep,
    services: ServicesDep,
    clock: ClockDep,
    passwords: PasswordsDep,
    throttle: ThrottleDep,
) -> TokenResponse:
    await throttle.admit_registration(client_host(request))
    duplicate = ApiError(409, "an account with this email already exists; log in instead")
    if await session.scalar(select(User.id).where(User.email == body.email)) is not None:
        raise duplicate
    await check_new_password(passwords, "password", body.password, body.email)
    now = clock.now()
    user = User(email=body.email, password_hash=await passwords.hash(body.password), created_at=now, token_generation=0)
    session.add(user)
    try:
        await session.flush()
        answer = issue_tokens(services, session, user, now)
        await session.commit()
    except IntegrityError as exc:  # a concurrent registration of the same email won
        await session.rollback()
        raise duplicate from exc
    return answer


@router.post(
    "/login",
    response_model=TokenResponse,
    summary="Exchange email and password for tokens",
    responses=responses(401, 422, 429, 503),
)
async def login(
    body: LoginRequest,
    request: Request,
    session: SessionDep,
    services: ServicesDep,
    clock: ClockDep,
    passwords: PasswordsDep,
    throttle: ThrottleDep,
) -> TokenResponse:
    user = (await session.execute(select(User).where(User.email == body.email))).scalar_one_or_none()
    hashed = user.password_hash if user else None  # no account: a hash is still checked, so the answer takes as long
    if not await password_checked(request, throttle, passwords, body.email, hashed, body.password) or user is None:
        raise ApiError(401, "wrong email or password", {"WWW-Authenticate": "Bearer"})
    answer = issue_tokens(services, session, user, clock.now())
    await session.commit()
    return answer


@router.post(
    "/refresh",
    response_model=TokenResponse,
    summary="Exchange a refresh token for a new access token and the next refresh token (single use)",
    responses=responses(401, 422),
)
async def refresh(body: RefreshRequest, session: SessionDep, services: ServicesDep, clock: ClockDep) -> TokenResponse:
    now = clock.now()
    try:
        rotated = await refresh_tokens.rotate(session, body.refresh_token, now)
    except refresh_tokens.RefreshRefused as exc:
        raise ApiError(401, str(exc), {"WWW-Authenticate": "Bearer"}) from exc
    answer = issue_tokens(services, session, rotated.user, now, rotated.family_id)
    await session.commit()
    return answer


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End this login (its access and refresh tokens), or every login with everywhere: true",
    responses=responses(*AUTHENTICATED),
)
async def logout(
    user: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    clock: ClockDep,
    options: Annotated[LogoutRequest | None, Body()] = None,
) -> Response:
    now = clock.now()
    await refresh_tokens.revoke_family(session, user.session_id, now)
    generation = None
    if options is not None and options.everywhere:
        account = await session.get(User, user.id)
        if account is not None:
            account.token_generation += 1
            generation = account.token_generation
        await refresh_tokens.revoke_user(session, user.id, now)
    await session.commit()
    await services.revocations.logged_out(user.session_id)
    if generation is not None:
        await services.revocations.generation_changed(user.id, generation)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password",
    response_model=TokenResponse,
    summary="Change the password: every other login ends; this one gets new tokens",
    responses=responses(401, 403, 422, 429, 503),
)
async def change_password(
    body: PasswordChangeRequest,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    clock: ClockDep,
    passwords: PasswordsDep,
    throttle: ThrottleDep,
) -> TokenResponse:
    account = await session.get(User, user.id)
    if account is None:
        raise ApiError(401, "account closed", {"WWW-Authenticate": "Bearer"})
    await confirm_password(request, throttle, passwords, account, body.current_password)
    await check_new_password(passwords, "new_password", body.new_password, account.email)
    now = clock.now()
    account.password_hash = await passwords.hash(body.new_password)
    account.token_generation += 1
    await refresh_tokens.revoke_user(session, account.id, now)
    answer = issue_tokens(services, session, account, now)
    await session.commit()
    await services.revocations.generation_changed(account.id, account.token_generation)
    return answer


async def confirm_password(
    request: Request, throttle: ThrottleDep, passwords: PasswordsDep, account: User, password: str
) -> None:
    """Asked again before anything that cannot be undone; guessed as slowly as a login (a stolen token must
    not become a way to try passwords)."""
    if not await password_checked(request, throttle, passwords, account.email, account.password_hash, password):
        raise ApiError(403, "the password given is not this account's")


async def password_checked(
    request: Request, throttle: ThrottleDep, passwords: PasswordsDep, email: str, hashed: str | None, password: str
) -> bool:
    """One password check under the login throttle: admitted (or Throttled), counted as a failure or, when right,
    the address made known to the account."""
    host, email_key = client_host(request), email_fingerprint(email)
    known = await throttle.admit_login(host, email_key)
    if not await passwords.verify(hashed, password, urgent=known):
        await throttle.failed(email_key, known)
        return False
    await throttle.succeeded(host, email_key)
    return True

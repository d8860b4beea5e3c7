"""Sequence 1: register and log in. Passwords are argon2id hashes; failed logins are throttled in Redis."""

from __future__ import annotations

import math

from fastapi import APIRouter, status
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import ClockDep, PasswordsDep, RedisDep, SessionDep, TokensDep
from api.errors import ApiError
from api.openapi import responses
from api.security import email_fingerprint
from schemas.api import LoginRequest, RegisterRequest, TokenResponse
from storage.models import User

router = APIRouter(prefix="/auth", tags=["auth"])

MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_SECONDS = 15 * 60


def _failures_key(email: str) -> str:
    return f"auth:failed:{email_fingerprint(email)}"


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenResponse,
    summary="Create an account and get a token",
    responses=responses(409, 422),
)
async def register(
    body: RegisterRequest, session: SessionDep, tokens: TokensDep, clock: ClockDep, passwords: PasswordsDep
) -> TokenResponse:
    duplicate = ApiError(409, "an account with this email already exists; log in instead")
    exists = await session.scalar(select(User.id).where(User.email == body.email))
    if exists is not None:
        raise duplicate
    user = User(email=body.email, password_hash=await passwords.hash(body.password), created_at=clock.now())
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:  # a concurrent registration of the same email won
        await session.rollback()
        raise duplicate from exc
    issued = tokens.issue(user.id)
    return TokenResponse(access_token=issued.token, expires_at=issued.expires_at, user_id=user.id)


@router.post(
    "/login",
    response_model=TokenResponse,
    summary="Exchange email and password for a token",
    responses=responses(401, 422, 429),
)
async def login(
    body: LoginRequest, session: SessionDep, tokens: TokensDep, redis: RedisDep, passwords: PasswordsDep
) -> TokenResponse:
    key = _failures_key(body.email)
    try:
        failures = int(await redis.get(key) or 0)
        if failures >= MAX_FAILED_LOGINS:
            retry_after = max(1, math.ceil(await redis.ttl(key)))
            raise ApiError(
                429,
                f"too many failed logins for this email: {MAX_FAILED_LOGINS} in "
                f"{FAILED_LOGIN_WINDOW_SECONDS // 60} minutes; try again in {retry_after} s",
                {"Retry-After": str(retry_after)},
            )
    except RedisError:
        # Throttling protects against guessing; without Redis we fail closed rather than allow unlimited tries.
        raise ApiError(503, "login temporarily unavailable, try again shortly", {"Retry-After": "5"}) from None

    user = (await session.execute(select(User).where(User.email == body.email))).scalar_one_or_none()
    if not await passwords.verify(user.password_hash if user else None, body.password) or user is None:
        # The window starts at the first failure (SET NX EX); INCR keeps the TTL. Works on Redis 6 too,
        # which lacks EXPIRE NX.
        pipe = redis.pipeline(transaction=True)
        pipe.set(key, 0, ex=FAILED_LOGIN_WINDOW_SECONDS, nx=True)
        pipe.incr(key)
        await pipe.execute()
        raise ApiError(401, "wrong email or password", {"WWW-Authenticate": "Bearer"})
    await redis.delete(key)
    issued = tokens.issue(user.id)
    return TokenResponse(access_token=issued.token, expires_at=issued.expires_at, user_id=user.id)

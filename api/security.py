"""Passwords (argon2id) and access tokens (HS256 JWTs whose expiry is judged by the project clock).

Token expiry uses the project clock, not the wall clock, so a test or demo running on a shifted clock
issues tokens that its own API accepts; python-jose's wall-clock `exp` check is switched off for that.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from jose import jwt
from jose.exceptions import JOSEError

from core.clock import Clock
from core.settings import Environment, Settings

JWT_ALGORITHM = "HS256"


class PasswordService:
    """argon2id hashing off the event loop (tens of ms per hash by design).

    The test environment uses a cheap argon2id parameter set: the suite registers hundreds of users, and
    the cost parameters are not what the tests examine. Every other environment gets the library's
    RFC 9106 defaults.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.environment is Environment.TEST:
            self._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        else:
            self._hasher = PasswordHasher()
        # Verified against when the email is unknown: a login takes as long whether the account exists.
        self._dummy_hash = self._hasher.hash("timing-equaliser-0")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        def _verify() -> bool:
            try:
                matched = self._hasher.verify(password_hash or self._dummy_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False
            return matched and password_hash is not None

        return await asyncio.to_thread(_verify)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


class InvalidToken(Exception):
    """Missing, malformed, tampered, wrongly signed, `alg: none`, or expired."""


class TokenService:
    """Issues and verifies access tokens. Verified tokens are cached: the status poll is the hot path."""

    _CACHE_LIMIT = 50_000

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self._secret = settings.jwt_secret.get_secret_value()
        self._ttl = timedelta(minutes=settings.jwt_ttl_minutes)
        self._clock = clock
        # token -> (user id, expiry as a unix timestamp). Only signature-verified tokens get in.
        self._verified: dict[str, tuple[int, float]] = {}

    def issue(self, user_id: int) -> IssuedToken:
        now = self._clock.now()
        expires_at = now + self._ttl
        claims = {"sub": str(user_id), "iat": int(now.timestamp()), "exp": int(expires_at.timestamp())}
        return IssuedToken(jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM), expires_at)

    def verify(self, token: str) -> int:
        """The user id in a valid token; raises InvalidToken otherwise."""
        now = self._clock.now().timestamp()
        cached = self._verified.get(token)
        if cached is not None:
            user_id, expires = cached
            if now < expires:
                return user_id
            raise InvalidToken("token expired")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                # No require_exp: jose turns it into a wall-clock exp check. Presence is checked below.
                options={"verify_exp": False, "require_iat": True, "require_sub": True},
            )
            user_id = int(claims["sub"])
            expires = float(claims["exp"])
        except (JOSEError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidToken("invalid token") from exc
        if user_id < 1:
            raise InvalidToken("invalid token")
        if now >= expires:
            raise InvalidToken("token expired")
        if len(self._verified) >= self._CACHE_LIMIT:
            self._verified.clear()
        self._verified[token] = (user_id, expires)
        return user_id


def email_fingerprint(email: str) -> str:
    """Redis key material for an email: throttling must work without storing addresses in Redis."""
    return hashlib.sha256(email.lower().encode()).hexdigest()[:32]

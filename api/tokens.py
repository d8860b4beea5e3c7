"""Access tokens: short-lived HS256 JWTs, judged by the project clock and by strict claim rules.

Expiry uses the project clock, not the wall clock, so a test or demo running on a shifted clock issues tokens
that its own API accepts; python-jose's wall-clock `exp` check is switched off for that and done here.

A token names its user (`sub`), the user's token generation when it was issued (`gen`: a password change or
an account deletion moves it on, `api.revocation`) and the login it belongs to (`sid`: logout revokes it).
Whether those still hold is `api.revocation`'s question; this module only says whether a token is well formed,
ours and unexpired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from core.clock import Clock
from core.settings import Settings
from schemas.api import MAX_ID

JWT_ALGORITHM = "HS256"
# Clock skew allowed between API workers for `iat` (all share one clock source; NTP steps are small).
IAT_LEEWAY_SECONDS = 30
SESSION_ID_MAX_LENGTH = 64


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: int
    generation: int
    session_id: str
    expires: float


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


class InvalidToken(Exception):
    """Missing, malformed, tampered, wrongly signed, `alg: none`, out-of-range claims, or expired."""


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    """RFC 7519 NumericDate: a finite JSON number. A string, a bool or 1e400 (parsed as infinity) is refused."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken("invalid token")
    return float(value)


def _user_id(claims: dict[str, Any]) -> int:
    # A decimal string in the id range: 2**63 and beyond overflow the database's integer (a 500 before).
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.isascii() or not sub.isdigit() or len(sub) > 19:
        raise InvalidToken("invalid token")
    user_id = int(sub)
    if not 1 <= user_id <= MAX_ID:
        raise InvalidToken("invalid token")
    return user_id


class TokenService:
    """Issues and verifies access tokens. Verified tokens are cached: the status poll is the hot path."""

    _CACHE_LIMIT = 50_000

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self._secret = settings.jwt_secret.get_secret_value()
        # A lifetime is real time. `iat` and `exp` are written in clock time, so on a clock sped up for a demo
        # (x10) or the crash matrix (x30) a 15-minute token spans 15 real minutes, not 90 or 30 seconds.
        speed = float(getattr(clock, "speed", 1.0))
        self.real_ttl = timedelta(minutes=settings.jwt_ttl_minutes)
        self.ttl = self.real_ttl * speed
        self._leeway = IAT_LEEWAY_SECONDS * speed
        self._clock = clock
        # Only signature- and claim-checked tokens get in; expiry is judged again on every use.
        self._verified: dict[str, AccessClaims] = {}

    def issue(self, user_id: int, generation: int, session_id: str) -> IssuedToken:
        now = self._clock.now()
        expires_at = now + self.ttl
        claims = {
            "sub": str(user_id),
            "iat": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
            "gen": generation,
            "sid": session_id,
        }
        return IssuedToken(jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM), expires_at)

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; raises InvalidToken otherwise."""
        now = self._clock.now().timestamp()
        cached = self._verified.get(token)
        if cached is not None:
            if now < cached.expires:
                return cached
            raise InvalidToken("token expired")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                # Every time claim is checked below, against the project clock and with stricter types.
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except (JOSEError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidToken("invalid token") from exc
        verified = self._check(claims, now)
        if len(self._verified) >= self._CACHE_LIMIT:
            self._verified.clear()
        self._verified[token] = verified
        return verified

    def _check(self, claims: dict[str, Any], now: float) -> AccessClaims:
        user_id = _user_id(claims)
        issued, expires = _numeric_date(claims, "iat"), _numeric_date(claims, "exp")
        generation, session_id = claims.get("gen"), claims.get("sid")
        if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation <= MAX_ID:
            raise InvalidToken("invalid token")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= SESSION_ID_MAX_LENGTH:
            raise InvalidToken("invalid token")
        if issued > now + self._leeway or expires <= issued:
            raise InvalidToken("invalid token")
        # No token of ours lives longer than the configured lifetime: a longer one was not issued here.
        if expires - issued > self.ttl.total_seconds() + self._leeway:
            raise InvalidToken("invalid token")
        if now >= expires:
            raise InvalidToken("token expired")
        return AccessClaims(user_id, generation, session_id, expires)

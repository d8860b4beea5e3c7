"""Refresh tokens: opaque, single-use, rotated on every refresh, stored only as SHA-256 digests.

A login starts a family; each refresh marks the presented token used and issues the family's next one. A used
token presented again means two parties hold the family (a stolen token, or a replay): the whole family is
revoked, so the thief's copy and the owner's both stop working and the owner logs in again.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import aware
from storage.models import RefreshToken, User

# 256 bits from the OS generator, URL-safe: 43 characters.
TOKEN_BYTES = 32


class RefreshRefused(Exception):
    """Unknown, expired, revoked or reused; the message says which, for the app to show."""


@dataclass(frozen=True, slots=True)
class IssuedRefresh:
    token: str
    expires_at: datetime
    family_id: str


@dataclass(frozen=True, slots=True)
class Rotated:
    user: User
    family_id: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(
    session: AsyncSession, user_id: int, now: datetime, ttl: timedelta, family_id: str | None = None
) -> IssuedRefresh:
    """Adds the token's row to the session; the caller commits."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    family_id = family_id or secrets.token_hex(16)
    expires_at = now + ttl
    session.add(
        RefreshToken(
            user_id=user_id, family_id=family_id, token_hash=digest(token), created_at=now, expires_at=expires_at
        )
    )
    return IssuedRefresh(token, expires_at, family_id)


async def rotate(session: AsyncSession, token: str, now: datetime) -> Rotated:
    """Marks the token used and returns its user and family; the caller issues the next token and commits.
    Raises RefreshRefused (after committing a reuse's revocation) when the token may not be used."""
    row = (
        await session.execute(select(RefreshToken).where(RefreshToken.token_hash == digest(token)))
    ).scalar_one_or_none()
    if row is None:
        raise RefreshRefused("refresh token not recognised: log in again")
    if row.revoked_at is not None:
        raise RefreshRefused("refresh token revoked: log in again")
    # Compare-and-set: of two concurrent uses of one token exactly one marks it used; the other is a reuse.
    marked = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
        .returning(RefreshToken.id)
    )
    if marked.scalar_one_or_none() is None:
        await revoke_family(session, row.family_id, now)
        await session.commit()
        raise RefreshRefused("refresh token already used: every session of this login is revoked; log in again")
    if now >= aware(row.expires_at):
        raise RefreshRefused("refresh token expired: log in again")
    user = await session.get(User, row.user_id)
    if user is None or user.deleted_at is not None:
        raise RefreshRefused("refresh token not recognised: log in again")
    return Rotated(user, row.family_id)


async def revoke_family(session: AsyncSession, family_id: str, now: datetime) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def revoke_user(session: AsyncSession, user_id: int, now: datetime) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )

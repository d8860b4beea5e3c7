"""A user's stored Kite credentials: loading, decrypting, and the "is the session usable" rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.egress import require_egress
from api.errors import ApiError
from connectors.broker import KiteBroker
from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount


@dataclass(frozen=True, slots=True, repr=False)
class BrokerCredentials:
    """Decrypted secrets; repr disabled so they cannot reach a log line by accident."""

    api_key: str
    api_secret: str
    access_token: str


async def load_account(session: AsyncSession, user_id: int) -> BrokerAccount | None:
    return (await session.execute(select(BrokerAccount).where(BrokerAccount.user_id == user_id))).scalar_one_or_none()


def decrypt(box: SecretBox, account: BrokerAccount) -> BrokerCredentials:
    return BrokerCredentials(
        api_key=box.decrypt(account.api_key_encrypted),
        api_secret=box.decrypt(account.api_secret_encrypted),
        access_token=box.decrypt(account.access_token_encrypted),
    )


def as_aware(instant: datetime) -> datetime:
    # SQLite hands timezone-aware columns back naive; the project writes UTC, so naive means UTC.
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def is_expired(account: BrokerAccount, now: datetime) -> bool:
    return now >= as_aware(account.token_expires_at)


async def live_broker(
    session: AsyncSession, user_id: int, box: SecretBox, settings: Settings, now: datetime, *, orders: bool = False
) -> KiteBroker:
    """The user's broker session, or a 409 saying what to do (connect, or reconnect after expiry; with `orders`,
    configure the egress this deployment requires for order calls)."""
    account = await load_account(session, user_id)
    if account is None:
        raise ApiError(409, "broker not connected: POST /broker/connect with your Kite API key first")
    if is_expired(account, now):
        expired_at = as_aware(account.token_expires_at).isoformat()
        raise ApiError(409, f"broker session expired at {expired_at}; reconnect with POST /broker/connect")
    if orders:
        require_egress(account, settings)
    credentials = decrypt(box, account)
    return KiteBroker(settings, credentials.api_key, credentials.access_token)

"""Sequence 2: connect a Kite account. Credentials are checked with the broker before anything is saved,
stored only encrypted, and never returned or logged."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.exc import IntegrityError

from api.broker_accounts import as_aware, is_expired, load_account
from api.deps import ClockDep, CurrentUser, SecretsDep, SessionDep, SettingsDep
from api.egress import check_reachable, egress_change
from api.errors import ApiError
from api.openapi import responses
from connectors.broker import BrokerTokenExpired, KiteBroker, token_expiry
from schemas.api import BrokerConnectRequest, BrokerStatusResponse
from storage.models import BrokerAccount

router = APIRouter(prefix="/broker", tags=["broker"])


def _status(account: BrokerAccount | None, expired: bool) -> BrokerStatusResponse:
    if account is None:
        return BrokerStatusResponse(connected=False)
    return BrokerStatusResponse(
        connected=True,
        broker_user_id=account.broker_user_id,
        broker_user_name=account.broker_user_name,
        token_issued_at=as_aware(account.token_issued_at),
        token_expires_at=as_aware(account.token_expires_at),
        token_expired=expired,
        egress=account.egress_display,
    )


@router.post(
    "/connect",
    response_model=BrokerStatusResponse,
    summary="Validate Kite credentials with the broker, then store them encrypted",
    responses=responses(400, 401, 422, 503),
    description="With `egress`, the proxy must answer and the broker be reachable through it, or nothing is saved "
    "(422 naming `egress` and the reason).",
)
async def connect(
    body: BrokerConnectRequest,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    box: SecretsDep,
    clock: ClockDep,
) -> BrokerStatusResponse:
    change = egress_change(body.egress)  # a malformed URL is refused before anything reaches the broker
    broker = KiteBroker(settings, body.api_key, body.access_token)
    try:
        if body.request_token is not None:
            # Kite's login redirect gives a one-time request token; the access token comes from the
            # checksum'd exchange (sha256(api_key + request_token + api_secret), computed by the client).
            broker_session = await broker.generate_session(body.request_token, body.api_secret)
            access_token = broker_session.access_token
        else:
            access_token = body.access_token or ""
        profile = await broker.profile()
    except BrokerTokenExpired as exc:
        # At connect time an invalid token is the trader's input error, not a session to renew.
        raise ApiError(400, f"broker refused the credentials: {exc.message}") from exc
    if change is not None and change.egress is not None:
        await check_reachable(settings, body.api_key, access_token, change.egress)

    now = clock.now()
    account = await load_account(session, user.id)
    if account is None:
        account = BrokerAccount(user_id=user.id, created_at=now)
        session.add(account)
    account.api_key_encrypted = box.encrypt(body.api_key)
    account.api_secret_encrypted = box.encrypt(body.api_secret)
    account.access_token_encrypted = box.encrypt(access_token)
    if change is not None:  # omitted: the stored egress stays (the daily login need not repeat it)
        account.egress_url_encrypted = box.encrypt(change.egress.url) if change.egress else None
        account.egress_display = change.egress.display if change.egress else None
    account.broker_user_id = profile.broker_user_id
    account.broker_user_name = profile.user_name
    account.token_issued_at = now
    account.token_expires_at = token_expiry(now, settings)
    account.updated_at = now
    try:
        await session.commit()
    except IntegrityError as exc:  # two connects of one user raced; the other one's row stands
        await session.rollback()
        raise ApiError(409, "a broker connection for this account was saved concurrently; retry") from exc
    return _status(account, expired=False)


@router.get(
    "/status",
    response_model=BrokerStatusResponse,
    summary="Is a broker connected, and is its session still valid",
    responses=responses(401),
)
async def broker_status(user: CurrentUser, session: SessionDep, clock: ClockDep) -> BrokerStatusResponse:
    account = await load_account(session, user.id)
    return _status(account, expired=account is not None and is_expired(account, clock.now()))

"""The trader's egress at the API: reading it from /broker/connect, checking it before it is saved, and the
START rule (a deployment that requires an egress refuses to start a strategy without one)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from ipaddress import ip_address

from api.errors import ApiError, FieldError
from connectors.broker import BrokerEgressDown, BrokerTokenExpired, BrokerUnavailable, KiteBroker
from connectors.egress import Egress, EgressUrlError
from core.settings import Settings
from storage.models import BrokerAccount


@dataclass(frozen=True, slots=True)
class EgressChange:
    """What /broker/connect asked for: a new egress, or none (`egress` None: remove the stored one)."""

    egress: Egress | None


def egress_change(raw: str | None) -> EgressChange | None:
    """None: the request leaves the stored egress as it is; an empty string removes it."""
    if raw is None:
        return None
    if not raw.strip():
        return EgressChange(None)
    try:
        return EgressChange(Egress.parse(raw))
    except EgressUrlError as exc:
        raise FieldError("egress", f"egress: {exc}") from None


async def refuse_internal(settings: Settings, egress: Egress) -> None:
    """A 422 unless every address the proxy's host resolves to is public or in EGRESS_ALLOWED_NETWORKS: the check
    below connects wherever a user points it, and its answers must not map the deployment's own network."""
    try:
        async with asyncio.timeout(settings.egress_check_timeout_seconds):
            found = await asyncio.get_running_loop().getaddrinfo(egress.host, egress.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise FieldError("egress", f"egress host {egress.host} does not resolve") from None
    allowed = settings.egress_networks
    for *_, sockaddr in found:
        address = ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not address.is_global and not any(address in network for network in allowed):
            raise FieldError(
                "egress",
                f"egress {egress.display} is a private, loopback or reserved address, which this deployment does "
                "not allow (an operator lists the proxies' networks in EGRESS_ALLOWED_NETWORKS)",
            )


async def check_reachable(settings: Settings, api_key: str, access_token: str, egress: Egress) -> None:
    """The proxy answers and the broker answers through it (a read: Kite serves it from any address, so this
    cannot tell whether the egress's address is the registered one; the first order can)."""
    await refuse_internal(settings, egress)
    quick = settings.model_copy(update={"broker_timeout_seconds": settings.egress_check_timeout_seconds})
    broker = KiteBroker(quick, api_key, access_token, egress)
    try:
        async with asyncio.timeout(settings.egress_check_timeout_seconds + 1):
            await broker.order_call(broker.order_client.profile)
    except BrokerTokenExpired as exc:
        raise ApiError(400, f"broker refused the credentials: {exc.message}") from exc
    except BrokerEgressDown as exc:
        raise FieldError("egress", f"egress {egress.display} did not answer: {exc.message}") from None
    except (BrokerUnavailable, TimeoutError) as exc:
        reason = exc.message if isinstance(exc, BrokerUnavailable) else "no answer in time"
        raise FieldError("egress", f"the broker is not reachable through egress {egress.display}: {reason}") from None


def require_egress(account: BrokerAccount, settings: Settings) -> None:
    """START's rule: 409 naming what to configure when this deployment requires an egress and there is none."""
    if settings.egress_required and account.egress_url_encrypted is None:
        raise ApiError(
            409,
            "no egress configured: this deployment sends each trader's orders through the trader's own static IP; "
            "POST /broker/connect with `egress` (http://host:port or socks5://host:port of a proxy leaving from "
            "the IP registered on your Kite developer account), or run the deployment with SINGLE_TRADER=true",
        )

"""Login and registration throttling that an attacker cannot turn against the account's owner.

Counted in Redis (shared by every API worker) with the `limits` library's moving windows:

- every login per source address, before any password is hashed: a flood or a spray over many emails from one
  address is refused cheaply, whatever the emails;
- failed logins per (address, email), in tiers ("5/minute;20/hour;50/day"): each tier passed waits longer (the
  progressive delay), and only that address is slowed for that email;
- failed logins per email from every address: past it, an address the account has not logged in from before
  is refused, while addresses it has (kept `KNOWN_ADDRESS_DAYS` after each login) still get in. Many addresses
  guessing one account cannot lock its owner out, and a stranger cannot reach the password any faster.
- registrations per address.

A guess is counted as a failure before its password is checked, in the same atomic step that checks the limit
(`limits`' `hit`): counted only after the check, guesses sent at once all passed the limit before the first was
counted, as many as the password pool could take. A right password then takes its address's count back (the
account-wide one stays: it counts strangers' attempts, and a new device's login is one).

Addresses are counted by IPv6 /64 (one subscriber's allocation) and stored only as digests, like emails.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from core.settings import Settings

KEY_PREFIX = "throttle"


def address_bucket(host: str | None) -> str:
    """The unit of an address for counting: the IPv4 address, or the /64 of an IPv6 one."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class Throttled(Exception):
    """Refused for now: the trader reads `message`, a client waits `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class LoginThrottle:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        # The API's own connection pool: one set of connections, and the same ride-out of a Redis restart.
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=KEY_PREFIX,
            connection_pool=redis.connection_pool,  # type: ignore[arg-type] # passed through to redis-py, typed narrower
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._redis = redis
        self._login_per_address = parse_many(settings.login_rate_per_address)
        self._failures_per_pair = parse_many(settings.login_failures_per_address_email)
        self._failures_per_account = parse_many(settings.login_failures_per_account)
        self._register_per_address = parse_many(settings.register_rate_per_address)
        self._known_seconds = settings.known_address_days * 86_400

    async def _retry_after(self, items: list[RateLimitItem], *identifiers: str) -> int | None:
        """Seconds until every exceeded tier has room again; None when none is exceeded."""
        waits = []
        for item in items:
            if not await self._limiter.test(item, *identifiers):
                stats = await self._limiter.get_window_stats(item, *identifiers)
                waits.append(max(1, math.ceil(stats.reset_time - time.time())))
        return max(waits) if waits else None

    async def _take(self, items: list[RateLimitItem], *identifiers: str) -> int | None:
        """Counts one event in every tier, each tier checked and counted in one atomic step; the wait if a tier was
        full (the tiers before it have counted the event: refused attempts count too)."""
        for item in items:
            if not await self._limiter.hit(item, *identifiers):
                return await self._retry_after(items, *identifiers) or 1
        return None

    def _known_key(self, email_key: str) -> str:
        return f"{KEY_PREFIX}:known:{email_key}"

    async def admit_login(self, host: str | None, email_key: str) -> bool:
        """Before the password is checked; raises Throttled when this attempt may not be made now. True when
        the account has logged in from this address before (its check then goes ahead of strangers')."""
        address = _digest(address_bucket(host))
        if (wait := await self._take(self._login_per_address, "login", address)) is not None:
            raise Throttled(f"too many logins from your network address; try again in {wait} s", wait)
        if (wait := await self._take(self._failures_per_pair, "failed", address, email_key)) is not None:
            raise Throttled(f"too many failed logins for this email from here; try again in {wait} s", wait)
        if await self._redis.sismember(self._known_key(email_key), address):
            return True  # the owner's own device: the account-wide limit is what strangers meet
        if (wait := await self._take(self._failures_per_account, "failed", email_key)) is not None:
            raise Throttled(
                "too many failed logins for this email; log in from a device you have used before, "
                f"or try again in {wait} s",
                wait,
            )
        return False

    async def failed(self, email_key: str, known: bool) -> None:
        """A wrong password: counted already when admitted, except a known address's in the account-wide count,
        which it does not have to pass but does add to (an attacker may have the owner's device)."""
        if known:
            for item in self._failures_per_account:
                await self._limiter.hit(item, "failed", email_key)

    async def succeeded(self, host: str | None, email_key: str) -> None:
        """The address becomes known to the account; its own typos (and this attempt) are forgiven. The
        account-wide count is not: an attacker elsewhere is still guessing."""
        address = _digest(address_bucket(host))
        for item in self._failures_per_pair:
            await self._limiter.clear(item, "failed", address, email_key)
        known = self._known_key(email_key)
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(known, address)
        pipe.expire(known, self._known_seconds)
        await pipe.execute()

    async def admit_registration(self, host: str | None) -> None:
        address = _digest(address_bucket(host))
        if (wait := await self._take(self._register_per_address, "register", address)) is not None:
            raise Throttled(f"too many registrations from your network address; try again in {wait} s", wait)

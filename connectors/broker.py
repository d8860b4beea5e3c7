"""The broker connector: Kite Connect through the official `kiteconnect` client.

The client is synchronous; every call runs in a worker thread so the event loop never blocks on the broker, over
the transport in `connectors/http_session.py` (requests' exception types, a fraction of its cost per call). Its
exceptions are mapped to three project exceptions, which is all callers need to decide:

- `BrokerRejected`     permanent: the broker understood and refused (bad input, bad credentials, rejected order)
- `BrokerTokenExpired` permanent until the trader logs in again (403 TokenException)
- `BrokerUnavailable`  transient: timeout, network, 5xx, 429, unparseable answer; worth retrying

and two refinements for the egress (docs/egress.md): `BrokerSourceRefused` (a rejection: the order came from
an address not registered with Kite) and `BrokerEgressDown` (transient: the trader's proxy did not answer).

The execution engine adds order calls to `KiteBroker` the same way: a sync client method wrapped by `_call`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any, TypeVar

import requests
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kite_exceptions

from connectors.egress import EGRESS_SESSIONS, Egress
from connectors.http_session import PooledSession, Response
from core.metrics import BROKER_CALL_SECONDS
from core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kite access tokens die at 06:00 exchange time the next morning, whenever they were issued.
KITE_TOKEN_EXPIRY_TIME = clock_time(6, 0)


class BrokerError(Exception):
    """Base of the project's broker exceptions. `message` is safe to show the trader (no secrets)."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class BrokerRejected(BrokerError):
    """Permanent refusal (input, permission, order rejected, bad credentials): do not retry."""


class BrokerTokenExpired(BrokerRejected):
    """The access token is expired or revoked: the trader must reconnect. Never retried."""


class BrokerUnavailable(BrokerError):
    """Transient: timeout, network failure, 5xx, rate limit. Safe to retry (reads) or to look up (orders)."""


class BrokerSourceRefused(BrokerRejected):
    """The broker refused an order call for its source address (not the static IP registered on the trader's
    Kite developer account). Permanent: every retry would leave from the same address."""


class BrokerEgressDown(BrokerUnavailable):
    """The trader's egress proxy did not answer or could not reach the broker: transient, retried."""


# Kite answers an order from an unregistered address with a PermissionException (403); its exact wording is not
# published, so any permission refusal that names the IP is taken as one.
_NAMES_IP = re.compile(r"\bIP\b|\bwhitelist", re.IGNORECASE)
SOURCE_REFUSED_ADVICE = (
    "the broker refused the order's source address: register your egress's static IP on your Kite Connect "
    "developer account (IP whitelist), or fix the egress in your broker connection"
)


class BrokerNotSent(BrokerUnavailable):
    """Transient, and known to have placed nothing: sent again at once, with nothing to ask the broker about."""


class BrokerThrottled(BrokerNotSent):
    """429: the broker refused the request unread, at its rate limit; an order so answered was not placed."""


class BrokerCallLate(BrokerNotSent):
    """An order call that could not start by its `leave_by` instant and so was never made (`KiteBroker.call`)."""


def map_kite_exception(exc: BaseException) -> BrokerError:
    """Translate whatever the kiteconnect client (or the transport under it) raised into a project exception."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, kite_exceptions.KiteException):
        code = getattr(exc, "code", None)
        message = str(exc) or type(exc).__name__
        if isinstance(exc, kite_exceptions.TokenException):
            return BrokerTokenExpired(message, http_status=code)
        if isinstance(exc, kite_exceptions.PermissionException) and _NAMES_IP.search(message):
            return BrokerSourceRefused(f"{SOURCE_REFUSED_ADVICE} ({message})", http_status=code)
        if code == 429:
            return BrokerThrottled(message, http_status=code)
        if isinstance(exc, kite_exceptions.NetworkException | kite_exceptions.DataException):
            return BrokerUnavailable(message, http_status=code)
        if isinstance(exc, kite_exceptions.GeneralException) and (code is None or code >= 500):
            return BrokerUnavailable(message, http_status=code)
        if code is not None and code >= 500 and not isinstance(exc, kite_exceptions.OrderException):
            return BrokerUnavailable(message, http_status=code)
        return BrokerRejected(message, http_status=code)
    if isinstance(exc, requests.exceptions.ProxyError):
        return BrokerEgressDown("the egress proxy is unreachable or could not reach the broker")
    if isinstance(exc, requests.Timeout):
        return BrokerUnavailable("broker did not answer in time")
    if isinstance(exc, requests.ConnectionError):
        return BrokerUnavailable("broker is unreachable (connection failed)")
    if isinstance(exc, requests.RequestException):
        return BrokerUnavailable(f"broker request failed ({type(exc).__name__})")
    # The client indexes response headers and bodies without defaults (KeyError, TypeError, ValueError):
    # a malformed answer is the broker's fault and may be temporary.
    return BrokerUnavailable(f"broker sent an unexpected response ({type(exc).__name__})")


def token_expiry(issued_at: datetime, settings: Settings) -> datetime:
    """The 06:00 exchange-time instant after `issued_at` (issued at 05:00, it dies at 06:00 that day), in UTC.

    UTC because SQLite drops the offset of what it stores: the project stores every instant in UTC.
    """
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(settings.market_timezone)
    local = issued_at.astimezone(tz)
    expiry = datetime.combine(local.date(), KITE_TOKEN_EXPIRY_TIME, tzinfo=tz)
    if local >= expiry:
        expiry = datetime.combine(local.date() + timedelta(days=1), KITE_TOKEN_EXPIRY_TIME, tzinfo=tz)
    return expiry.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Instrument:
    instrument_token: int
    exchange: str
    tradingsymbol: str
    name: str
    tick_size: float
    lot_size: int
    instrument_type: str
    segment: str

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"


class InstrumentMaster:
    """The broker's instrument list indexed by "EXCHANGE:TRADINGSYMBOL"."""

    def __init__(self, instruments: Iterable[Instrument], fetched_at: float) -> None:
        self.by_key: dict[str, Instrument] = {i.key: i for i in instruments}
        self.fetched_at = fetched_at

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, exchange: str, tradingsymbol: str) -> Instrument | None:
        return self.by_key.get(f"{exchange.upper()}:{tradingsymbol.upper()}")

    def token_for(self, instrument: str) -> int | None:
        found = self.by_key.get(instrument.upper())
        return found.instrument_token if found is not None else None

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], fetched_at: float) -> InstrumentMaster:
        parsed: list[Instrument] = []
        for row in rows:
            try:
                parsed.append(
                    Instrument(
                        instrument_token=int(row["instrument_token"]),
                        exchange=str(row["exchange"]),
                        tradingsymbol=str(row["tradingsymbol"]),
                        name=str(row.get("name") or ""),
                        tick_size=float(row.get("tick_size") or 0.05),
                        lot_size=int(row.get("lot_size") or 1),
                        instrument_type=str(row.get("instrument_type") or ""),
                        segment=str(row.get("segment") or ""),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue  # one malformed row must not make every symbol unknown
        return cls(parsed, fetched_at)

    @classmethod
    def from_csv(cls, content: bytes | str, fetched_at: float) -> InstrumentMaster:
        text = content.decode() if isinstance(content, bytes) else content
        return cls.from_rows(csv.DictReader(io.StringIO(text)), fetched_at)


class _InstrumentCache:
    """One instrument master per (api root, exchange) per process, refreshed after `ttl` seconds.

    The list is the same for every trader and is several MB on the real Kite, so it is fetched once and
    shared; the lock makes concurrent first requests wait for one download instead of starting many.
    """

    def __init__(self, ttl: float = 6 * 3600) -> None:
        self.ttl = ttl
        self._masters: dict[tuple[str, str], InstrumentMaster] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def fresh(self, key: tuple[str, str]) -> InstrumentMaster | None:
        master = self._masters.get(key)
        if master is not None and time.monotonic() - master.fetched_at < self.ttl:
            return master
        return None

    def lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def put(self, key: tuple[str, str], master: InstrumentMaster) -> None:
        self._masters[key] = master

    def clear(self) -> None:
        self._masters.clear()
        self._locks.clear()


INSTRUMENT_CACHE = _InstrumentCache()


@dataclass(frozen=True, slots=True)
class BrokerSession:
    """What `generate_session` returns that the project keeps (the token is a secret: never log it)."""

    access_token: str
    broker_user_id: str
    user_name: str | None
    login_time: datetime | None


@dataclass(frozen=True, slots=True)
class BrokerProfile:
    broker_user_id: str
    user_name: str | None
    email: str | None
    broker: str | None


class QuotePace:
    """Kite answers one quote request a second per api_key (429 beyond). Quote calls of one api_key in this
    process are spaced a second apart: each takes the next free second before it awaits, so callers queue in
    order without a lock (nothing to bind to one event loop). Another process of ours may still take the same
    second: the caller retries that 429 once the second is over."""

    # A tenth over the second: calls that start a second apart arrive closer when the first travels slower.
    def __init__(self, interval: float = 1.1) -> None:
        self.interval = interval
        self._next_free: dict[str, float] = {}

    async def turn(self, api_key: str) -> None:
        now = time.monotonic()
        at = max(now, self._next_free.get(api_key, now))
        self._next_free[api_key] = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


QUOTE_PACE = QuotePace()
QUOTE_ATTEMPTS = 3
# The price only guards create and start against a stop or target on the wrong side of the market (a stop the
# market crosses later is the stop-loss's job, at once): a few seconds old is close enough, and saves the calls.
QUOTE_FRESH_SECONDS = 5.0
FRESH_PRICES: dict[tuple[str, str], tuple[float, float]] = {}  # (api root, instrument) -> (monotonic, price)


# The instants (time.time()) at which calls made in this context were answered, taken in each call's thread as
# the answer came back, for a caller that dates something by them (the rate limiter dates a grant by its call's
# answer: the broker counted the order before it answered). The event loop resumes the caller only later, tens of
# milliseconds later in a burst. Set by the caller to a list of its own; calls without an answer add nothing.
ANSWERED_AT: ContextVar[list[float] | None] = ContextVar("answered_at", default=None)

# The instant (time.time()) before which calls made in this context must not leave: the rate limiter's grant for a
# slot about to free. The call's thread waits for it, to the millisecond, while the event loop, tens of
# milliseconds behind in a burst, has handed the call over a little early (`BrokerRateLimiter`'s `hand_over_early`).
SEND_AT: ContextVar[float | None] = ContextVar("send_at", default=None)
# How early a call due at SEND_AT may be handed to its thread: more than the event loop's lag in a burst (10 to 35
# ms), little enough that the threads waiting do not fill the pool.
SEND_AT_LEAD_SECONDS = 0.05


def ensure_in_time(leave_by: float | None) -> None:
    """Raise BrokerCallLate if an order call due to start by `leave_by` (time.monotonic()) is past it."""
    if leave_by is not None and (late := time.monotonic() - leave_by) > 0:
        raise BrokerCallLate(f"not sent: the call could not start in its window ({late:.2f}s late)")


def note_answer(response: Response, *args: Any, **kwargs: Any) -> None:
    """A response hook: the instant the broker's answer (its status and headers) came back, for `ANSWERED_AT`.
    Taken as soon as the session has it, before the body is read and the client has looked at it: each of those
    steps may wait for the interpreter in a busy worker, and a grant dated later keeps the next one later."""
    if (answered := ANSWERED_AT.get()) is not None:
        answered.append(time.time())


def _in_thread(leave_by: float | None, method: Callable[..., T]) -> Callable[..., T]:
    """`method` as run in a broker thread: not started before `SEND_AT` nor past `leave_by`, and its answer's instant
    noted."""
    answered = ANSWERED_AT.get()  # the caller's list: the thread runs in a copy of the caller's context
    send_at = SEND_AT.get()
    if leave_by is None and answered is None and send_at is None:
        return method

    def in_time(*args: Any, **kwargs: Any) -> T:
        if send_at is not None and (early := send_at - time.time()) > 0:
            time.sleep(early)
        ensure_in_time(leave_by)  # in the thread, right before the request: nothing can delay it after this
        noted = len(answered) if answered is not None else 0
        answer = method(*args, **kwargs)
        if answered is not None and len(answered) == noted:
            answered.append(time.time())  # a client without the hook (`note_answer`)
        return answer

    return in_time


# The response fields the official client turns into datetimes ("YYYY-MM-DD HH:MM:SS", exchange time, naive).
_CLIENT_DATETIME_FIELDS = (
    "order_timestamp", "exchange_timestamp", "created", "last_instalment", "fill_timestamp", "timestamp",
    "last_trade_time",
)  # fmt: skip


class KiteClient(KiteConnect):
    """The official client, with its responses' timestamps read by the standard library's ISO parser.

    The client converts each with dateutil's general parser: 2.7 ms of the interpreter per 60-order book, and in an
    exits burst a trader's book is read several times a second while the event loop waits for the interpreter.
    `datetime.fromisoformat` gives the same naive datetime in a fraction of a microsecond; anything it cannot read
    is left to the client's own. Every request is still the client's."""

    def _format_response(self, data: Any) -> Any:
        for item in data if isinstance(data, list) else [data] if isinstance(data, dict) else []:
            try:
                parsed = {
                    field: datetime.fromisoformat(value)
                    for field in _CLIENT_DATETIME_FIELDS
                    if isinstance(value := item.get(field), str) and len(value) == 19
                }
            except ValueError:
                super()._format_response(item)  # what the standard library cannot read, the client's parser does
            else:
                item.update(parsed)
        return data


# The transport of every call that needs no egress, shared by every client in the process: its connections are
# reused whoever's token a request carries. As many idle ones per target as there are broker threads.
DIRECT_SESSION = PooledSession(pool_size=64)


class KiteBroker:
    """One trader's Kite Connect session. Cheap to build: one per request or per strategy is fine.

    With an `egress`, order calls (`order_client`, `order_call`) leave through the trader's proxy over the
    connections pooled for that egress; reads (`client`) go direct, as Kite answers them from any address."""

    def __init__(
        self, settings: Settings, api_key: str, access_token: str | None = None, egress: Egress | None = None
    ) -> None:
        self.settings = settings
        self.egress = egress
        self._kite = KiteClient(
            api_key,
            access_token=access_token,
            root=settings.kite_api_root,
            timeout=settings.broker_timeout_seconds,
        )
        self._kite.reqsession = DIRECT_SESSION
        self._orders_kite = self._kite
        if egress is not None:
            self._orders_kite = KiteClient(
                api_key,
                access_token=access_token,
                root=settings.kite_api_root,
                timeout=settings.broker_timeout_seconds,
                proxies=egress.proxies,
            )
            self._orders_kite.reqsession = EGRESS_SESSIONS.session(egress)
        for session in (self._kite.reqsession, self._orders_kite.reqsession):  # an egress's is shared: hooked once
            if note_answer not in (hooks := session.hooks.setdefault("response", [])):
                hooks.append(note_answer)

    @property
    def client(self) -> KiteConnect:
        """The underlying official client, for calls not wrapped here yet (wrap them with `call`)."""
        return self._kite

    @property
    def order_client(self) -> KiteConnect:
        """The client for order calls (place, modify, cancel): through the egress when there is one."""
        return self._orders_kite

    async def order_call(self, method: Callable[..., T], *args: Any, leave_by: float | None = None, **kwargs: Any) -> T:
        """`call` for a method of `order_client`: through an egress, a connection failure is the egress's."""
        try:
            return await self.call(method, *args, leave_by=leave_by, **kwargs)
        except BrokerUnavailable as exc:
            if self.egress is None or isinstance(exc, BrokerEgressDown):
                raise
            if isinstance(exc.__cause__, requests.ConnectionError) and not isinstance(exc.__cause__, requests.Timeout):
                # A SOCKS proxy that is down fails as a plain connection error.
                raise BrokerEgressDown(f"the egress {self.egress.display} is unreachable") from exc.__cause__
            raise

    async def call(self, method: Callable[..., T], *args: Any, leave_by: float | None = None, **kwargs: Any) -> T:
        """Run a sync client method in a thread and map its failures to BrokerError subclasses.

        `leave_by` (time.monotonic()): the call is made only if its thread starts by then, else BrokerCallLate and
        nothing is sent. An order's attempt row promises other processes that the order left within a window of
        the row's date (`Ledger.sent`); a busy event loop or a full thread pool must not stretch that."""
        name = getattr(method, "__name__", "call")
        started = time.perf_counter()
        try:
            answer = await asyncio.to_thread(_in_thread(leave_by, method), *args, **kwargs)
            BROKER_CALL_SECONDS.labels(name, "ok").observe(time.perf_counter() - started)
            return answer
        except Exception as exc:
            mapped = map_kite_exception(exc)
            BROKER_CALL_SECONDS.labels(name, type(mapped).__name__).observe(time.perf_counter() - started)
            # Type and broker message only: the client's exceptions never carry credentials.
            log.info("broker call %s failed: %s: %s", getattr(method, "__name__", method), type(mapped).__name__,
                     mapped.message)  # fmt: skip
            raise mapped from exc

    async def profile(self) -> BrokerProfile:
        data = await self.call(self._kite.profile)
        if not isinstance(data, dict) or not data.get("user_id"):
            raise BrokerUnavailable("broker profile response has no user_id")
        return BrokerProfile(
            broker_user_id=str(data["user_id"]),
            user_name=_opt_str(data.get("user_name")),
            email=_opt_str(data.get("email")),
            broker=_opt_str(data.get("broker")),
        )

    async def generate_session(self, request_token: str, api_secret: str) -> BrokerSession:
        """Exchange a one-time request token for an access token (checksum computed by the client)."""
        data = await self.call(self._kite.generate_session, request_token, api_secret)
        if not isinstance(data, dict) or not data.get("access_token"):
            raise BrokerUnavailable("broker session response has no access_token")
        login_time = data.get("login_time")
        return BrokerSession(
            access_token=str(data["access_token"]),
            broker_user_id=str(data.get("user_id") or ""),
            user_name=_opt_str(data.get("user_name")),
            login_time=login_time if isinstance(login_time, datetime) else None,
        )

    async def instruments(self, exchange: str | None = None) -> InstrumentMaster:
        """The cached instrument master (all exchanges, or one); downloaded on first use and after the TTL."""
        key = (self.settings.kite_api_root, exchange or "*")
        if (master := INSTRUMENT_CACHE.fresh(key)) is not None:
            return master
        async with INSTRUMENT_CACHE.lock(key):
            if (master := INSTRUMENT_CACHE.fresh(key)) is not None:
                return master
            rows = (
                await self.call(self._kite.instruments, exchange)
                if exchange
                else await self.call(self._kite.instruments)
            )
            master = InstrumentMaster.from_rows(rows, time.monotonic())
            if not master:
                raise BrokerUnavailable("broker returned an empty instrument list")
            INSTRUMENT_CACHE.put(key, master)
            log.info("instrument master loaded: %d instruments (%s)", len(master), exchange or "all")
            return master

    async def lookup(self, exchange: str, tradingsymbol: str) -> Instrument | None:
        master = await self.instruments()
        return master.get(exchange, tradingsymbol)

    async def last_price(self, instrument: str) -> float:
        """The broker's last traded price of "EXCHANGE:TRADINGSYMBOL" (Kite's /quote/ltp), paced to Kite's one
        quote request a second per api_key (`QuotePace`). A price read in this process in the last few seconds
        is answered from memory: market data is the same whoever asked, and a burst of creates needs no call each."""
        fresh_key = (self.settings.kite_api_root, instrument)
        read_at, fresh = FRESH_PRICES.get(fresh_key, (-float("inf"), 0.0))
        if time.monotonic() - read_at < QUOTE_FRESH_SECONDS:
            return fresh
        for attempt in range(QUOTE_ATTEMPTS):
            await QUOTE_PACE.turn(self._kite.api_key)
            try:
                data = await self.call(self._kite.ltp, [instrument])
                break
            except BrokerThrottled:  # another process of ours took this api_key's second
                if attempt == QUOTE_ATTEMPTS - 1:
                    raise
        quote = data.get(instrument) if isinstance(data, dict) else None
        price = quote.get("last_price") if isinstance(quote, dict) else None
        if not isinstance(price, int | float) or price <= 0:
            raise BrokerUnavailable(f"broker has no last price for {instrument}")
        FRESH_PRICES[fresh_key] = (time.monotonic(), float(price))
        return float(price)


def _opt_str(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


__all__ = [
    "BrokerEgressDown",
    "BrokerError",
    "BrokerProfile",
    "BrokerRejected",
    "BrokerSession",
    "BrokerSourceRefused",
    "BrokerTokenExpired",
    "BrokerUnavailable",
    "INSTRUMENT_CACHE",
    "Instrument",
    "InstrumentMaster",
    "KiteBroker",
    "map_kite_exception",
    "token_expiry",
]

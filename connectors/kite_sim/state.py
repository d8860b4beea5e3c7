"""The simulator's whole world in one object: accounts and tokens, prices, orders, positions, faults, audit.

Everything the REST routes, the ticker and the engine do goes through `SimulatorState`; tests reach the
same object directly (`RunningSimulator.state`) to create accounts, move prices, inject faults and read
the audit log. Public methods are thread-safe (one re-entrant lock): the server runs in its own thread
and tests call in from theirs.

Money is integer paise throughout; rupees appear only at the JSON boundary.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import threading
import time as monotonic_clock
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any

import orjson

from connectors.kite_sim import errors, rules
from connectors.kite_sim.audit import AuditLog, AuditRecord
from connectors.kite_sim.faults import Fault, FaultKind, FaultRegistry, FaultScope
from connectors.kite_sim.instruments import Instrument, InstrumentMaster, default_master
from connectors.kite_sim.orders import (
    AMO_REQ_RECEIVED,
    CANCEL_PENDING,
    CANCELLED,
    COMPLETE,
    MODIFY_PENDING,
    MODIFY_VALIDATION_PENDING,
    OPEN,
    OPEN_PENDING,
    ORDER_TYPES,
    PRODUCTS,
    PUT_ORDER_REQ_RECEIVED,
    REJECTED,
    TRANSACTION_TYPES,
    TRIGGER_PENDING,
    UNSUPPORTED_VARIETIES,
    VALIDATION_PENDING,
    VALIDITIES,
    VARIETIES,
    Order,
    Position,
    Trade,
    rupees,
)
from connectors.kite_sim.prices import EXCHANGE_TZ, PriceBook, ReplaySource, rupees_to_paise
from core.clock import Clock, get_clock
from core.market import MarketCalendar
from core.settings import Settings, get_settings

# The margin fields of Kite's fixtures (zerodha/kiteconnect-mocks margins.json), the same for both segments.
_AVAILABLE_FIELDS = ("adhoc_margin", "cash", "opening_balance", "live_balance", "collateral", "intraday_payin")
_UTILISED_FIELDS = (
    "debits", "exposure", "m2m_realised", "m2m_unrealised", "option_premium", "payout", "span", "holding_sales",
    "turnover", "liquid_collateral", "stock_collateral", "delivery",
)  # fmt: skip
# Kite takes a primary and an optional secondary static IP, changed at most once a week.
MAX_WHITELISTED_IPS = 2
IP_WHITELIST_CHANGE_INTERVAL = timedelta(days=7)
TAG_PATTERN = re.compile(r"^[A-Za-z0-9]{1,20}$")
BROKER = "ZERODHA"
# Kite's exact wording for this refusal is not published (see docs/egress.md); this text names the cause.
SOURCE_IP_REFUSED = (
    "Order request from IP {source} is not allowed: the IP is not whitelisted for this app. "
    "Register your static IP on the Kite Connect developer console."
)


@dataclass(slots=True)
class SimConfig:
    """Knobs tests and benchmarks turn (also through `POST /_sim/config`)."""

    rate_limit_enabled: bool = True
    orders_per_second: int = 10  # Kite's documented per-api_key order limit
    slippage_ticks: int = 0  # market orders fill this many ticks worse than the last price
    mis_margin_percent: int = 20  # intraday leverage 5x; CNC/NRML need the full value
    tick_interval: float = 0.25  # seconds between price steps / tick emissions; 0 = as fast as possible
    heartbeat_interval: float = 1.0
    max_subscriptions: int = 3000  # per websocket connection, as Kite
    max_connections_per_key: int = 3
    max_packets_per_frame: int = 1000
    request_token_ttl_seconds: float = 300.0
    # Kite's 2026 rules (connectors/kite_sim/rules.py, docs/kite-rules.md), each on by default.
    market_protection_required: bool = True  # MARKET / SL-M without market_protection refused
    market_protection_band: bool = True  # a protected market order trades only within its band, else rests OPEN
    # Price model, not a Kite rule (off by default): in a move, a market order trades as far again beyond the
    # last price as the last step moved against it (a thin book swept in a fast market).
    fast_move_slippage: bool = False
    max_modifications: int = 25  # per order; the next modification is refused (cancel and place anew)
    modification_limit_enabled: bool = True
    market_hours_enforced: bool = True  # regular orders outside market hours refused (variety amo accepted)
    mis_square_off_enabled: bool = True  # open MIS positions squared off (untagged orders) at the cut-off
    mis_square_off_time: time = time(15, 20)  # exchange time (equity; F&O is 15:25); new MIS refused after
    orders_per_minute: int = 400  # per api_key, place + modify + cancel (2026 staff answers; earlier 200)
    orders_per_day: int = 5000  # per api_key and trading day (earlier 3,000)
    minute_limit_enabled: bool = True
    day_limit_enabled: bool = True
    rate_limit_counts_modify_cancel: bool = True  # Kite's order limits cover place, modify and cancel
    read_limits_enabled: bool = True
    quotes_per_second: int = 1  # /quote, /quote/ltp, /quote/ohlc per api_key
    other_reads_per_second: int = 10  # every other authenticated read (order book, positions, profile, ...)
    historical_per_second: int = 3  # no historical endpoint here yet: kept for when there is one
    # Kite refuses order calls (place, modify, cancel) from addresses not on the account's IP whitelist. The
    # check applies only to accounts that have a whitelist; this switch turns it off for all of them.
    static_ip_check: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Holding:
    instrument: Instrument
    quantity: int
    average_price: int  # paise


@dataclass(slots=True)
class Account:
    api_key: str
    api_secret: str
    user_id: str
    user_name: str
    email: str
    opening_balance: int  # paise
    cash: int  # opening balance plus realised P&L
    redirect_url: str | None = None
    blocked: int = 0  # paise held by open orders
    used: int = 0  # paise held by open positions
    orders: dict[str, Order] = field(default_factory=dict)
    trades: list[Trade] = field(default_factory=list)
    positions: dict[tuple[str, str, str], Position] = field(default_factory=dict)
    holdings: list[Holding] = field(default_factory=list)
    order_rate: rules.OrderRateWindows = field(default_factory=rules.OrderRateWindows)
    quote_rate: rules.ReadWindow = field(default_factory=rules.ReadWindow)
    read_rate: rules.ReadWindow = field(default_factory=rules.ReadWindow)
    ip_whitelist: tuple[str, ...] = ()  # empty: no whitelist registered, order calls answer from anywhere
    ip_whitelist_changed_at: datetime | None = None  # simulator clock

    @property
    def available(self) -> int:
        return self.cash - self.blocked - self.used


@dataclass(frozen=True, slots=True)
class AccountCredentials:
    """What `create_account` hands back: enough to log in with the official client or skip the login."""

    api_key: str
    api_secret: str
    user_id: str
    request_token: str
    access_token: str

    def to_dict(self) -> dict[str, str]:
        return {
            "api_key": self.api_key,
            "api_secret": self.api_secret,
            "user_id": self.user_id,
            "request_token": self.request_token,
            "access_token": self.access_token,
        }


@dataclass(slots=True)
class _Token:
    api_key: str
    expires_at: datetime


def next_token_expiry(now: datetime) -> datetime:
    """Kite access tokens die at 06:00 IST the next morning."""
    local = now.astimezone(EXCHANGE_TZ)
    expiry = local.replace(hour=6, minute=0, second=0, microsecond=0)
    if expiry <= local:
        expiry += timedelta(days=1)
    return expiry


def _instrument_of(order: Order) -> Instrument:
    # Only orders for known instruments get past validation; anything else reaching here is a bug.
    if order.instrument is None:
        raise RuntimeError(f"order {order.order_id} has no instrument")
    return order.instrument


def _param(params: dict[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise errors.input_error(f"Missing `{name}`.")
    return value


def _int_param(params: dict[str, str], name: str, default: int | None = None) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        if default is None:
            raise errors.input_error(f"Missing `{name}`.")
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.input_error(f"Invalid `{name}`.") from None


def _price_param(params: dict[str, str], name: str) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = float(raw)
    except ValueError:
        raise errors.input_error(f"Invalid `{name}`.") from None
    if value < 0 or value != value:  # negative or NaN
        raise errors.input_error(f"Invalid `{name}`.")
    return rupees_to_paise(raw) if "e" not in raw.lower() else rupees_to_paise(value)


class SimulatorState:
    def __init__(
        self,
        master: InstrumentMaster | None = None,
        clock: Clock | None = None,
        config: SimConfig | None = None,
        seed: int = 20240101,
        walk: bool = True,
        settings: Settings | None = None,
    ) -> None:
        self.master = master or default_master()
        self.clock = clock or get_clock()
        self.config = config or SimConfig()
        self._initial_config = replace(self.config)
        self.calendar = MarketCalendar(settings or get_settings())
        now = self.clock.now()
        self.book = PriceBook(self.master, now, seed=seed, walk=walk)
        self.faults = FaultRegistry()
        self.audit = AuditLog()
        self.feed_paused = False
        self.accounts: dict[str, Account] = {}
        self._access_tokens: dict[str, _Token] = {}
        self._request_tokens: dict[str, _Token] = {}
        self._orders: dict[str, Order] = {}
        self._trades_by_order: dict[str, list[Trade]] = {}
        self._open_by_token: dict[int, dict[str, Order]] = {}
        self._amo_waiting: dict[str, Order] = {}
        self._squared_off_on: date | None = None
        self.auto_square_offs: list[str] = []  # order ids of the broker's own square-off orders
        self._lock = threading.RLock()
        self._order_seq = 0
        self._trade_seq = 0
        self._exchange_seq = 0
        self._id_prefix = now.astimezone(EXCHANGE_TZ).strftime("%y%m%d")
        self._time_cache: tuple[int, str] = (-1, "")
        # Set by the ticker hub: called with (api_key, text frame) for every order update.
        self.order_update_sink: Callable[[str, bytes], None] | None = None
        # Set by the websocket layer: drop connections (all, or one api_key's).
        self.drop_connections_hook: Callable[[str | None], int] | None = None
        # Set by the app: wake every request held by a `timeout` fault.
        self.release_hook: Callable[[], None] | None = None

    # --- time ------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.clock.now()

    def format_epoch(self, epoch: int) -> str:
        return datetime.fromtimestamp(epoch, EXCHANGE_TZ).strftime("%Y-%m-%d %H:%M:%S")

    def exchange_time(self, now: datetime | None = None) -> str:
        """`YYYY-MM-DD HH:MM:SS` in exchange time (cached per second: it is on every order)."""
        now = now or self.clock.now()
        second = int(now.timestamp())
        cached_second, text = self._time_cache
        if cached_second != second:
            text = now.astimezone(EXCHANGE_TZ).strftime("%Y-%m-%d %H:%M:%S")
            self._time_cache = (second, text)
        return text

    # --- accounts and tokens ---------------------------------------------------------------------

    def create_account(
        self,
        api_key: str,
        api_secret: str | None = None,
        user_id: str | None = None,
        user_name: str | None = None,
        email: str | None = None,
        balance: float = 1_000_000.0,
        access_token: str | None = None,
        redirect_url: str | None = None,
        holdings: Iterable[tuple[str, int, float]] = (),
    ) -> AccountCredentials:
        """Create (or replace) an account; returns a fresh request token and a valid access token.

        `holdings` are `("NSE:INFY", quantity, average_price)` triples shown by `/portfolio/holdings`.
        """
        if not api_key:
            raise ValueError("api_key is required")
        with self._lock:
            user_id = user_id or f"SIM{len(self.accounts) + 1:04d}"
            balance_paise = rupees_to_paise(balance)
            account = Account(
                api_key=api_key,
                api_secret=api_secret or secrets.token_hex(16),
                user_id=user_id,
                user_name=user_name or f"Simulated User {user_id}",
                email=email or f"{user_id.lower()}@example.com",
                opening_balance=balance_paise,
                cash=balance_paise,
                redirect_url=redirect_url,
            )
            for key, quantity, average in holdings:
                instrument = self.master.by_key(key)
                if instrument is None:
                    raise ValueError(f"unknown instrument {key}")
                account.holdings.append(Holding(instrument, quantity, rupees_to_paise(average)))
            self.accounts[api_key] = account
            request_token = self.mint_request_token(api_key)
            access = self.mint_access_token(api_key, access_token)
            return AccountCredentials(api_key, account.api_secret, user_id, request_token, access)

    def account(self, api_key: str) -> Account:
        try:
            return self.accounts[api_key]
        except KeyError:
            raise errors.input_error("Invalid `api_key`.") from None

    def mint_request_token(self, api_key: str) -> str:
        """A single-use request token, valid for `config.request_token_ttl_seconds`."""
        with self._lock:
            self.account(api_key)
            token = secrets.token_hex(16)
            expires = self.clock.now() + timedelta(seconds=self.config.request_token_ttl_seconds)
            self._request_tokens[token] = _Token(api_key, expires)
            return token

    def mint_access_token(self, api_key: str, token: str | None = None) -> str:
        with self._lock:
            self.account(api_key)
            token = token or secrets.token_hex(16)
            self._access_tokens[token] = _Token(api_key, next_token_expiry(self.clock.now()))
            return token

    def expire_tokens(self, api_key: str, access_token: str | None = None) -> int:
        """Expire one access token, or every token of the account; returns how many."""
        with self._lock:
            doomed = [
                t
                for t, rec in self._access_tokens.items()
                if rec.api_key == api_key and (access_token is None or t == access_token)
            ]
            for t in doomed:
                del self._access_tokens[t]
            return len(doomed)

    def generate_session(self, api_key: str, request_token: str, checksum: str) -> dict[str, Any]:
        with self._lock:
            account = self.accounts.get(api_key)
            if account is None:
                raise errors.token_error("Invalid `api_key`.")
            # Single use: the token is gone whether or not the checksum matches, as on Kite.
            record = self._request_tokens.pop(request_token, None)
            now = self.clock.now()
            if record is None or record.api_key != api_key or record.expires_at <= now:
                raise errors.token_error("Token is invalid or has expired.")
            expected = hashlib.sha256((api_key + request_token + account.api_secret).encode()).hexdigest()
            if not secrets.compare_digest(expected, checksum):
                raise errors.token_error("Invalid checksum.")
            access_token = self.mint_access_token(api_key)
            return {
                "user_type": "individual",
                "email": account.email,
                "user_name": account.user_name,
                "user_shortname": account.user_name.split()[0],
                "broker": BROKER,
                "exchanges": sorted(self.master.exchanges()),
                "products": sorted(PRODUCTS),
                "order_types": sorted(ORDER_TYPES),
                "avatar_url": None,
                "user_id": account.user_id,
                "api_key": api_key,
                "access_token": access_token,
                "public_token": secrets.token_hex(16),
                "refresh_token": "",
                "silo": "",
                "enctoken": secrets.token_urlsafe(24),
                "login_time": self.exchange_time(now),
                "meta": {"demat_consent": "consent"},
            }

    def invalidate_access_token(self, api_key: str, access_token: str) -> bool:
        return self.expire_tokens(api_key, access_token) > 0

    def _token_account(self, api_key: str, access_token: str) -> Account | None:
        record = self._access_tokens.get(access_token)
        if record is None or record.api_key != api_key:
            return None
        if record.expires_at <= self.clock.now():
            self._access_tokens.pop(access_token, None)
            return None
        return self.accounts.get(api_key)

    def authenticate(self, authorization: str | None) -> Account:
        """`Authorization: token api_key:access_token` -> the account, or 403 TokenException."""
        if not authorization or not authorization.startswith("token "):
            raise errors.token_error()
        api_key, _, access_token = authorization[6:].partition(":")
        account = self._token_account(api_key, access_token)
        if account is None:
            raise errors.token_error()
        return account

    def authenticate_ws(self, api_key: str, access_token: str) -> Account | None:
        return self._token_account(api_key, access_token)

    # --- static IP whitelist (Kite's developer console) -----------------------------------------------

    def set_ip_whitelist(self, api_key: str, ips: Iterable[str], force: bool = False) -> tuple[str, ...]:
        """Register the account's static IPs (1 or 2), at most once a week on the simulator clock, as Kite
        allows; `force` skips the weekly limit (test setup only). Returns the normalised whitelist."""
        normalised: list[str] = []
        for raw in ips:
            try:
                address = str(ipaddress.ip_address(str(raw).strip()))
            except ValueError:
                raise errors.input_error(f"Invalid IP address `{raw}`.") from None
            if address not in normalised:
                normalised.append(address)
        if not 1 <= len(normalised) <= MAX_WHITELISTED_IPS:
            raise errors.input_error(f"Give one primary and at most {MAX_WHITELISTED_IPS - 1} secondary IP.")
        with self._lock:
            account = self.account(api_key)
            now = self.clock.now()
            changed = account.ip_whitelist_changed_at
            if not force and changed is not None and now - changed < IP_WHITELIST_CHANGE_INTERVAL:
                next_change = (changed + IP_WHITELIST_CHANGE_INTERVAL).astimezone(EXCHANGE_TZ)
                raise errors.input_error(
                    "The IP whitelist can be changed once a week; "
                    f"next change allowed after {next_change:%Y-%m-%d %H:%M}."
                )
            account.ip_whitelist = tuple(normalised)
            account.ip_whitelist_changed_at = now
            return account.ip_whitelist

    def check_source_address(self, account: Account, source: str | None) -> None:
        """Refuse an order call from an address off the account's whitelist (accounts without one: any)."""
        if not self.config.static_ip_check or not account.ip_whitelist:
            return
        if source not in account.ip_whitelist:
            raise errors.permission_error(SOURCE_IP_REFUSED.format(source=source or "unknown"))

    # --- prices (test API) -----------------------------------------------------------------------

    def instrument(self, key: str) -> Instrument:
        ins = self.master.by_key(key)
        if ins is None:
            raise KeyError(f"unknown instrument {key!r}")
        return ins

    def set_price(self, key: str, price: float, quantity: int = 1) -> None:
        """Trade `key` ("NSE:INFY") at `price` rupees now; the instrument stops random-walking."""
        self.book.set_price(key, rupees_to_paise(price), self.clock.now(), quantity)

    def script_path(self, key: str, steps: Iterable[tuple[datetime | float, float]]) -> None:
        """Scripted path: `(at, rupees)` steps; `at` is a datetime or seconds after now ("t+3s")."""
        now = self.clock.now()
        resolved = [
            (at if isinstance(at, datetime) else now + timedelta(seconds=at), rupees_to_paise(price))
            for at, price in steps
        ]
        self.book.script_path(key, resolved)

    def last_price(self, key: str) -> float:
        quote = self.book.quote_by_key(key)
        if quote is None:
            raise KeyError(f"unknown instrument {key!r}")
        return quote.last / 100

    def replay(self, source: ReplaySource | str | None, speed: float = 1.0) -> None:
        if isinstance(source, str):
            source = ReplaySource.from_file(source, speed)
        self.book.replay(source)

    # --- faults and audit (test API) -------------------------------------------------------------

    def inject_fault(self, kind: FaultKind | str, **options: Any) -> Fault:
        """e.g. `inject_fault("error", api_key="k", status=503, error_type="NetworkException", count=2)`."""
        return self.faults.add(Fault(kind=FaultKind(kind), **options))

    def clear_faults(self) -> None:
        """Remove every fault and let requests held by `timeout` faults answer."""
        self.faults.clear()
        self.release_held()

    def release_held(self) -> None:
        if self.release_hook is not None:
            self.release_hook()

    def audit_records(
        self, api_key: str | None = None, tag: str | None = None, since: datetime | None = None
    ) -> list[AuditRecord]:
        return self.audit.records(api_key=api_key, tag=tag, since=since)

    def drop_connections(self, api_key: str | None = None) -> int:
        return self.drop_connections_hook(api_key) if self.drop_connections_hook else 0

    # --- orders ----------------------------------------------------------------------------------

    def check_rate_limit(self, account: Account, action: str = "place") -> None:
        """Kite's order caps per api_key: per second and per minute as sliding windows, per trading day. Real
        (monotonic) time for the first two on purpose: the limit is on how fast requests arrive, whatever the
        project clock's speed."""
        config = self.config
        if not config.rate_limit_enabled or (action != "place" and not config.rate_limit_counts_modify_cancel):
            return
        with self._lock:
            account.order_rate.admit(
                monotonic_clock.monotonic(),
                self.calendar.trading_day_of(self.clock.now()),
                max(1, config.orders_per_second),
                config.orders_per_minute if config.minute_limit_enabled else None,
                config.orders_per_day if config.day_limit_enabled else None,
            )

    def check_quote_limit(self, account: Account) -> None:
        if self.config.read_limits_enabled:
            with self._lock:
                account.quote_rate.admit(monotonic_clock.monotonic(), max(1, self.config.quotes_per_second))

    def check_read_limit(self, account: Account) -> None:
        if self.config.read_limits_enabled:
            with self._lock:
                account.read_rate.admit(monotonic_clock.monotonic(), max(1, self.config.other_reads_per_second))

    def _after_mis_cutoff(self, now: datetime) -> bool:
        local = self.calendar.local(now)
        return self.config.mis_square_off_enabled and local.time() >= self.config.mis_square_off_time

    def _next_order_id(self) -> str:
        self._order_seq += 1
        return f"{self._id_prefix}{self._order_seq:09d}"

    def place_order(
        self, account: Account, variety: str, params: dict[str, str], reject_message: str | None = None
    ) -> Order:
        """Validate, accept and (for marketable orders) fill. Malformed input raises InputException;
        well-formed orders the exchange/RMS would refuse come back REJECTED with a status_message."""
        if variety in UNSUPPORTED_VARIETIES:
            raise errors.input_error(f"Variety `{variety}` is not supported by the simulator.")
        if variety not in VARIETIES:
            raise errors.input_error("Invalid `variety`.")
        exchange = _param(params, "exchange").upper()
        tradingsymbol = _param(params, "tradingsymbol").upper()
        transaction_type = _param(params, "transaction_type").upper()
        if transaction_type not in TRANSACTION_TYPES:
            raise errors.input_error("Invalid `transaction_type`.")
        product = _param(params, "product").upper()
        if product not in PRODUCTS:
            raise errors.input_error("Invalid `product`.")
        order_type = _param(params, "order_type").upper()
        if order_type not in ORDER_TYPES:
            raise errors.input_error("Invalid `order_type`.")
        validity = (params.get("validity") or "DAY").upper()
        if validity not in VALIDITIES:
            raise errors.input_error("Invalid `validity`.")
        quantity = _int_param(params, "quantity")
        price = _price_param(params, "price")
        trigger = _price_param(params, "trigger_price")
        disclosed = _int_param(params, "disclosed_quantity", 0)
        protection = rules.parse_market_protection(params.get("market_protection"))
        if self.config.market_protection_required:
            rules.require_protection(order_type, protection)
        tag = params.get("tag") or None
        if tag is not None and not TAG_PATTERN.match(tag):
            raise errors.input_error("Invalid `tag`: at most 20 alphanumeric characters.")
        if exchange not in ("NSE", "BSE"):
            raise errors.input_error("Invalid `exchange`.")
        now = self.clock.now()
        if variety == "regular" and self.config.market_hours_enforced and not self.calendar.is_open(now):
            raise errors.input_error(rules.MARKET_CLOSED_MESSAGE)
        if product == "MIS" and self._after_mis_cutoff(now):
            cutoff = self.config.mis_square_off_time.strftime("%H:%M")
            raise errors.input_error(rules.MIS_BLOCKED_MESSAGE.format(cutoff=cutoff))

        with self._lock:
            now = self.clock.now()
            ts = self.exchange_time(now)
            order = Order(
                order_id=self._next_order_id(),
                api_key=account.api_key,
                placed_by=account.user_id,
                variety=variety,
                exchange=exchange,
                tradingsymbol=tradingsymbol,
                instrument=self.master.get(exchange, tradingsymbol),
                transaction_type=transaction_type,
                order_type=order_type,
                product=product,
                validity=validity,
                quantity=quantity,
                price=price if order_type in ("LIMIT", "SL") else 0,
                trigger_price=trigger if order_type in ("SL", "SL-M") else 0,
                disclosed_quantity=disclosed,
                tag=tag,
                order_timestamp=ts,
                market_protection=protection,
                algo_id=params.get("algo_id") or None,
                validity_ttl=_int_param(params, "validity_ttl", 0),
                guid=f"sim{self._order_seq}",
            )
            order.transition(PUT_ORDER_REQ_RECEIVED, ts)
            order.transition(VALIDATION_PENDING, ts)
            self._orders[order.order_id] = order
            account.orders[order.order_id] = order

            problem = reject_message or self._rejection_reason(account, order)
            if problem is None:
                problem = self._block_margin(account, order)
            if problem is not None:
                order.transition(REJECTED, ts, problem)
                self._publish(account, order)
                return order

            if variety == "amo":
                order.transition(AMO_REQ_RECEIVED, ts)
                self._amo_waiting[order.order_id] = order
                self._publish(account, order)
                return order
            self._go_to_exchange(account, order, ts)
            return order

    def _rejection_reason(self, account: Account, order: Order) -> str | None:
        ins = order.instrument
        if ins is None:
            return f"Instrument {order.exchange}:{order.tradingsymbol} does not exist on the exchange."
        if not ins.tradable:
            return f"{ins.tradingsymbol} is an index and cannot be traded."
        if order.quantity <= 0:
            return "Quantity should be greater than zero."
        if order.quantity % ins.lot_size:
            return f"Quantity should be a multiple of the lot size {ins.lot_size}."
        if order.disclosed_quantity < 0 or order.disclosed_quantity > order.quantity:
            return "Disclosed quantity cannot exceed the order quantity."
        tick = ins.tick_paise
        if order.order_type in ("LIMIT", "SL"):
            if order.price <= 0:
                return f"Price should be greater than zero for {order.order_type} orders."
            if order.price % tick:
                return f"Price {rupees(order.price):.2f} is not a multiple of the tick size {rupees(tick):.2f}."
        if order.order_type in ("SL", "SL-M"):
            trigger = order.trigger_price
            if trigger <= 0:
                return "Trigger price should be greater than zero for stoploss orders."
            if trigger % tick:
                tick_text = f"{rupees(tick):.2f}"
                return f"Trigger price {rupees(trigger):.2f} is not a multiple of the tick size {tick_text}."
            ltp = self.book.last_price(ins.instrument_token)
            buy = order.transaction_type == "BUY"
            if buy and trigger <= ltp:
                return "Trigger price for stoploss buy orders should be higher than the last traded price."
            if not buy and trigger >= ltp:
                return "Trigger price for stoploss sell orders should be lower than the last traded price."
            if order.order_type == "SL":
                if buy and order.price < trigger:
                    return "Trigger price for stoploss buy orders should not be above the limit price."
                if not buy and order.price > trigger:
                    return "Trigger price for stoploss sell orders should not be below the limit price."
        return None

    def _margin_required(self, account: Account, order: Order) -> int:
        instrument = _instrument_of(order)
        if order.order_type in ("LIMIT", "SL"):
            reference = order.price
        elif order.order_type == "SL-M":
            reference = order.trigger_price
        else:
            reference = self.book.last_price(instrument.instrument_token)
        position = account.positions.get((order.exchange, order.tradingsymbol, order.product))
        net = position.quantity if position else 0
        covering = 0
        if order.transaction_type == "SELL" and net > 0:
            covering = min(order.quantity, net)
        elif order.transaction_type == "BUY" and net < 0:
            covering = min(order.quantity, -net)
        percent = self.config.mis_margin_percent if order.product == "MIS" else 100
        return (order.quantity - covering) * reference * percent // 100

    def _block_margin(self, account: Account, order: Order) -> str | None:
        required = self._margin_required(account, order)
        available = account.available
        if required > available:
            return (
                f"Insufficient funds. Required margin is {rupees(required):.2f} "
                f"but available margin is {rupees(available):.2f}."
            )
        order.blocked_margin = required
        account.blocked += required
        return None

    def _release_margin(self, account: Account, order: Order) -> None:
        account.blocked -= order.blocked_margin
        order.blocked_margin = 0

    def _go_to_exchange(self, account: Account, order: Order, ts: str) -> None:
        instrument = _instrument_of(order)
        order.transition(OPEN_PENDING, ts)
        self._exchange_seq += 1
        order.exchange_order_id = str(1_100_000_000_000_000 + self._exchange_seq)
        order.exchange_timestamp = ts
        order.exchange_update_timestamp = ts
        stoploss = order.order_type in ("SL", "SL-M")
        order.transition(TRIGGER_PENDING if stoploss else OPEN, ts)
        token = instrument.instrument_token
        ltp = self.book.last_price(token)
        if order.order_type == "MARKET":
            self._set_band(order, ltp)
        if not self._try_fill(account, order, ltp, ts):
            self._open_by_token.setdefault(token, {})[order.order_id] = order
            self._publish(account, order)

    def _fill_price(self, order: Order, ltp: int) -> int:
        instrument = _instrument_of(order)
        slip = self.config.slippage_ticks * instrument.tick_paise
        if self.config.fast_move_slippage:
            move = self.book.last_move(instrument.instrument_token)
            if (move > 0) if order.transaction_type == "BUY" else (move < 0):
                slip += abs(move)
        return ltp + slip if order.transaction_type == "BUY" else max(instrument.tick_paise, ltp - slip)

    def _set_band(self, order: Order, ltp: int) -> None:
        """A protected market order reaching the exchange (or an SL-M triggering) becomes, in effect, a limit
        at the last price -/+ its protection."""
        if order.market_protection != 0 and self.config.market_protection_band:
            tick = _instrument_of(order).tick_paise
            order.band_price = rules.band_price(order.transaction_type, ltp, order.market_protection, tick)
        else:
            order.band_price = 0

    def _try_market_fill(self, account: Account, order: Order, ltp: int, ts: str) -> bool:
        price = self._fill_price(order, ltp)
        if order.band_price and not rules.within_band(order.transaction_type, price, order.band_price):
            return False  # the market ran beyond the band: the order rests OPEN, as a limit at the band
        self._fill(account, order, price, ts)
        return True

    def _try_fill(self, account: Account, order: Order, ltp: int, ts: str) -> bool:
        """Fill `order` against last price `ltp` if it should trade; True when it did."""
        buy = order.transaction_type == "BUY"
        kind = order.order_type
        just_triggered = False
        if order.status == TRIGGER_PENDING:
            if not (ltp >= order.trigger_price if buy else ltp <= order.trigger_price):
                return False
            order.transition(OPEN, ts)  # triggered: now a market (SL-M) or limit (SL) order at the exchange
            just_triggered = True
            if kind == "SL-M":
                self._set_band(order, ltp)
        if kind in ("LIMIT", "SL"):
            if (buy and ltp <= order.price) or (not buy and ltp >= order.price):
                self._fill(account, order, ltp, ts)
                return True
            if just_triggered:
                self._publish(account, order)  # tell the client the stoploss triggered
            return False
        if self._try_market_fill(account, order, ltp, ts):
            return True
        if just_triggered:
            self._publish(account, order)
        return False

    def _fill(self, account: Account, order: Order, price: int, ts: str) -> None:
        instrument = _instrument_of(order)
        quantity = order.quantity - order.filled_quantity
        self._release_margin(account, order)
        key = (order.exchange, order.tradingsymbol, order.product)
        position = account.positions.get(key)
        if position is None:
            position = account.positions[key] = Position(instrument, order.product)
        realised_before = position.realised()
        if order.transaction_type == "BUY":
            position.buy_quantity += quantity
            position.buy_value += quantity * price
        else:
            position.sell_quantity += quantity
            position.sell_value += quantity * price
        net = position.quantity
        basis = position.buy_price if net > 0 else position.sell_price
        percent = self.config.mis_margin_percent if order.product == "MIS" else 100
        new_margin = abs(net) * basis * percent // 100
        account.used += new_margin - position.margin
        position.margin = new_margin
        account.cash += position.realised() - realised_before

        self._trade_seq += 1
        trade = Trade(str(10_000_000 + self._trade_seq), order, quantity, price, ts)
        account.trades.append(trade)
        self._trades_by_order.setdefault(order.order_id, []).append(trade)
        order.filled_quantity = order.quantity
        order.average_price = price
        order.exchange_update_timestamp = ts
        order.transition(COMPLETE, ts)
        self._unlist(order)
        self._publish(account, order)

    def _unlist(self, order: Order) -> None:
        if order.instrument is not None:
            book = self._open_by_token.get(order.instrument.instrument_token)
            if book is not None:
                book.pop(order.order_id, None)
                if not book:
                    del self._open_by_token[order.instrument.instrument_token]
        self._amo_waiting.pop(order.order_id, None)

    def _owned_order(self, account: Account, order_id: str) -> Order:
        order = account.orders.get(order_id)
        if order is None:
            raise errors.input_error("Couldn't find that `order_id`.")
        return order

    def modify_order(self, account: Account, variety: str, order_id: str, params: dict[str, str]) -> Order:
        with self._lock:
            order = self._owned_order(account, order_id)
            if order.variety != variety:
                raise errors.input_error("Invalid `variety` for this order.")
            if order.is_terminal:
                raise errors.input_error(f"Order cannot be modified as it is {order.status}.")
            if self.config.modification_limit_enabled and order.modifications >= self.config.max_modifications:
                raise errors.input_error(rules.MAX_MODIFICATIONS_MESSAGE)
            quantity = _int_param(params, "quantity", order.quantity)
            order_type = (params.get("order_type") or order.order_type).upper()
            if order_type not in ORDER_TYPES:
                raise errors.input_error("Invalid `order_type`.")
            price = _price_param(params, "price") if params.get("price") else order.price
            trigger = _price_param(params, "trigger_price") if params.get("trigger_price") else order.trigger_price
            protection = order.market_protection
            if params.get("market_protection"):
                protection = rules.parse_market_protection(params.get("market_protection"))
            if self.config.market_protection_required:
                rules.require_protection(order_type, protection)
            now = self.clock.now()
            ts = self.exchange_time(now)
            previous = (
                order.quantity,
                order.order_type,
                order.price,
                order.trigger_price,
                order.blocked_margin,
            )
            order.quantity, order.order_type = quantity, order_type
            order.price = price if order_type in ("LIMIT", "SL") else 0
            order.trigger_price = trigger if order_type in ("SL", "SL-M") else 0
            self._release_margin(account, order)
            problem = None
            if order.status != TRIGGER_PENDING and order_type in ("SL", "SL-M"):
                problem = "An open order cannot be changed to a stoploss order."
            problem = problem or self._rejection_reason(account, order) or self._block_margin(account, order)
            if problem is not None:
                # Kite refuses the modification and the order stays as it was.
                order.quantity, order.order_type, order.price, order.trigger_price, blocked = previous
                order.blocked_margin = blocked
                account.blocked += blocked
                raise errors.input_error(problem)
            status_before = order.status
            order.modified = True
            order.modifications += 1
            order.market_protection = protection
            order.transition(MODIFY_VALIDATION_PENDING, ts)
            order.transition(MODIFY_PENDING, ts)
            order.transition(status_before, ts)
            if status_before != AMO_REQ_RECEIVED and order.instrument is not None:
                ltp = self.book.last_price(order.instrument.instrument_token)
                # A market order at the exchange is re-banded around the price now; a limit has no band.
                if order_type == "MARKET" and status_before == OPEN:
                    self._set_band(order, ltp)
                elif order_type in ("LIMIT", "SL"):
                    order.band_price = 0
                self._try_fill(account, order, ltp, ts)
            return order

    def cancel_order(self, account: Account, variety: str, order_id: str) -> Order:
        with self._lock:
            order = self._owned_order(account, order_id)
            if order.variety != variety:
                raise errors.input_error("Invalid `variety` for this order.")
            if order.is_terminal:
                raise errors.input_error(f"Order cannot be cancelled as it is {order.status}.")
            ts = self.exchange_time()
            self._release_margin(account, order)
            order.transition(CANCEL_PENDING, ts)
            order.cancelled_quantity = order.quantity - order.filled_quantity
            order.exchange_update_timestamp = ts
            order.transition(CANCELLED, ts, "Cancelled by the user.")
            self._unlist(order)
            self._publish(account, order)
            return order

    def get_order(self, account: Account, order_id: str) -> Order:
        return self._owned_order(account, order_id)

    def find_orders(self, api_key: str, tag: str | None = None) -> list[Order]:
        """Test helper: an account's orders, optionally only those carrying `tag`."""
        account = self.accounts[api_key]
        with self._lock:
            return [o for o in account.orders.values() if tag is None or o.tag == tag]

    def order_trades(self, account: Account, order_id: str) -> list[Trade]:
        self._owned_order(account, order_id)
        return list(self._trades_by_order.get(order_id, ()))

    # --- order updates ---------------------------------------------------------------------------

    def _publish(self, account: Account, order: Order) -> None:
        sink = self.order_update_sink
        if sink is None:
            return
        data = order.to_dict()
        data["user_id"] = account.user_id
        data["account_id"] = account.user_id
        data["unfilled_quantity"] = 0
        data["app_id"] = 0
        # Same checksum as Kite's postbacks: sha256(order_id + order_timestamp + api_secret).
        data["checksum"] = hashlib.sha256(
            (order.order_id + order.order_timestamp + account.api_secret).encode()
        ).hexdigest()
        sink(account.api_key, orjson.dumps({"type": "order", "id": "", "data": data}))

    # --- the engine's step -----------------------------------------------------------------------

    def step(self, now: datetime | None = None) -> set[int]:
        """Advance prices to `now`, match open orders against what moved, release AMO orders when the
        market is open. Returns the tokens whose price changed."""
        now = now or self.clock.now()
        changed = self.book.advance(now)
        with self._lock:
            if self._after_mis_cutoff(now) and self._squared_off_on != self.calendar.trading_day_of(now):
                self._square_off_mis(now)
            if self._amo_waiting and self.calendar.is_open(now):
                ts = self.exchange_time(now)
                for order in list(self._amo_waiting.values()):
                    del self._amo_waiting[order.order_id]
                    self._go_to_exchange(self.accounts[order.api_key], order, ts)
            if self._open_by_token and changed:
                ts = self.exchange_time(now)
                for token in changed & self._open_by_token.keys():
                    ltp = self.book.last_price(token)
                    for order in list(self._open_by_token.get(token, {}).values()):
                        self._try_fill(self.accounts[order.api_key], order, ltp, ts)
        return changed

    def _square_off_mis(self, now: datetime) -> None:
        """Zerodha's intraday square-off: open MIS orders cancelled, open MIS positions closed by market orders
        of the broker's own, which carry none of the trader's tags."""
        self._squared_off_on = self.calendar.trading_day_of(now)
        ts = self.exchange_time(now)
        for account in self.accounts.values():
            for order in list(account.orders.values()):
                if order.product == "MIS" and not order.is_terminal:
                    self._release_margin(account, order)
                    order.cancelled_quantity = order.quantity - order.filled_quantity
                    order.transition(CANCELLED, ts, "Cancelled by the intraday square-off.")
                    self._unlist(order)
                    self._publish(account, order)
            for position in list(account.positions.values()):
                if position.product != "MIS" or position.quantity == 0:
                    continue
                instrument = position.instrument
                order = Order(
                    order_id=self._next_order_id(),
                    api_key=account.api_key,
                    placed_by="ADMINSQF",  # the broker's RMS, not the trader
                    variety="regular",
                    exchange=instrument.exchange,
                    tradingsymbol=instrument.tradingsymbol,
                    instrument=instrument,
                    transaction_type="SELL" if position.quantity > 0 else "BUY",
                    order_type="MARKET",
                    product="MIS",
                    validity="DAY",
                    quantity=abs(position.quantity),
                    price=0,
                    trigger_price=0,
                    disclosed_quantity=0,
                    tag=None,
                    order_timestamp=ts,
                    guid=f"sim{self._order_seq}",
                )
                order.transition(PUT_ORDER_REQ_RECEIVED, ts)
                order.transition(VALIDATION_PENDING, ts)
                self._orders[order.order_id] = order
                account.orders[order.order_id] = order
                self._go_to_exchange(account, order, ts)
                self.auto_square_offs.append(order.order_id)

    # --- views -----------------------------------------------------------------------------------

    def orders_json(self, account: Account) -> list[dict[str, Any]]:
        with self._lock:
            return [o.to_dict() for o in account.orders.values()]

    def trades_json(self, account: Account) -> list[dict[str, Any]]:
        with self._lock:
            return [t.to_dict() for t in account.trades]

    def positions_json(self, account: Account) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            rows = []
            for position in account.positions.values():
                quote = self.book.quotes[position.instrument.instrument_token]
                rows.append(position.to_dict(quote.last, quote.close))
            # Positions are all intraday here, so "day" and "net" agree.
            return {"net": rows, "day": [dict(r) for r in rows]}

    def holdings_json(self, account: Account) -> list[dict[str, Any]]:
        out = []
        for h in account.holdings:
            quote = self.book.quotes[h.instrument.instrument_token]
            out.append(
                {
                    "tradingsymbol": h.instrument.tradingsymbol,
                    "exchange": h.instrument.exchange,
                    "instrument_token": h.instrument.instrument_token,
                    "isin": "",
                    "product": "CNC",
                    "price": 0,
                    "quantity": h.quantity,
                    "used_quantity": 0,
                    "t1_quantity": 0,
                    "realised_quantity": h.quantity,
                    "authorised_quantity": 0,
                    "authorised_date": None,
                    "authorisation": {},
                    "opening_quantity": h.quantity,
                    "short_quantity": 0,
                    "collateral_quantity": 0,
                    "collateral_type": "",
                    "discrepancy": False,
                    "average_price": rupees(h.average_price),
                    "last_price": rupees(quote.last),
                    "close_price": rupees(quote.close),
                    "pnl": rupees((quote.last - h.average_price) * h.quantity),
                    "day_change": rupees(quote.last - quote.close),
                    "day_change_percentage": (quote.last - quote.close) * 100 / quote.close if quote.close else 0,
                    "mtf": {"quantity": 0, "used_quantity": 0, "average_price": 0, "value": 0, "initial_margin": 0},
                }
            )
        return out

    def margins_json(self, account: Account, segment: str | None = None) -> dict[str, Any]:
        with self._lock:
            equity = {
                "enabled": True,
                "net": rupees(account.available),
                "available": {
                    "adhoc_margin": 0,
                    "cash": rupees(account.cash),
                    "opening_balance": rupees(account.opening_balance),
                    "live_balance": rupees(account.available),
                    "collateral": 0,
                    "intraday_payin": 0,
                },
                "utilised": {
                    "debits": rupees(account.blocked + account.used),
                    "exposure": 0,
                    "m2m_realised": rupees(account.cash - account.opening_balance),
                    "m2m_unrealised": 0,
                    "option_premium": 0,
                    "payout": 0,
                    "span": rupees(account.blocked + account.used),
                    "holding_sales": 0,
                    "turnover": 0,
                    "liquid_collateral": 0,
                    "stock_collateral": 0,
                    "delivery": 0,
                },
            }
        # No commodity trading here: the segment is disabled, with every field Kite's fixtures show.
        commodity = {
            "enabled": False,
            "net": 0,
            "available": dict.fromkeys(_AVAILABLE_FIELDS, 0),
            "utilised": dict.fromkeys(_UTILISED_FIELDS, 0),
        }
        if segment == "equity":
            return equity
        if segment == "commodity":
            return commodity
        return {"equity": equity, "commodity": commodity}

    def profile_json(self, account: Account) -> dict[str, Any]:
        return {
            "user_id": account.user_id,
            "user_type": "individual",
            "email": account.email,
            "user_name": account.user_name,
            "user_shortname": account.user_name.split()[0],
            "broker": BROKER,
            "exchanges": sorted(self.master.exchanges()),
            "products": sorted(PRODUCTS),
            "order_types": sorted(ORDER_TYPES),
            "avatar_url": None,
            "meta": {"demat_consent": "consent"},
        }

    # --- reset -----------------------------------------------------------------------------------

    def reset(self, keep_accounts: bool = False) -> None:
        """Back to a fresh simulator (same instruments and clock): for session-scoped test fixtures."""
        with self._lock:
            if not keep_accounts:
                self.accounts.clear()
                self._access_tokens.clear()
                self._request_tokens.clear()
            for account in self.accounts.values():
                account.orders.clear()
                account.trades.clear()
                account.positions.clear()
                account.blocked = account.used = 0
                account.cash = account.opening_balance
            self._orders.clear()
            self._trades_by_order.clear()
            self._open_by_token.clear()
            self._amo_waiting.clear()
            self._squared_off_on = None
            self.auto_square_offs.clear()
            self.clear_faults()
            self.audit.clear()
            self.feed_paused = False
            self.config = replace(self._initial_config)
            self.book.reset(self.clock.now())


__all__ = [
    "Account",
    "AccountCredentials",
    "FaultKind",
    "FaultScope",
    "SimConfig",
    "SimulatorState",
    "next_token_expiry",
]

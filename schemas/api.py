"""Request and response bodies of the mobile app's REST API (the app's contract; see /docs).

Validation messages name the rule, because the app shows them to the trader as they are.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from core.reentry import REENTRY_MAX_LIMIT, ReentryMode
from schemas.events import Product, Repeat

MAX_QUANTITY = 100_000
MAX_STOP_LOSS = Decimal("1000000")
TICK = Decimal("0.05")
# Strategy ids are BIGINT in PostgreSQL: anything larger can never exist and must be a 4xx, not an overflow.
MAX_ID = 2**63 - 1

PASSWORD_RULE = (
    "password must be 10 to 128 characters and hard to guess: "  # noqa: S105 - the rule, not a password
    "not a common or breached password, nor built from your email"
)
TIME_RULE = "time must be HH:MM or HH:MM:SS (24-hour, exchange time)"

_TIME_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")


def parse_clock_time(value: object) -> time:
    if isinstance(value, time):
        return value
    if not isinstance(value, str):
        raise ValueError(TIME_RULE)
    match = _TIME_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ValueError(TIME_RULE)
    hours, minutes, seconds = match.groups()
    return time(int(hours), int(minutes), int(seconds or 0))


# Documented as the string the app sends (not JSON Schema's "time" format, which allows offsets and fractions).
ClockTime = Annotated[
    time,
    BeforeValidator(parse_clock_time),
    WithJsonSchema({"type": "string", "pattern": _TIME_PATTERN.pattern, "examples": ["09:30", "15:15:00"]}),
]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# ---------------------------------------------------------------------------------------------- errors


class FieldProblem(BaseModel):
    field: str | None = Field(description="Dotted path of the offending field; null when not about a field")
    message: str

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"field": "stop_loss", "message": "stop_loss must be on a 0.05 tick"}]}
    )


class ValidationErrorResponse(BaseModel):
    detail: list[FieldProblem]
    request_id: str | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": [{"field": "quantity", "message": "Input should be greater than 0"}],
                    "request_id": "5f0c2b1e9a0d4c7e",
                }
            ]
        }
    )


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "strategy not found", "request_id": "5f0c2b1e9a0d4c7e"}]}
    )


# ------------------------------------------------------------------------------------------------ auth


PASSWORD_MIN_LENGTH = 10
PASSWORD_MAX_LENGTH = 128

# Passwords are taken exactly as typed: spaces are characters like any other (stripping them silently made a
# password that differs from the one the trader chose).
LoginPassword = Annotated[
    str, StringConstraints(strip_whitespace=False), Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)
]
NewPassword = Annotated[
    str,
    StringConstraints(strip_whitespace=False),
    Field(
        min_length=PASSWORD_MIN_LENGTH,
        max_length=PASSWORD_MAX_LENGTH,
        description=PASSWORD_RULE,
        examples=["correct-horse-42"],
    ),
]


class Credentials(ApiModel):
    email: EmailStr = Field(max_length=320)
    password: LoginPassword

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "trader@example.com", "password": "correct-horse-42"}]}
    )

    @field_validator("email")
    @classmethod
    def _lower_email(cls, value: str) -> str:
        # Emails are unique case-insensitively: one canonical form in the database.
        return value.lower()


class RegisterRequest(Credentials):
    """The password's strength is judged by the API (zxcvbn, with the email as a known word) as well."""

    password: NewPassword


class LoginRequest(Credentials):
    pass


RefreshTokenValue = Annotated[str, Field(min_length=1, max_length=256, description="From the last token answer")]


class RefreshRequest(ApiModel):
    refresh_token: RefreshTokenValue

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"refresh_token": "q3Xh0m6Yc1mB2yq8VdVv1i3zM2aW2bHk4Tq9rYzP0aE"}]}
    )


class LogoutRequest(ApiModel):
    everywhere: bool = Field(False, description="Also end every other login of this account")

    model_config = ConfigDict(json_schema_extra={"examples": [{"everywhere": False}]})


class PasswordChangeRequest(ApiModel):
    current_password: LoginPassword
    new_password: NewPassword

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"current_password": "correct-horse-42", "new_password": "battery-staple-meadow-7"}]
        }
    )


class AccountDeleteRequest(ApiModel):
    password: LoginPassword = Field(description="The account's password, asked again before closing it")

    model_config = ConfigDict(json_schema_extra={"examples": [{"password": "correct-horse-42"}]})


class AccountDeletedResponse(BaseModel):
    strategies_stopped: int
    positions_squared_off: int
    message: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "strategies_stopped": 2,
                    "positions_squared_off": 1,
                    "message": "account closed: 2 strategies stopped, EXIT sent for 1 open positions; the broker "
                    "connection is kept until they are placed, and everything is erased within a day",
                }
            ]
        }
    )


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_at: datetime
    user_id: int
    refresh_token: str = Field(
        description="Single use: POST /auth/refresh returns the next one with a new access token"
    )
    refresh_expires_at: datetime

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "access_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiJ9.sig",
                    "token_type": "bearer",
                    "expires_at": "2025-01-15T04:45:00Z",
                    "user_id": 42,
                    "refresh_token": "q3Xh0m6Yc1mB2yq8VdVv1i3zM2aW2bHk4Tq9rYzP0aE",
                    "refresh_expires_at": "2025-02-14T04:30:00Z",
                }
            ]
        }
    )


# ---------------------------------------------------------------------------------------------- broker

_KEY_CHARS = r"^[A-Za-z0-9_\-]+$"
BrokerKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128, pattern=_KEY_CHARS)]


class BrokerConnectRequest(ApiModel):
    """Kite Connect credentials. Give `access_token`, or `request_token` (from the Kite login redirect)."""

    api_key: BrokerKey
    api_secret: BrokerKey
    access_token: BrokerKey | None = None
    request_token: BrokerKey | None = None
    algo_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The exchange-issued algo id of the trader's registered strategy, sent on every order; "
        "without one the broker applies its generic id.",
    )
    egress: str | None = Field(
        None,
        max_length=2048,
        description="Proxy your orders leave through, from the static IP registered with Kite: "
        "http://host:port (HTTP CONNECT) or socks5://host:port, optionally with user:password@. Stored "
        "encrypted, never returned. Omitted: the stored egress stays; empty string: removed. See docs/egress.md",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"api_key": "kitefront123", "api_secret": "s3cr3tvalue", "request_token": "Rq7tokenFromRedirect"},
                {"api_key": "kitefront123", "api_secret": "s3cr3tvalue", "access_token": "AcC3ssTokenValue"},
            ]
        }
    )

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if (self.access_token is None) == (self.request_token is None):
            raise ValueError("give exactly one of access_token or request_token")
        return self


class BrokerStatusResponse(BaseModel):
    connected: bool
    broker: Literal["zerodha"] = "zerodha"
    broker_user_id: str | None = None
    broker_user_name: str | None = None
    token_issued_at: datetime | None = None
    token_expires_at: datetime | None = None
    token_expired: bool | None = Field(None, description="Kite tokens expire at 06:00 IST the next day")
    egress: str | None = Field(None, description="The egress orders leave through (no credentials); null: direct")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "connected": True,
                    "broker": "zerodha",
                    "broker_user_id": "AB1234",
                    "broker_user_name": "Asha Trader",
                    "token_issued_at": "2025-01-15T03:50:00Z",
                    "token_expires_at": "2025-01-16T00:30:00Z",
                    "token_expired": False,
                }
            ]
        }
    )


# -------------------------------------------------------------------------------------------- strategy


class Exchange(StrEnum):
    NSE = "NSE"
    BSE = "BSE"


_SYMBOL_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9&_.\-]{0,39}$")
STOP_FIELDS = ("stop_loss", "stop_loss_points", "stop_loss_percent")
TARGET_FIELDS = ("target", "target_points", "target_percent")
TRAIL_FIELDS = ("trail_points", "trail_percent")
TRAIL_ACTIVATION_FIELDS = ("trail_activation_points", "trail_activation_percent")
MOVE_TO_COST_FIELDS = ("move_to_cost_points", "move_to_cost_percent")
SYMBOL_RULE = 'symbol must be "EXCHANGE:TRADINGSYMBOL" with exchange NSE or BSE, e.g. "NSE:INFY"'


class StrategyCreateRequest(ApiModel):
    """Give `symbol` ("NSE:INFY"), or `exchange` and `tradingsymbol`."""

    symbol: str | None = Field(None, max_length=48, description='"EXCHANGE:TRADINGSYMBOL", e.g. "NSE:INFY"')
    exchange: Exchange | None = None
    tradingsymbol: str | None = Field(None, max_length=40)
    quantity: int = Field(gt=0, le=MAX_QUANTITY, description="Shares per order")
    buy_time: ClockTime = Field(description='Exchange time "HH:MM" or "HH:MM:SS", within market hours')
    sell_time: ClockTime = Field(description="Exchange time, after buy_time, within market hours")
    stop_loss: Decimal | None = Field(
        None,
        gt=0,
        le=MAX_STOP_LOSS,
        max_digits=9,
        decimal_places=2,
        description="The stop as a price (INR) on a 0.05 tick, below the last price. Give exactly one of "
        "stop_loss, stop_loss_points, stop_loss_percent",
    )
    stop_loss_points: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="The stop this many rupees below the entry (the BUY's average price), on a 0.05 tick",
    )  # fmt: skip
    stop_loss_percent: Decimal | None = Field(
        None, gt=0, lt=100, max_digits=5, decimal_places=2, description="The stop this percent below the entry"
    )
    target: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="Take profit at this price (INR, 0.05 tick), above the last price. At most one of target, "
        "target_points, target_percent",
    )  # fmt: skip
    target_points: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="Take profit this many rupees above the entry, on a 0.05 tick",
    )  # fmt: skip
    target_percent: Decimal | None = Field(
        None, gt=0, le=1000, max_digits=6, decimal_places=2, description="Take profit this percent above the entry"
    )
    trail_points: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="Trailing stop: this many rupees under the highest price since activation (0.05 tick); it only "
        "ever rises, and the exit comes at the higher of it and the stop. At most one of trail_points, trail_percent",
    )  # fmt: skip
    trail_percent: Decimal | None = Field(
        None, gt=0, lt=100, max_digits=5, decimal_places=2, description="Trailing stop: this percent under the high"
    )
    trail_activation_points: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="The trailing stop starts once the price is this many rupees above the entry (default: at once)",
    )  # fmt: skip
    trail_activation_percent: Decimal | None = Field(
        None, gt=0, le=1000, max_digits=6, decimal_places=2,
        description="The trailing stop starts once the price is this percent above the entry",
    )  # fmt: skip
    move_to_cost_points: Decimal | None = Field(
        None, gt=0, le=MAX_STOP_LOSS, max_digits=9, decimal_places=2,
        description="Move to cost: the stop becomes the entry price once the price is this many rupees above it",
    )  # fmt: skip
    move_to_cost_percent: Decimal | None = Field(
        None, gt=0, le=1000, max_digits=6, decimal_places=2,
        description="Move to cost: the stop becomes the entry price once the price is this percent above it",
    )  # fmt: skip
    max_loss: Decimal | None = Field(
        None, gt=0, le=Decimal("100000000"), max_digits=11, decimal_places=2,
        description="Loss limit in rupees: once the position has lost this much at the last price, it is sold and "
        "the strategy is done for the day",
    )  # fmt: skip
    product: Product = Product.MIS
    protective_stop: bool = Field(
        False, description="Also keep an SL-M order at the broker at the stop's price while in a position"
    )
    reentry_max: int = Field(
        0, ge=0, le=REENTRY_MAX_LIMIT,
        description="After a stop-loss exit (stop, trailing or cost stop; not the loss limit), buy again up to this "
        "many times (0: never)",
    )  # fmt: skip
    reentry_until: ClockTime | None = Field(
        None, description="Exchange time, after buy_time and before sell_time: no re-entry BUY at or after it"
    )
    reentry_mode: ReentryMode = Field(
        ReentryMode.IMMEDIATE,
        description="immediate: buy again as soon as the stop exit fills; at_entry: once a tick is back at (or above) "
        "the previous entry price",
    )
    repeat: Repeat = Field(
        Repeat.ONCE, description='"daily": a new run on each NSE trading day until stopped (stop and target then in '
        "points or percent of each day's entry)",
    )  # fmt: skip

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "symbol": "NSE:INFY",
                    "quantity": 10,
                    "buy_time": "09:30",
                    "sell_time": "15:15",
                    "stop_loss": 1480.05,
                    "product": "MIS",
                },
                {
                    "exchange": "NSE",
                    "tradingsymbol": "TCS",
                    "quantity": 2,
                    "buy_time": "10:00:00",
                    "sell_time": "15:00:00",
                    "stop_loss": "3900.50",
                },
                {
                    "symbol": "NSE:RELIANCE",
                    "quantity": 5,
                    "buy_time": "09:20",
                    "sell_time": "15:10",
                    "stop_loss_percent": "1.5",
                    "target_points": "30",
                },
                {
                    "symbol": "NSE:SBIN",
                    "quantity": 20,
                    "buy_time": "09:30",
                    "sell_time": "15:10",
                    "stop_loss_points": "8",
                    "trail_points": "5",
                    "trail_activation_points": "4",
                    "move_to_cost_points": "3",
                },
            ]
        }
    )

    @field_validator("sell_time")
    @classmethod
    def _sell_after_buy(cls, value: time, info: ValidationInfo) -> time:
        buy_time = info.data.get("buy_time")
        if buy_time is not None and value <= buy_time:
            raise ValueError("sell_time must be after buy_time")
        return value

    @field_validator("reentry_until")
    @classmethod
    def _reentry_within_the_day(cls, value: time | None, info: ValidationInfo) -> time | None:
        buy_time, sell_time = info.data.get("buy_time"), info.data.get("sell_time")
        if value is not None and sell_time is not None and value >= sell_time:
            raise ValueError("reentry_until must be before sell_time")
        if value is not None and buy_time is not None and value <= buy_time:
            raise ValueError("reentry_until must be after buy_time")
        return value

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, value: str | None) -> str | None:
        if value is None:
            return None
        exchange, sep, tradingsymbol = value.upper().partition(":")
        if not sep or exchange not in Exchange.__members__ or not _SYMBOL_PATTERN.fullmatch(tradingsymbol):
            raise ValueError(SYMBOL_RULE)
        return f"{exchange}:{tradingsymbol}"

    @field_validator(
        "stop_loss",
        "stop_loss_points",
        "target",
        "target_points",
        "trail_points",
        "trail_activation_points",
        "move_to_cost_points",
    )
    @classmethod
    def _on_tick(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is not None and value % TICK != 0:
            raise ValueError(f"{info.field_name} must be a multiple of the 0.05 tick size, e.g. 101.05")
        return value

    @model_validator(mode="after")
    def _one_stop_at_most_one_target(self) -> Self:
        stops = [name for name in STOP_FIELDS if getattr(self, name) is not None]
        if not stops:
            raise ValueError("stop_loss: required: give one of stop_loss (a price), stop_loss_points or "
                             "stop_loss_percent")  # fmt: skip
        if len(stops) > 1:
            raise ValueError(f"{stops[1]}: give only one of {', '.join(STOP_FIELDS)}")
        for group in (TARGET_FIELDS, TRAIL_FIELDS, TRAIL_ACTIVATION_FIELDS, MOVE_TO_COST_FIELDS):
            given = [name for name in group if getattr(self, name) is not None]
            if len(given) > 1:
                raise ValueError(f"{given[1]}: give at most one of {', '.join(group)}")
        if self.trail_points is None and self.trail_percent is None:
            if (named := next((n for n in TRAIL_ACTIVATION_FIELDS if getattr(self, n) is not None), None)) is not None:
                raise ValueError(f"{named}: an activation needs a trailing stop (trail_points or trail_percent)")
        if self.stop_loss is not None and self.target is not None and self.target <= self.stop_loss:
            raise ValueError("target: must be above stop_loss")
        return self

    @field_validator("tradingsymbol")
    @classmethod
    def _tradingsymbol(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.upper()
        if not _SYMBOL_PATTERN.fullmatch(value):
            raise ValueError("tradingsymbol must be 1-40 of A-Z 0-9 & _ . -")
        return value

    @model_validator(mode="after")
    def _one_instrument_form(self) -> Self:
        if self.symbol is not None:
            if self.exchange is not None or self.tradingsymbol is not None:
                raise ValueError("symbol: give symbol, or exchange and tradingsymbol, not both")
            exchange, _, tradingsymbol = self.symbol.partition(":")
            self.exchange = Exchange(exchange)
            self.tradingsymbol = tradingsymbol
        elif self.exchange is None or self.tradingsymbol is None:
            raise ValueError("symbol: required (or both exchange and tradingsymbol)")
        return self

    @model_validator(mode="after")
    def _daily_exits_follow_the_entry(self) -> Self:
        # A price fixed today may be on the wrong side of a later day's market: a daily run's exits follow its entry.
        if self.repeat is Repeat.DAILY:
            for name, relative in (("stop_loss", "stop_loss_points or stop_loss_percent"),
                                   ("target", "target_points or target_percent")):  # fmt: skip
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: a daily strategy takes {relative} (relative to each day's entry), "
                                     "not a price")  # fmt: skip
        return self

    @property
    def instrument(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"


class StrategyIdRequest(ApiModel):
    strategy_id: int = Field(ge=1, le=MAX_ID)

    model_config = ConfigDict(json_schema_extra={"examples": [{"strategy_id": 101}]})


class StrategyStopRequest(StrategyIdRequest):
    square_off: bool = Field(True, description="Sell an open position at market before stopping")

    model_config = ConfigDict(json_schema_extra={"examples": [{"strategy_id": 101, "square_off": True}]})


class StopOptions(ApiModel):
    """Optional body of `POST /strategy/{id}/stop`."""

    square_off: bool = True

    model_config = ConfigDict(json_schema_extra={"examples": [{"square_off": False}]})


_STRATEGY_EXAMPLE: JsonDict = {
    "strategy_id": 101,
    "symbol": "NSE:INFY",
    "exchange": "NSE",
    "tradingsymbol": "INFY",
    "instrument_token": 5121,
    "quantity": 10,
    "buy_time": "09:30:00",
    "sell_time": "15:15:00",
    "stop_loss": "1480.05",
    "product": "MIS",
    "status": "created",
    "status_reason": None,
    "run": 0,
    "trading_day": None,
    "created_at": "2025-01-15T04:00:00Z",
    "updated_at": "2025-01-15T04:00:00Z",
}


class StrategyResponse(BaseModel):
    strategy_id: int
    symbol: str
    exchange: str
    tradingsymbol: str
    instrument_token: int
    quantity: int
    buy_time: ClockTime
    sell_time: ClockTime
    stop_loss: Decimal | None = None
    stop_loss_points: Decimal | None = None
    stop_loss_percent: Decimal | None = None
    target: Decimal | None = None
    target_points: Decimal | None = None
    target_percent: Decimal | None = None
    trail_points: Decimal | None = None
    trail_percent: Decimal | None = None
    trail_activation_points: Decimal | None = None
    trail_activation_percent: Decimal | None = None
    move_to_cost_points: Decimal | None = None
    move_to_cost_percent: Decimal | None = None
    max_loss: Decimal | None = None
    product: str
    protective_stop: bool = False
    reentry_max: int = 0
    reentry_until: ClockTime | None = None
    reentry_mode: ReentryMode = ReentryMode.IMMEDIATE
    status: str
    status_reason: str | None = None
    run: int
    trading_day: date | None = None
    repeat: Repeat = Repeat.ONCE
    next_run_day: date | None = Field(None, description="A daily strategy: the trading day its next run starts")
    created_at: datetime
    updated_at: datetime
    archived_at: datetime | None = Field(None, description="Set: archived (hidden from the list, never started)")

    model_config = ConfigDict(json_schema_extra={"examples": [_STRATEGY_EXAMPLE]})


class StrategyListResponse(BaseModel):
    strategies: list[StrategyResponse]

    model_config = ConfigDict(json_schema_extra={"examples": [{"strategies": [_STRATEGY_EXAMPLE]}]})


class StartResponse(BaseModel):
    strategy_id: int
    status: str
    run: int
    trading_day: date
    trading_day_is_today: bool = Field(description="False: the strategy waits for the next trading day")
    buy_at: datetime
    sell_at: datetime
    already_running: bool = Field(description="True: it was running; nothing changed")
    message: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "strategy_id": 101,
                    "status": "running",
                    "run": 1,
                    "trading_day": "2025-01-15",
                    "trading_day_is_today": True,
                    "buy_at": "2025-01-15T04:00:00Z",
                    "sell_at": "2025-01-15T09:45:00Z",
                    "already_running": False,
                    "message": "running for today 2025-01-15: BUY at 09:30:00, SELL at 15:15:00 exchange time",
                }
            ]
        }
    )


class StopResponse(BaseModel):
    strategy_id: int
    status: str
    squared_off: bool = Field(description="True: an EXIT order for the open position was sent")
    already_stopped: bool
    message: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "strategy_id": 101,
                    "status": "stopped",
                    "squared_off": True,
                    "already_stopped": False,
                    "message": "stopped; EXIT order sent for the open position",
                }
            ]
        }
    )


class StatusResponse(BaseModel):
    """Sequence 12: what the app polls. Built from Redis while running, from the database otherwise."""

    strategy_id: int
    symbol: str
    strategy_status: str
    state: str
    position: str
    last_action: str
    last_price: float | None = None
    market_data_delay_seconds: float | None = Field(
        None,
        description="Set while the system reads this instrument's ticks a second or more late: the stop-loss is "
        "checked that much after the price moved. Absent (null) when prices are read in time.",
    )
    quantity: int | None = None
    stop_loss: float | None = Field(
        None, description="The stop's price; given in points or percent, it is resolved from the entry once bought "
        "(null until then)",
    )  # fmt: skip
    target: float | None = Field(None, description="The target's price (resolved like stop_loss); null: none")
    entry_price: float | None = None
    entry_at: str | None = None
    exit_price: float | None = None
    exit_at: str | None = None
    unrealised_pnl: float | None = Field(None, description="(last_price - entry_price) * quantity while holding")
    run: int | None = None
    cycle: int | None = Field(None, description="The run's entry/exit cycle: 1, then one more per re-entry")
    reentries_left: int | None = Field(None, description="Re-entries still allowed after a stop-loss exit")
    trading_day: str | None = None
    repeat: str = Field("once", description='"once" or "daily"')
    next_run_day: str | None = Field(
        None, description="A daily strategy: the trading day its next run starts (null: none; the trader stopped it)"
    )
    last_order_status: str | None = None
    last_order_message: str | None = None
    source: Literal["runtime", "database"]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "strategy_id": 101,
                    "symbol": "NSE:INFY",
                    "strategy_status": "running",
                    "state": "bought",
                    "position": "bought",
                    "last_action": "BUY",
                    "last_price": 1502.35,
                    "quantity": 10,
                    "stop_loss": 1480.05,
                    "entry_price": 1498.1,
                    "entry_at": "2025-01-15T04:00:00.120000+00:00",
                    "exit_price": None,
                    "exit_at": None,
                    "unrealised_pnl": 42.5,
                    "run": 1,
                    "cycle": 1,
                    "reentries_left": 0,
                    "trading_day": "2025-01-15",
                    "last_order_status": None,
                    "last_order_message": None,
                    "source": "runtime",
                }
            ]
        }
    )


class OrderLogResponse(BaseModel):
    id: int
    intent_id: str
    run: int
    action: str
    kind: str
    attempt: int
    status: str
    broker_order_id: str | None = None
    price: Decimal | None = None
    quantity: int
    message: str | None = None
    created_at: datetime

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "intent_id": "101:2025-01-15:1:BUY",
                    "run": 1,
                    "action": "BUY",
                    "kind": "result",
                    "attempt": 0,
                    "status": "filled",
                    "broker_order_id": "250115000000042",
                    "price": "1498.10",
                    "quantity": 10,
                    "message": None,
                    "created_at": "2025-01-15T04:00:00.200000Z",
                }
            ]
        }
    )


class OrderListResponse(BaseModel):
    strategy_id: int
    orders: list[OrderLogResponse]

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"strategy_id": 101, "orders": []}]},
    )


class NotificationResponse(BaseModel):
    id: int
    strategy_id: int | None = None
    kind: str
    title: str
    message: str
    created_at: datetime

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 3,
                    "strategy_id": 101,
                    "kind": "stoploss_triggered",
                    "title": "STOP-LOSS Triggered",
                    "message": "NSE:INFY sold at 1479.90",
                    "created_at": "2025-01-15T06:12:03Z",
                }
            ]
        }
    )


class NotificationListResponse(BaseModel):
    notifications: list[NotificationResponse]

    model_config = ConfigDict(json_schema_extra={"examples": [{"notifications": []}]})


class ComponentHealthResponse(BaseModel):
    status: Literal["up", "down"]
    detail: str
    latency_ms: float | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "up", "detail": "redis://127.0.0.1:6379/0: PING ok", "latency_ms": 0.4},
                {"status": "down", "detail": "no Redis answers at redis://127.0.0.1:6379/0", "latency_ms": None},
            ]
        }
    )


class LivenessResponse(BaseModel):
    status: Literal["up"]

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "up"}]})


class HealthResponse(BaseModel):
    status: Literal["up", "down"]
    components: dict[str, ComponentHealthResponse]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "up",
                    "components": {
                        "kafka": {"status": "up", "detail": "metadata answered", "latency_ms": 3.1},
                        "redis": {"status": "up", "detail": "PONG", "latency_ms": 0.4},
                        "database": {"status": "up", "detail": "SELECT 1", "latency_ms": 1.2},
                        "broker": {"status": "up", "detail": "HTTP 200", "latency_ms": 12.0},
                    },
                }
            ]
        }
    )


class KillSwitchResponse(BaseModel):
    engaged: bool
    trading_day: date | None = Field(None, description="The exchange day it holds (it ends with that day)")
    strategies_stopped: int = 0
    positions_squared_off: int = 0
    message: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "engaged": True,
                    "trading_day": "2025-01-15",
                    "strategies_stopped": 3,
                    "positions_squared_off": 2,
                    "message": "kill switch engaged for 2025-01-15: 3 strategies stopped, EXIT sent for 2 open "
                    "positions; no strategy starts until you release it (DELETE /kill-switch) or the day ends",
                }
            ]
        }
    )


class DailyLossLimit(ApiModel):
    daily_max_loss: Decimal | None = Field(
        gt=0, le=Decimal("100000000"), max_digits=11, decimal_places=2,
        description="Rupees lost today across all strategies (realised + unrealised at the last price) at which every "
        "strategy is stopped and every position squared off for the day (the kill switch); null: no limit",
    )  # fmt: skip

    model_config = ConfigDict(json_schema_extra={"examples": [{"daily_max_loss": "5000"}, {"daily_max_loss": None}]})


# ------------------------------------------------------------------------------------------------- P&L

PNL_NOTE = (
    "Realised from the broker's average fill prices of closed positions, unrealised at the last price of open "
    "ones; brokerage, taxes and other fees are not included. Each run (a START that bought) is one lot bought "
    "once and sold once, so FIFO and average cost agree; it counts on the exchange day its BUY filled."
)

_PNL_ROW_EXAMPLE: JsonDict = {
    "strategy_id": 101,
    "symbol": "NSE:INFY",
    "day": "2025-01-15",
    "runs": 1,
    "bought_quantity": 10,
    "sold_quantity": 10,
    "open_quantity": 0,
    "average_buy_price": "1498.10",
    "average_sell_price": "1512.40",
    "last_price": None,
    "realised": "143.00",
    "unrealised": "0.00",
    "total": "143.00",
}


class PnlRow(BaseModel):
    """One strategy's P&L on one exchange day. Money in rupees as decimal strings."""

    strategy_id: int
    symbol: str
    day: date
    runs: int = Field(
        description="Runs opened that day (a run re-entering after a stop buys again: its every BUY and exit count)"
    )
    bought_quantity: int
    sold_quantity: int
    open_quantity: int = Field(description="Bought and not sold yet")
    average_buy_price: Decimal | None = None
    average_sell_price: Decimal | None = Field(None, description="Null: nothing sold yet")
    last_price: Decimal | None = Field(
        None, description="The price the open quantity is valued at; null: nothing open, or no price known yet "
        "(then its unrealised P&L counts as 0)",
    )  # fmt: skip
    realised: Decimal
    unrealised: Decimal
    total: Decimal

    model_config = ConfigDict(json_schema_extra={"examples": [_PNL_ROW_EXAMPLE]})


class DayPnlResponse(BaseModel):
    __doc__ = f"The trader's P&L of one exchange day, per strategy and in total. {PNL_NOTE}"

    day: date
    strategies: list[PnlRow]
    realised: Decimal
    unrealised: Decimal
    total: Decimal

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"day": "2025-01-15", "strategies": [_PNL_ROW_EXAMPLE], "realised": "143.00", "unrealised": "0.00",
                 "total": "143.00"}
            ]
        }
    )  # fmt: skip


class StrategyPnlResponse(BaseModel):
    __doc__ = f"One strategy's P&L per exchange day (days it traded), oldest first, and in total. {PNL_NOTE}"

    strategy_id: int
    symbol: str
    from_day: date
    to_day: date
    days: list[PnlRow]
    realised: Decimal
    unrealised: Decimal
    total: Decimal

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"strategy_id": 101, "symbol": "NSE:INFY", "from_day": "2025-01-01", "to_day": "2025-01-31",
                 "days": [_PNL_ROW_EXAMPLE], "realised": "143.00", "unrealised": "0.00", "total": "143.00"}
            ]
        }
    )  # fmt: skip

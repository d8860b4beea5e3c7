"""Every event on every topic. Analysts read these; the JSON Schemas are generated from these models.

Keys are documented per topic in `streams/topics.py`. All instants are timezone-aware (UTC on the wire,
ISO 8601); `trading_day` is the exchange-local date.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, time
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.exit_prices import EXIT_FIELDS, ExitRule
from core.reentry import REENTRY_MAX_LIMIT, ReentryMode, ReentryRule


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tick(Event):
    """One last-traded-price update for an instrument. Topic `ticks`, key = instrument."""

    instrument: str = Field(description="EXCHANGE:TRADINGSYMBOL, e.g. NSE:INFY")
    token: int = Field(description="Kite instrument_token")
    last_price: float
    volume: int = 0
    exchange_time: datetime | None = None
    received_at: datetime = Field(description="When the connector received it (project clock)")


class Repeat(StrEnum):
    ONCE = "once"  # one run, on the day it is started
    DAILY = "daily"  # a new run on each NSE trading day until the trader stops it


class Product(StrEnum):
    MIS = "MIS"
    CNC = "CNC"
    NRML = "NRML"


class StrategySpec(Event):
    """What the trader configured; travels with every lifecycle event so consumers need no lookup."""

    strategy_id: int
    user_id: int
    exchange: str
    tradingsymbol: str
    instrument_token: int
    quantity: int
    buy_time: time
    sell_time: time
    stop_loss: float | None = Field(description="The stop as a price; null when given relative to the entry")
    stop_loss_points: float | None = Field(None, description="The stop, this many rupees below the entry")
    stop_loss_percent: float | None = Field(None, description="The stop, this percent below the entry")
    target: float | None = Field(None, description="Take profit at this price (TARGET exit)")
    target_points: float | None = Field(None, description="Take profit this many rupees above the entry")
    target_percent: float | None = Field(None, description="Take profit this percent above the entry")
    trail_points: float | None = Field(None, description="Trailing stop: this many rupees under the high")
    trail_percent: float | None = Field(None, description="Trailing stop: this percent under the high")
    trail_activation_points: float | None = Field(
        None, description="The trailing stop starts once the price is this many rupees above the entry"
    )
    trail_activation_percent: float | None = Field(
        None, description="The trailing stop starts once the price is this percent above the entry"
    )
    move_to_cost_points: float | None = Field(
        None, description="The stop becomes the entry price once the price is this many rupees above the entry"
    )
    move_to_cost_percent: float | None = Field(
        None, description="The stop becomes the entry price once the price is this percent above the entry"
    )
    max_loss: float | None = Field(
        None, description="The strategy's loss limit in rupees: the position is sold once it has lost this much"
    )
    product: Product = Product.MIS
    protective_stop: bool = False
    reentry_max: int = Field(
        0, ge=0, le=REENTRY_MAX_LIMIT, description="Buy again after a stop-loss exit up to this many times (0: never)"
    )
    reentry_until: time | None = Field(None, description="No re-entry BUY at or after this exchange time")
    reentry_mode: ReentryMode = Field(
        ReentryMode.IMMEDIATE, description="immediate, or at_entry: once a tick is back at the previous entry"
    )

    @property
    def reentry(self) -> ReentryRule:
        return ReentryRule(self.reentry_max, self.reentry_until, self.reentry_mode)

    repeat: Repeat = Field(Repeat.ONCE, description="daily: a new run starts on each NSE trading day until stopped")

    @property
    def instrument(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"

    @property
    def exits(self) -> ExitRule:
        return ExitRule(*(getattr(self, name) for name in EXIT_FIELDS))


class LifecycleKind(StrEnum):
    STARTED = "started"  # schedule BUY/SELL jobs
    ARMED = "armed"  # BUY filled: the stop-loss agent watches the price
    EXITED = "exited"  # position closed (SELL, STOPLOSS, TARGET or square-off): disarm, cancel jobs
    # A cycle's position stopped out and the strategy buys again: disarm its exits, keep the jobs; in at_entry
    # mode, watch for a tick at or above `reentry_price`
    REENTRY = "reentry"
    STOPPED = "stopped"  # user stop or auto-stop: disarm, cancel jobs
    FAILED = "failed"  # order failed after retries: disarm, cancel jobs


class StrategyLifecycle(Event):
    """Topic `strategy-lifecycle`, key = instrument, so the stop-loss table is co-partitioned with ticks."""

    kind: LifecycleKind
    spec: StrategySpec
    run: int = Field(description="Start generation; a restart of the strategy is a new run")
    cycle: int = Field(1, ge=1, description="Entry/exit cycle within the run: ARMED, EXITED: the position's; "
                       "REENTRY: the cycle about to be bought")  # fmt: skip
    trading_day: date
    occurred_at: datetime
    entry_price: float | None = None
    opened_at: datetime | None = Field(
        None,
        description="ARMED: when the position's BUY was due (it is never sent earlier). The stop judges only "
        "ticks received from then on: an older price predates the position.",
    )
    stop_price: float | None = Field(
        None, description="ARMED: the stop as a price, resolved from the entry when given in points or percent"
    )
    target_price: float | None = Field(None, description="ARMED: the target as a price, when the strategy has one")
    trail_activation_price: float | None = Field(
        None, description="ARMED: where the trailing stop starts trailing (null: at once, from the entry)"
    )
    move_to_cost_price: float | None = Field(None, description="ARMED: where the stop moves up to the entry price")
    loss_limit_price: float | None = Field(None, description="ARMED: the price at which the loss limit is reached")
    reentry_price: float | None = Field(
        None, description="REENTRY in at_entry mode: the BUY goes out at the first tick at or above this price"
    )
    reason: str | None = None
    next_run_day: date | None = Field(
        None, description="A daily strategy: the trading day its next run starts (null: no further run)"
    )


class Action(StrEnum):
    BUY = "BUY"
    SELL = "SELL"  # time exit at sell_time
    STOPLOSS = "STOPLOSS"  # price exit at or under the stop
    TARGET = "TARGET"  # price exit at or above the target; the priority of a STOPLOSS
    EXIT = "EXIT"  # square-off on user stop or recovery
    PROTECT = "PROTECT"  # the optional SL-M at the broker; in the order log and results, never on `orders`
    # On `orders` only: the position's stop rose (`exit_level`), the protective SL-M's trigger follows it. Its
    # modification is logged on the PROTECT order; it has no order and no result of its own.
    RAISE_STOP = "RAISE_STOP"

    @property
    def side(self) -> Literal["BUY", "SELL"]:
        return "BUY" if self is Action.BUY else "SELL"

    @property
    def is_exit(self) -> bool:
        return self not in (Action.BUY, Action.RAISE_STOP)


class ExitKind(StrEnum):
    """Which of a position's price exits decided it (a STOPLOSS intent is one of the three stops)."""

    STOP = "stop"  # the stop as given (price, points or percent of the entry)
    COST_STOP = "cost_stop"  # the stop after it moved to the entry price
    TRAILING_STOP = "trailing_stop"  # the trailing stop, at the highest price since activation minus the trail
    TARGET = "target"
    LOSS_LIMIT = "loss_limit"  # the strategy's max_loss reached (a stop at entry - max_loss / quantity)


class TimeEvent(Event):
    """Topic `time-events`, key = strategy id. The scheduler's BUY/SELL triggers.

    A SELL is fired at `due_at`; a BUY `BUY_LEAD_SECONDS` before it (`fired_at` < `due_at`), and the execution
    engine holds the order until `due_at`."""

    strategy_id: int
    user_id: int
    run: int
    action: Literal[Action.BUY, Action.SELL]
    instrument: str
    quantity: int
    trading_day: date
    due_at: datetime
    fired_at: datetime


class Trigger(StrEnum):
    SCHEDULE = "schedule"
    PRICE = "price"
    USER = "user"
    RECOVERY = "recovery"


def intent_id_for(strategy_id: int, trading_day: date, run: int, action: Action, cycle: int = 1) -> str:
    """Deterministic: the same decision always gets the same id, however often it is redelivered.

    A run's first entry/exit cycle keeps the id the project has always used (rows and broker tags of orders
    placed before cycles existed read the same); a later cycle of the same run names itself."""
    if cycle < 1:
        raise ValueError(f"cycle must be at least 1, not {cycle}")
    day = trading_day.isoformat()
    return (
        f"{strategy_id}:{day}:{run}:{action.value}"
        if cycle == 1
        else f"{strategy_id}:{day}:{run}:c{cycle}:{action.value}"
    )


def cycle_of(intent_id: str) -> int:
    """The cycle an intent id names (the inverse of `intent_id_for`'s cycle part): 1 unless it says `c<n>`."""
    parts = intent_id.split(":")
    return int(parts[3][1:]) if len(parts) == 5 and parts[3][:1] == "c" and parts[3][1:].isdigit() else 1


def raise_stop_id_for(strategy_id: int, trading_day: date, run: int, level: float, cycle: int = 1) -> str:
    """A RAISE_STOP decision: one per level the position's stop rose to (in paise), so each step is its own."""
    return f"{intent_id_for(strategy_id, trading_day, run, Action.RAISE_STOP, cycle)}:{round(level * 100)}"


def broker_tag_for(intent_id: str, order_seq: int = 1) -> str:
    """The Kite tag of an intent's `order_seq`-th broker order (one more after each cancel-and-replace). Kite tags
    are at most 20 alphanumeric characters: a stable digest. The first order's is the digest of the intent id
    alone, as it always was."""
    key = intent_id if order_seq == 1 else f"{intent_id}#{order_seq}"
    return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


class OrderIntent(Event):
    """Topic `orders`, key = strategy id (one strategy = one partition = strict order)."""

    intent_id: str
    strategy_id: int
    user_id: int
    run: int
    action: Action
    trigger: Trigger
    trading_day: date
    instrument: str
    quantity: int
    cycle: int = Field(1, ge=1, description="Entry/exit cycle within the run (1 unless the strategy re-enters)")
    due_at: datetime = Field(description="When the decision was due (time) or made (price, user)")
    created_at: datetime
    trigger_price: float | None = Field(None, description="The tick price that crossed the stop or the target")
    exit_kind: ExitKind | None = Field(None, description="A price exit: which stop, or the target")
    exit_level: float | None = Field(
        None,
        description="A price exit: the stop or target price the tick reached (a trailing stop: where it had risen to); "
        "a RAISE_STOP: the stop the protective SL-M's trigger is to follow up to",
    )
    source_published_at: datetime | None = Field(None, description="Tick receive time, for latency")

    @property
    def broker_tag(self) -> str:
        return broker_tag_for(self.intent_id)


class OrderStatus(StrEnum):
    PLACED = "placed"
    FILLED = "filled"
    REJECTED = "rejected"  # the broker refused it (permanent)
    FAILED = "failed"  # retries exhausted or token expired
    SKIPPED = "skipped"  # did not fit the runtime state (e.g. SELL with no position)
    CANCELLED = "cancelled"  # taken off the book (a protective stop released before another exit)


class OrderTransition(Event):
    """One step of a broker order's state machine (streams/execution/order_lifecycle.py)."""

    before: str
    event: str
    after: str


class OrderResult(Event):
    """Topic `order-results`, key = strategy id. One per intent outcome, with the path its order took."""

    intent_id: str
    strategy_id: int
    user_id: int
    action: Action
    cycle: int = Field(1, ge=1, description="Entry/exit cycle within the run (1 unless the strategy re-enters)")
    status: OrderStatus
    broker_order_id: str | None = None
    broker_tag: str
    price: float | None = None
    quantity: int
    attempts: int
    message: str | None = None
    occurred_at: datetime
    transitions: list[OrderTransition] = Field(
        default_factory=list,
        description="The order's states in the delivery that settled it, e.g. sending -timed_out-> unknown "
        "-not_found-> intended -send-> sending -filled-> filled (each persisted in the order log when it happened)",
    )


class NotificationKind(StrEnum):
    ORDER_FILLED = "order_filled"
    STOPLOSS_TRIGGERED = "stoploss_triggered"
    TARGET_REACHED = "target_reached"
    LOSS_LIMIT_REACHED = "loss_limit_reached"
    DAILY_LOSS_LIMIT = "daily_loss_limit"
    ORDER_FAILED = "order_failed"
    STRATEGY_STOPPED = "strategy_stopped"
    BUY_SKIPPED = "buy_skipped"
    BROKER_SESSION_EXPIRED = "broker_session_expired"
    SQUARED_OFF_BY_BROKER = "squared_off_by_broker"  # the broker's intraday square-off closed the position
    MARKET_CLOSED = "market_closed"  # a time event due outside market hours: nothing was sent
    EXIT_CHASED = "exit_chased"  # an exit rests unfilled at the broker and is being re-priced until it fills
    EGRESS_DOWN = "egress_down"  # an exit could not reach the broker through the trader's egress: still retrying
    DAILY_RUN_SKIPPED = "daily_run_skipped"  # a daily strategy's day could not start; the next trading day is tried


class UserNotification(Event):
    """Topic `notifications`, key = user id. What the mobile app shows the trader."""

    notification_id: str
    user_id: int
    strategy_id: int | None = None
    kind: NotificationKind
    title: str
    message: str
    occurred_at: datetime


EVENT_MODELS: dict[str, type[Event]] = {
    "Tick": Tick,
    "StrategyLifecycle": StrategyLifecycle,
    "TimeEvent": TimeEvent,
    "OrderIntent": OrderIntent,
    "OrderResult": OrderResult,
    "UserNotification": UserNotification,
}

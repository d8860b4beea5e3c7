"""Orders, trades and positions as the simulator keeps them, and their Kite JSON shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from connectors.kite_sim.instruments import Instrument

VARIETIES = frozenset({"regular", "amo"})
UNSUPPORTED_VARIETIES = frozenset({"co", "iceberg", "auction"})
PRODUCTS = frozenset({"MIS", "CNC", "NRML"})
ORDER_TYPES = frozenset({"MARKET", "LIMIT", "SL", "SL-M"})
TRANSACTION_TYPES = frozenset({"BUY", "SELL"})
VALIDITIES = frozenset({"DAY", "IOC", "TTL"})
TERMINAL_STATUSES = frozenset({"COMPLETE", "CANCELLED", "REJECTED"})

# Status names exactly as Kite reports them.
PUT_ORDER_REQ_RECEIVED = "PUT ORDER REQ RECEIVED"
VALIDATION_PENDING = "VALIDATION PENDING"
OPEN_PENDING = "OPEN PENDING"
OPEN = "OPEN"
TRIGGER_PENDING = "TRIGGER PENDING"
AMO_REQ_RECEIVED = "AMO REQ RECEIVED"
MODIFY_VALIDATION_PENDING = "MODIFY VALIDATION PENDING"
MODIFY_PENDING = "MODIFY PENDING"
CANCEL_PENDING = "CANCEL PENDING"
COMPLETE = "COMPLETE"
CANCELLED = "CANCELLED"
REJECTED = "REJECTED"


def rupees(paise: int) -> float:
    return paise / 100


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else value


class HistoryEntry(NamedTuple):
    """The mutable part of an order at one status change (the rest never changes)."""

    status: str
    status_message: str | None
    timestamp: str
    exchange_order_id: str | None
    exchange_timestamp: str | None
    order_type: str
    quantity: int
    price: int
    trigger_price: int
    filled_quantity: int
    average_price: int
    cancelled_quantity: int


@dataclass(slots=True)
class Order:
    order_id: str
    api_key: str
    placed_by: str
    variety: str
    exchange: str
    tradingsymbol: str
    instrument: Instrument | None
    transaction_type: str
    order_type: str
    product: str
    validity: str
    quantity: int
    price: int  # paise
    trigger_price: int  # paise
    disclosed_quantity: int
    tag: str | None
    order_timestamp: str  # "YYYY-MM-DD HH:MM:SS" exchange time
    market_protection: float = 0.0  # -1 automatic, else a percentage; 0 none
    algo_id: str | None = None
    band_price: int = 0  # paise: the worst price a protected market order may trade at, once at the exchange
    modifications: int = 0
    validity_ttl: int = 0
    guid: str = ""
    status: str = PUT_ORDER_REQ_RECEIVED
    status_message: str | None = None
    exchange_order_id: str | None = None
    exchange_timestamp: str | None = None
    exchange_update_timestamp: str | None = None
    filled_quantity: int = 0
    average_price: int = 0
    cancelled_quantity: int = 0
    modified: bool = False
    blocked_margin: int = 0  # paise held for this order while it is open
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def instrument_token(self) -> int:
        return self.instrument.instrument_token if self.instrument else 0

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def pending_quantity(self) -> int:
        if self.is_terminal:
            return 0
        return self.quantity - self.filled_quantity

    def transition(self, status: str, timestamp: str, message: str | None = None) -> None:
        self.status = status
        if message is not None:
            self.status_message = message
        self.history.append(
            HistoryEntry(
                status,
                self.status_message,
                timestamp,
                self.exchange_order_id,
                self.exchange_timestamp,
                self.order_type,
                self.quantity,
                self.price,
                self.trigger_price,
                self.filled_quantity,
                self.average_price,
                self.cancelled_quantity,
            )
        )

    def to_dict(self, entry: HistoryEntry | None = None) -> dict[str, Any]:
        """Kite's order JSON: the current state, or the state recorded at `entry`."""
        e = entry or self.history[-1]
        terminal = e.status in TERMINAL_STATUSES
        return {
            "placed_by": self.placed_by,
            "order_id": self.order_id,
            "exchange_order_id": e.exchange_order_id,
            "parent_order_id": None,
            "status": e.status,
            "status_message": e.status_message,
            "status_message_raw": e.status_message,
            "order_timestamp": e.timestamp,
            "exchange_update_timestamp": e.exchange_timestamp,
            "exchange_timestamp": e.exchange_timestamp,
            "variety": self.variety,
            "modified": self.modified,
            "exchange": self.exchange,
            "tradingsymbol": self.tradingsymbol,
            "instrument_token": self.instrument_token,
            "order_type": e.order_type,
            "transaction_type": self.transaction_type,
            "validity": self.validity,
            "validity_ttl": self.validity_ttl,
            "product": self.product,
            "quantity": e.quantity,
            "disclosed_quantity": self.disclosed_quantity,
            "price": rupees(e.price),
            "trigger_price": rupees(e.trigger_price),
            "average_price": rupees(e.average_price),
            "filled_quantity": e.filled_quantity,
            "pending_quantity": 0 if terminal else e.quantity - e.filled_quantity,
            "cancelled_quantity": e.cancelled_quantity,
            "market_protection": _number(self.market_protection),
            "algo_id": self.algo_id,
            "meta": {},
            "tag": self.tag,
            "tags": [self.tag] if self.tag else [],
            "guid": self.guid,
        }

    def history_dicts(self) -> list[dict[str, Any]]:
        return [self.to_dict(e) for e in self.history]


@dataclass(slots=True)
class Trade:
    trade_id: str
    order: Order
    quantity: int
    price: int
    fill_timestamp: str

    def to_dict(self) -> dict[str, Any]:
        o = self.order
        return {
            "trade_id": self.trade_id,
            "order_id": o.order_id,
            "exchange": o.exchange,
            "tradingsymbol": o.tradingsymbol,
            "instrument_token": o.instrument_token,
            "product": o.product,
            "average_price": rupees(self.price),
            "quantity": self.quantity,
            "exchange_order_id": o.exchange_order_id,
            "transaction_type": o.transaction_type,
            "fill_timestamp": self.fill_timestamp,
            "order_timestamp": self.fill_timestamp,
            "exchange_timestamp": self.fill_timestamp,
        }


@dataclass(slots=True)
class Position:
    instrument: Instrument
    product: str
    buy_quantity: int = 0
    buy_value: int = 0  # paise
    sell_quantity: int = 0
    sell_value: int = 0
    margin: int = 0  # paise of the account's margin this position uses

    @property
    def quantity(self) -> int:
        return self.buy_quantity - self.sell_quantity

    @property
    def buy_price(self) -> int:
        return self.buy_value // self.buy_quantity if self.buy_quantity else 0

    @property
    def sell_price(self) -> int:
        return self.sell_value // self.sell_quantity if self.sell_quantity else 0

    def realised(self) -> int:
        closed = min(self.buy_quantity, self.sell_quantity)
        if closed == 0:
            return 0
        return (self.sell_value * closed) // self.sell_quantity - (self.buy_value * closed) // self.buy_quantity

    def to_dict(self, last_price: int, close_price: int) -> dict[str, Any]:
        net = self.quantity
        pnl = self.sell_value - self.buy_value + net * last_price
        realised = self.realised()
        if net > 0:
            average = self.buy_price
        elif net < 0:
            average = self.sell_price
        else:
            average = 0
        ins = self.instrument
        return {
            "tradingsymbol": ins.tradingsymbol,
            "exchange": ins.exchange,
            "instrument_token": ins.instrument_token,
            "product": self.product,
            "quantity": net,
            "overnight_quantity": 0,
            "multiplier": 1,
            "average_price": rupees(average),
            "close_price": rupees(close_price),
            "last_price": rupees(last_price),
            "value": rupees(self.sell_value - self.buy_value),
            "pnl": rupees(pnl),
            "m2m": rupees(pnl),
            "unrealised": rupees(pnl - realised),
            "realised": rupees(realised),
            "buy_quantity": self.buy_quantity,
            "buy_price": rupees(self.buy_price),
            "buy_value": rupees(self.buy_value),
            "buy_m2m": rupees(self.buy_value),
            "sell_quantity": self.sell_quantity,
            "sell_price": rupees(self.sell_price),
            "sell_value": rupees(self.sell_value),
            "sell_m2m": rupees(self.sell_value),
            "day_buy_quantity": self.buy_quantity,
            "day_buy_price": rupees(self.buy_price),
            "day_buy_value": rupees(self.buy_value),
            "day_sell_quantity": self.sell_quantity,
            "day_sell_price": rupees(self.sell_price),
            "day_sell_value": rupees(self.sell_value),
        }

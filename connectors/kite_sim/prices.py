"""Price paths for every instrument, on the project clock, held as integer paise on the 0.05 grid.

Three sources drive an instrument's last price; the first that has something to say wins:

1. **Scripted / set by tests** (`PriceBook.set_price`, `PriceBook.script_path`): "set INFY to 1450.00 now",
   or a list of `(at, price)` steps ("1450.00 at t+3s") applied when the project clock reaches each `at`.
   A scripted or set instrument is *pinned*: the random walk leaves it alone until `unpin()`/`reset()`.
2. **A recorded tick file** (`ReplaySource`), replayed at `speed` x the project clock. Two formats:

   * CSV with a header row: ``timestamp,instrument,last_price,volume``
   * JSONL, one object per line with the same keys.

   `timestamp` is ISO-8601 (naive means exchange time, Asia/Kolkata) or epoch seconds; `instrument` is
   "EXCHANGE:SYMBOL" (e.g. ``NSE:INFY``); `last_price` in rupees; `volume` the day's cumulative traded
   volume (optional; empty keeps the previous). Rows may be in any order; they replay sorted by time,
   the first row at the moment the replay starts. Replayed instruments are pinned as well.
3. **A seeded random walk** (default): on every step each unpinned instrument moves with probability
   `move_probability` by 1-`max_step_ticks` ticks up or down. Same seed, same sequence of steps,
   same prices.

Prices never float: everything is paise (int), snapped to the instrument's tick.
"""

from __future__ import annotations

import csv
import io
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from connectors.kite_sim import ticker_codec as codec
from connectors.kite_sim.instruments import Instrument, InstrumentMaster

EXCHANGE_TZ = ZoneInfo("Asia/Kolkata")
DEPTH_LEVELS = codec.DEPTH_LEVELS


def rupees_to_paise(price: float | str) -> int:
    """Exact conversion of a rupee amount (float or decimal string) to paise."""
    if isinstance(price, str):
        whole, _, fraction = price.strip().partition(".")
        sign = -1 if whole.startswith("-") else 1
        return sign * (abs(int(whole or "0")) * 100 + int((fraction + "00")[:2]))
    return round(price * 100)


def snap_to_tick(paise: int, tick: int) -> int:
    """Nearest price on the tick grid, never below one tick."""
    if tick <= 0:
        return max(paise, 1)
    return max(tick, (paise + tick // 2) // tick * tick)


class InstrumentQuote:
    """Live market state of one instrument. Prices in paise; times in epoch seconds."""

    __slots__ = (
        "instrument",
        "token",
        "tick",
        "last",
        "move",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "turnover",
        "last_quantity",
        "last_trade_time",
        "exchange_time",
        "version",
        "pinned",
        "_packets",
        "_packets_version",
    )

    def __init__(self, instrument: Instrument, epoch: int) -> None:
        self.instrument = instrument
        self.token = instrument.instrument_token
        self.tick = instrument.tick_paise
        base = instrument.base_price_paise
        self.last = base
        self.move = 0  # paise: how far the last trade moved the price
        self.open = base
        self.high = base
        self.low = base
        self.close = base  # previous day's close: the walk starts from it
        self.volume = 0
        self.turnover = 0
        self.last_quantity = 0
        self.last_trade_time = epoch
        self.exchange_time = epoch
        self.version = 0
        self.pinned = False
        self._packets: dict[str, bytes] = {}
        self._packets_version = -1

    def trade(self, price: int, quantity: int, epoch: int, volume: int | None = None) -> None:
        price = snap_to_tick(price, self.tick)
        self.move = price - self.last
        self.last = price
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        if volume is not None and volume >= self.volume:
            quantity = volume - self.volume
        if quantity > 0:
            self.volume += quantity
            self.turnover += price * quantity
            self.last_quantity = quantity
        self.last_trade_time = epoch
        self.exchange_time = epoch
        self.version += 1

    @property
    def average_price(self) -> int:
        return self.turnover // self.volume if self.volume else self.last

    def depth(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """Synthetic five-level book around the last price: (quantity, price, orders), deterministic."""
        tick = self.tick or 5
        seed = self.token + self.version
        buy = [
            (100 * (i + 1) + (seed * (i + 3)) % 97, self.last - (i + 1) * tick, 1 + (seed + i) % 9)
            for i in range(DEPTH_LEVELS)
        ]
        sell = [
            (100 * (i + 1) + (seed * (i + 7)) % 89, self.last + (i + 1) * tick, 1 + (seed + 2 * i) % 9)
            for i in range(DEPTH_LEVELS)
        ]
        return buy, sell

    def tick_fields(self) -> codec.TickFields:
        token = self.token
        if self.instrument.is_index:
            return codec.TickFields(
                instrument_token=token,
                last_price=self.last,
                open=self.open,
                high=self.high,
                low=self.low,
                close=self.close,
                exchange_timestamp=self.exchange_time,
            )
        buy, sell = self.depth()

        def wire(paise: int) -> int:
            return codec.wire_price(paise, token)

        return codec.TickFields(
            instrument_token=token,
            last_price=wire(self.last),
            last_traded_quantity=self.last_quantity,
            average_traded_price=wire(self.average_price),
            volume_traded=self.volume,
            total_buy_quantity=sum(q for q, _, _ in buy),
            total_sell_quantity=sum(q for q, _, _ in sell),
            open=wire(self.open),
            high=wire(self.high),
            low=wire(self.low),
            close=wire(self.close),
            last_trade_time=self.last_trade_time,
            exchange_timestamp=self.exchange_time,
            buy_depth=tuple(codec.DepthLevel(q, wire(p), o) for q, p, o in buy),
            sell_depth=tuple(codec.DepthLevel(q, wire(p), o) for q, p, o in sell),
        )

    def packet(self, mode: str) -> bytes:
        """Frame-ready packet for `mode`, encoded once per price version however many clients want it."""
        if self._packets_version != self.version:
            self._packets.clear()
            self._packets_version = self.version
        packet = self._packets.get(mode)
        if packet is None:
            if mode == codec.MODE_LTP:
                packet = codec.ltp_packet(self.token, codec.wire_price(self.last, self.token))
            elif mode == codec.MODE_QUOTE and not self.instrument.is_index:
                packet = self._quote_packet()
            elif mode == codec.MODE_FULL and not self.instrument.is_index and self.token & 0xFF in (1, 4):
                packet = self._full_packet()
            else:
                packet = codec.packet_for_mode(self.tick_fields(), mode)
            self._packets[mode] = packet
        return packet

    def _quote_packet(self) -> bytes:
        # The common case, encoded without building depth objects: quote packets carry only the totals.
        token = self.token
        divisor = codec.price_divisor(token)
        if divisor == 100:
            last, average, open_, high, low, close = (
                self.last,
                self.average_price,
                self.open,
                self.high,
                self.low,
                self.close,
            )
        else:
            wire = codec.wire_price
            last, average, open_, high, low, close = (
                wire(p, token) for p in (self.last, self.average_price, self.open, self.high, self.low, self.close)
            )
        buy_total, sell_total = self.depth_totals()
        return codec.quote_packet_from_values(
            token, last, self.last_quantity, average, self.volume, buy_total, sell_total, open_, high, low, close
        )

    def _full_packet(self) -> bytes:
        # NSE/BSE only (divisor 100: paise are wire units), values laid out flat in wire order.
        buy, sell = self.depth()
        values = [
            self.token,
            self.last,
            self.last_quantity,
            self.average_price,
            self.volume,
            sum(q for q, _, _ in buy),
            sum(q for q, _, _ in sell),
            self.open,
            self.high,
            self.low,
            self.close,
            self.last_trade_time,
            0,
            0,
            0,
            self.exchange_time,
        ]
        for level in buy:
            values.extend(level)
        for level in sell:
            values.extend(level)
        return codec.full_packet_from_values(values)

    def depth_totals(self) -> tuple[int, int]:
        """Total quantities of `depth()`'s buy and sell sides, unrolled: this runs for every quote tick."""
        seed = self.token + self.version
        buy = 1500 + (seed * 3) % 97 + (seed * 4) % 97 + (seed * 5) % 97 + (seed * 6) % 97 + (seed * 7) % 97
        sell = 1500 + (seed * 7) % 89 + (seed * 8) % 89 + (seed * 9) % 89 + (seed * 10) % 89 + (seed * 11) % 89
        return buy, sell

    # --- REST views ----------------------------------------------------------------------------

    def ohlc_dict(self) -> dict[str, float]:
        return {
            "open": self.open / 100,
            "high": self.high / 100,
            "low": self.low / 100,
            "close": self.close / 100,
        }

    def quote_dict(self, timestamp: str, last_trade_time: str) -> dict[str, Any]:
        buy, sell = self.depth() if not self.instrument.is_index else ([], [])
        return {
            "instrument_token": self.token,
            "timestamp": timestamp,
            "last_trade_time": last_trade_time,
            "last_price": self.last / 100,
            "last_quantity": self.last_quantity,
            "buy_quantity": sum(q for q, _, _ in buy),
            "sell_quantity": sum(q for q, _, _ in sell),
            "volume": self.volume,
            "average_price": self.average_price / 100,
            "oi": 0,
            "oi_day_high": 0,
            "oi_day_low": 0,
            "net_change": round((self.last - self.close) / 100, 2),
            "lower_circuit_limit": snap_to_tick(self.close * 8 // 10, self.tick) / 100,
            "upper_circuit_limit": snap_to_tick(self.close * 12 // 10, self.tick) / 100,
            "ohlc": self.ohlc_dict(),
            "depth": {
                "buy": [{"price": p / 100, "quantity": q, "orders": o} for q, p, o in buy],
                "sell": [{"price": p / 100, "quantity": q, "orders": o} for q, p, o in sell],
            },
        }


@dataclass(frozen=True, slots=True)
class RecordedTick:
    at: datetime
    instrument: str  # "EXCHANGE:SYMBOL"
    price_paise: int
    volume: int | None


def _parse_timestamp(value: Any) -> datetime:
    if isinstance(value, int | float) or (isinstance(value, str) and value.replace(".", "", 1).isdigit()):
        return datetime.fromtimestamp(float(value), UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=EXCHANGE_TZ)


def _recorded(row: dict[str, Any]) -> RecordedTick:
    volume = row.get("volume")
    return RecordedTick(
        at=_parse_timestamp(row["timestamp"]),
        instrument=str(row["instrument"]).strip(),
        price_paise=rupees_to_paise(str(row["last_price"])),
        volume=int(volume) if volume not in (None, "") else None,
    )


class ReplaySource:
    """Recorded ticks replayed relative to the moment `start()` is called, `speed` x the project clock."""

    def __init__(self, ticks: Iterable[RecordedTick], speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.ticks = sorted(ticks, key=lambda t: t.at)
        self.speed = speed
        self._next = 0
        self._started_at: datetime | None = None

    @classmethod
    def from_file(cls, path: str | Path, speed: float = 1.0) -> ReplaySource:
        text = Path(path).read_text("utf-8")
        return cls.from_text(text, jsonl=str(path).endswith((".jsonl", ".ndjson")), speed=speed)

    @classmethod
    def from_text(cls, text: str, jsonl: bool = False, speed: float = 1.0) -> ReplaySource:
        if jsonl:
            rows = [orjson.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        return cls((_recorded(r) for r in rows), speed=speed)

    @property
    def finished(self) -> bool:
        return self._next >= len(self.ticks)

    def start(self, now: datetime) -> None:
        self._started_at = now
        self._next = 0

    def due(self, now: datetime) -> list[RecordedTick]:
        if not self.ticks:
            return []
        started = self._started_at
        if started is None:
            self.start(now)
            started = now
        horizon = self.ticks[0].at + (now - started) * self.speed
        out: list[RecordedTick] = []
        while self._next < len(self.ticks) and self.ticks[self._next].at <= horizon:
            out.append(self.ticks[self._next])
            self._next += 1
        return out


class PriceBook:
    """All instruments' quotes and the sources that move them. Thread-safe: tests poke it directly."""

    def __init__(
        self,
        master: InstrumentMaster,
        now: datetime,
        seed: int = 20240101,
        walk: bool = True,
        move_probability: float = 0.5,
        max_step_ticks: int = 2,
    ) -> None:
        self.master = master
        self.seed = seed
        self.walk = walk
        self.move_probability = move_probability
        self.max_step_ticks = max_step_ticks
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # noqa: S311 - a reproducible price walk, not crypto
        epoch = int(now.timestamp())
        self.quotes: dict[int, InstrumentQuote] = {
            ins.instrument_token: InstrumentQuote(ins, epoch) for ins in master.instruments
        }
        self._scripts: dict[int, list[tuple[datetime, int]]] = {}
        self._replay: ReplaySource | None = None
        self._changed: set[int] = set()

    # --- lookups ---------------------------------------------------------------------------------

    def quote(self, instrument_token: int) -> InstrumentQuote | None:
        return self.quotes.get(instrument_token)

    def quote_by_key(self, key: str) -> InstrumentQuote | None:
        ins = self.master.by_key(key)
        return self.quotes.get(ins.instrument_token) if ins else None

    def last_price(self, instrument_token: int) -> int:
        return self.quotes[instrument_token].last

    def last_move(self, instrument_token: int) -> int:
        """How far (paise, signed) the instrument's last trade moved its price."""
        return self.quotes[instrument_token].move

    def _require(self, key_or_token: str | int) -> InstrumentQuote:
        quote = self.quotes.get(key_or_token) if isinstance(key_or_token, int) else self.quote_by_key(key_or_token)
        if quote is None:
            raise KeyError(f"unknown instrument {key_or_token!r}")
        return quote

    # --- tests and the control API ---------------------------------------------------------------

    def set_price(self, instrument: str | int, price_paise: int, now: datetime, quantity: int = 1) -> InstrumentQuote:
        """Trade `instrument` at `price_paise` now and pin it (the random walk stops moving it)."""
        with self._lock:
            quote = self._require(instrument)
            quote.pinned = True
            self._scripts.pop(quote.token, None)
            quote.trade(price_paise, quantity, int(now.timestamp()))
            self._changed.add(quote.token)
            return quote

    def script_path(self, instrument: str | int, steps: Iterable[tuple[datetime, int]]) -> None:
        """Replace the instrument's path by `(at, price_paise)` steps, applied as the clock reaches them."""
        with self._lock:
            quote = self._require(instrument)
            quote.pinned = True
            self._scripts[quote.token] = sorted(steps, key=lambda s: s[0])

    def unpin(self, instrument: str | int) -> None:
        with self._lock:
            quote = self._require(instrument)
            quote.pinned = False
            self._scripts.pop(quote.token, None)

    def replay(self, source: ReplaySource | None) -> None:
        with self._lock:
            self._replay = source
            if source is not None:
                for key in {t.instrument for t in source.ticks}:
                    quote = self.quote_by_key(key)
                    if quote is not None:
                        quote.pinned = True

    def reset(self, now: datetime) -> None:
        """Back to base prices, no scripts, no replay, the walk's RNG re-seeded."""
        with self._lock:
            epoch = int(now.timestamp())
            self.quotes = {ins.instrument_token: InstrumentQuote(ins, epoch) for ins in self.master.instruments}
            self._scripts.clear()
            self._replay = None
            self._rng = random.Random(self.seed)  # noqa: S311 - a reproducible price walk
            self._changed = set(self.quotes)

    # --- the engine's step -----------------------------------------------------------------------

    def advance(self, now: datetime) -> set[int]:
        """Apply due scripted steps, due recorded ticks and one walk step; return the tokens that moved
        (including those moved by `set_price` since the last call)."""
        with self._lock:
            epoch = int(now.timestamp())
            changed = self._changed
            self._changed = set()
            if self._scripts:
                for token, steps in list(self._scripts.items()):
                    quote = self.quotes[token]
                    while steps and steps[0][0] <= now:
                        _, price = steps.pop(0)
                        quote.trade(price, 1, epoch)
                        changed.add(token)
                    if not steps:
                        del self._scripts[token]
            if self._replay is not None:
                for tick in self._replay.due(now):
                    replayed = self.quote_by_key(tick.instrument)
                    if replayed is not None:
                        replayed.trade(tick.price_paise, 0, epoch, volume=tick.volume)
                        changed.add(replayed.token)
            if self.walk:
                self._walk_step(epoch, changed)
            return changed

    def _walk_step(self, epoch: int, changed: set[int]) -> None:
        # Three uniform draws per instrument (move?, how far and which way, traded quantity): cheap enough
        # to move a thousand instruments hundreds of times a second for the tick benchmark.
        draw = self._rng.random
        p = self.move_probability
        choices = 2 * self.max_step_ticks
        for token, quote in self.quotes.items():
            if quote.pinned or draw() >= p:
                continue
            k = int(draw() * choices)
            ticks = (k >> 1) + 1
            step = ticks if k & 1 else -ticks
            quote.trade(quote.last + step * (quote.tick or 5), 1 + int(draw() * 500), epoch)
            changed.add(token)


def script_steps_from_offsets(now: datetime, steps: Iterable[tuple[float, float]]) -> list[tuple[datetime, int]]:
    """[(seconds after now, rupees)] -> [(at, paise)]: "INFY to 1450.00 at t+3s" is `[(3, 1450.0)]`."""
    return [(now + timedelta(seconds=offset), rupees_to_paise(price)) for offset, price in steps]

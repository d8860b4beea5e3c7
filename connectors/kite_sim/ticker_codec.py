"""KiteTicker binary packets: pure encode/decode functions (the simulator's feed and load tests share them).

Wire format (what the official client's `_parse_binary` reads):

* a binary frame is `>H` packet count, then for each packet `>H` length followed by the packet;
  frames shorter than 2 bytes are heartbeats;
* every field is an unsigned big-endian int32 (`>I`), except the depth `orders` count (`>H` + 2 pad bytes);
* tradable packets: 8 bytes (ltp), 44 (quote), 184 (full, with 5 buy + 5 sell depth entries);
  index packets (segment 9): 8 (ltp), 28 (quote), 32 (full, with the exchange timestamp);
* prices are integers: rupees x 100, except CDS (segment 3, x 10,000,000) and BCD (segment 6, x 10,000).

The `*_packet` encoders take prices already in wire units (see `wire_price`) and return the packet
*preceded by its `>H` length*, so a frame is just `frame([...])` over cached packets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MODE_LTP = "ltp"
MODE_QUOTE = "quote"
MODE_FULL = "full"
MODES = (MODE_LTP, MODE_QUOTE, MODE_FULL)

HEARTBEAT = b"\x00"

SEGMENT_CDS = 3
SEGMENT_BCD = 6
SEGMENT_NCO = 12
SEGMENT_INDICES = 9

LTP_LENGTH = 8
QUOTE_LENGTH = 44
FULL_LENGTH = 184
INDEX_QUOTE_LENGTH = 28
INDEX_FULL_LENGTH = 32
DEPTH_LEVELS = 5

_U32 = 0xFFFFFFFF
_COUNT = struct.Struct(">H")
# Each struct includes the leading `>H` packet length so one pack() call yields a frame-ready packet.
_LTP = struct.Struct(">HII")
_QUOTE = struct.Struct(">H11I")
_FULL = struct.Struct(">H16I" + "IIHxx" * (2 * DEPTH_LEVELS))
_INDEX_QUOTE = struct.Struct(">H7I")
_INDEX_FULL = struct.Struct(">H8I")


def price_divisor(instrument_token: int) -> int:
    """The divisor the official parser applies to prices of this token's segment."""
    segment = instrument_token & 0xFF
    if segment == SEGMENT_CDS:
        return 10_000_000
    if segment in (SEGMENT_BCD, SEGMENT_NCO):
        return 10_000
    return 100


def wire_price(paise: int, instrument_token: int) -> int:
    """Convert a price held in paise (1/100 rupee) to the segment's wire integer."""
    return paise * price_divisor(instrument_token) // 100


def is_index_token(instrument_token: int) -> bool:
    return instrument_token & 0xFF == SEGMENT_INDICES


@dataclass(frozen=True, slots=True)
class DepthLevel:
    quantity: int
    price: int  # wire units
    orders: int


@dataclass(frozen=True, slots=True)
class TickFields:
    """Everything a full packet carries, prices in wire units, times in epoch seconds."""

    instrument_token: int
    last_price: int
    last_traded_quantity: int = 0
    average_traded_price: int = 0
    volume_traded: int = 0
    total_buy_quantity: int = 0
    total_sell_quantity: int = 0
    open: int = 0
    high: int = 0
    low: int = 0
    close: int = 0
    last_trade_time: int = 0
    oi: int = 0
    oi_day_high: int = 0
    oi_day_low: int = 0
    exchange_timestamp: int = 0
    buy_depth: tuple[DepthLevel, ...] = field(default=())
    sell_depth: tuple[DepthLevel, ...] = field(default=())


def ltp_packet(instrument_token: int, last_price: int) -> bytes:
    return _LTP.pack(LTP_LENGTH, instrument_token, last_price)


def quote_packet_from_values(
    instrument_token: int,
    last_price: int,
    last_traded_quantity: int,
    average_traded_price: int,
    volume_traded: int,
    total_buy_quantity: int,
    total_sell_quantity: int,
    open_price: int,
    high: int,
    low: int,
    close: int,
) -> bytes:
    """`quote_packet` without building a `TickFields` first (the feed's hot path)."""
    return _QUOTE.pack(
        QUOTE_LENGTH,
        instrument_token,
        last_price,
        last_traded_quantity,
        average_traded_price,
        volume_traded,
        total_buy_quantity,
        total_sell_quantity,
        open_price,
        high,
        low,
        close,
    )


def quote_packet(t: TickFields) -> bytes:
    return _QUOTE.pack(
        QUOTE_LENGTH,
        t.instrument_token,
        t.last_price,
        t.last_traded_quantity,
        t.average_traded_price,
        t.volume_traded,
        t.total_buy_quantity,
        t.total_sell_quantity,
        t.open,
        t.high,
        t.low,
        t.close,
    )


def _depth_values(levels: tuple[DepthLevel, ...]) -> list[int]:
    values: list[int] = []
    for i in range(DEPTH_LEVELS):
        if i < len(levels):
            level = levels[i]
            values += (level.quantity, level.price, level.orders)
        else:
            values += (0, 0, 0)
    return values


def full_packet_from_values(values: Sequence[int]) -> bytes:
    """`full_packet` from the 46 field values in wire order (16 fields, then 10 x quantity/price/orders)."""
    return _FULL.pack(FULL_LENGTH, *values)


def full_packet(t: TickFields) -> bytes:
    return _FULL.pack(
        FULL_LENGTH,
        t.instrument_token,
        t.last_price,
        t.last_traded_quantity,
        t.average_traded_price,
        t.volume_traded,
        t.total_buy_quantity,
        t.total_sell_quantity,
        t.open,
        t.high,
        t.low,
        t.close,
        t.last_trade_time,
        t.oi,
        t.oi_day_high,
        t.oi_day_low,
        t.exchange_timestamp,
        *_depth_values(t.buy_depth),
        *_depth_values(t.sell_depth),
    )


def index_quote_packet(t: TickFields) -> bytes:
    change = (t.last_price - t.close) & _U32  # the client ignores it and recomputes from close
    return _INDEX_QUOTE.pack(
        INDEX_QUOTE_LENGTH, t.instrument_token, t.last_price, t.high, t.low, t.open, t.close, change
    )


def index_full_packet(t: TickFields) -> bytes:
    change = (t.last_price - t.close) & _U32
    return _INDEX_FULL.pack(
        INDEX_FULL_LENGTH,
        t.instrument_token,
        t.last_price,
        t.high,
        t.low,
        t.open,
        t.close,
        change,
        t.exchange_timestamp,
    )


def packet_for_mode(t: TickFields, mode: str) -> bytes:
    """The packet Kite sends for this instrument in `mode` (index tokens get index packets)."""
    if mode == MODE_LTP:
        return ltp_packet(t.instrument_token, t.last_price)
    if is_index_token(t.instrument_token):
        return index_full_packet(t) if mode == MODE_FULL else index_quote_packet(t)
    return full_packet(t) if mode == MODE_FULL else quote_packet(t)


def frame(packets: Sequence[bytes]) -> bytes:
    """Join length-prefixed packets into one binary frame (at most 65,535 packets)."""
    return _COUNT.pack(len(packets)) + b"".join(packets)


def frames(packets: Sequence[bytes], max_packets: int) -> Iterable[bytes]:
    for start in range(0, len(packets), max_packets):
        yield frame(packets[start : start + max_packets])


# --- decoding (load tests and assertions; the simulator never decodes) ---------------------------


def packet_count(data: bytes) -> int:
    """Number of packets in a frame without decoding them (0 for a heartbeat)."""
    if len(data) < 2:
        return 0
    return int(_COUNT.unpack_from(data, 0)[0])


def split_frame(data: bytes) -> list[bytes]:
    """The packets of a frame, without their length prefixes."""
    if len(data) < 2:
        return []
    count = _COUNT.unpack_from(data, 0)[0]
    out: list[bytes] = []
    offset = 2
    for _ in range(count):
        (length,) = _COUNT.unpack_from(data, offset)
        offset += 2
        out.append(data[offset : offset + length])
        offset += length
    return out


def decode_packet(packet: bytes) -> dict[str, Any]:
    """Decode one packet to wire integers (no divisor applied), keyed like the official parser."""
    n = len(packet)
    if n == LTP_LENGTH:
        token, last = struct.unpack(">II", packet)
        return {"instrument_token": token, "mode": MODE_LTP, "last_price": last}
    if n in (INDEX_QUOTE_LENGTH, INDEX_FULL_LENGTH):
        values = struct.unpack(f">{n // 4}I", packet)
        out = {
            "instrument_token": values[0],
            "mode": MODE_QUOTE if n == INDEX_QUOTE_LENGTH else MODE_FULL,
            "last_price": values[1],
            "high": values[2],
            "low": values[3],
            "open": values[4],
            "close": values[5],
        }
        if n == INDEX_FULL_LENGTH:
            out["exchange_timestamp"] = values[7]
        return out
    if n in (QUOTE_LENGTH, FULL_LENGTH):
        values = struct.unpack(">11I", packet[:QUOTE_LENGTH])
        out = dict(
            zip(
                (
                    "instrument_token",
                    "last_price",
                    "last_traded_quantity",
                    "average_traded_price",
                    "volume_traded",
                    "total_buy_quantity",
                    "total_sell_quantity",
                    "open",
                    "high",
                    "low",
                    "close",
                ),
                values,
                strict=True,
            )
        )
        out["mode"] = MODE_QUOTE if n == QUOTE_LENGTH else MODE_FULL
        if n == FULL_LENGTH:
            rest = _FULL.unpack(_COUNT.pack(FULL_LENGTH) + packet)[12:]
            out.update(
                last_trade_time=rest[0],
                oi=rest[1],
                oi_day_high=rest[2],
                oi_day_low=rest[3],
                exchange_timestamp=rest[4],
            )
            depth = [
                {"quantity": rest[5 + 3 * i], "price": rest[6 + 3 * i], "orders": rest[7 + 3 * i]}
                for i in range(2 * DEPTH_LEVELS)
            ]
            out["depth"] = {"buy": depth[:DEPTH_LEVELS], "sell": depth[DEPTH_LEVELS:]}
        return out
    raise ValueError(f"unknown packet length {n}")

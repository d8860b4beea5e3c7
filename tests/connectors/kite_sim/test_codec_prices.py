"""The packet codec against the official parser (all segments), and the price sources."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kiteconnect import KiteTicker

from connectors.kite_sim import ticker_codec as codec
from connectors.kite_sim.instruments import default_master, make_token
from connectors.kite_sim.prices import PriceBook, ReplaySource, rupees_to_paise, snap_to_tick

NOW = datetime(2025, 1, 6, 4, 30, tzinfo=UTC)
PARSER = KiteTicker("k", "t")  # only its parser is used; nothing connects


def full_fields(token: int, price: int) -> codec.TickFields:
    return codec.TickFields(
        instrument_token=token,
        last_price=price,
        last_traded_quantity=7,
        average_traded_price=price - 3,
        volume_traded=123_456,
        total_buy_quantity=500,
        total_sell_quantity=600,
        open=price - 10,
        high=price + 20,
        low=price - 30,
        close=price - 5,
        last_trade_time=1_736_137_800,
        oi=11,
        oi_day_high=12,
        oi_day_low=10,
        exchange_timestamp=1_736_137_801,
        buy_depth=tuple(codec.DepthLevel(10 * i, price - i, i) for i in range(1, 6)),
        sell_depth=tuple(codec.DepthLevel(20 * i, price + i, i + 1) for i in range(1, 6)),
    )


@pytest.mark.parametrize(
    ("segment", "divisor"),
    [(1, 100), (4, 100), (2, 100), (3, 10_000_000), (6, 10_000)],
)
def test_all_modes_decode_exactly_with_segment_divisors(segment: int, divisor: int) -> None:
    token = make_token(1234, segment)
    assert codec.price_divisor(token) == divisor
    fields = full_fields(token, 8_312_345)
    frame = codec.frame([codec.packet_for_mode(fields, m) for m in codec.MODES])
    ltp, quote, full = PARSER._parse_binary(frame)
    assert (ltp["mode"], quote["mode"], full["mode"]) == ("ltp", "quote", "full")
    assert ltp["last_price"] == quote["last_price"] == full["last_price"] == 8_312_345 / divisor
    assert quote["ohlc"] == {
        "open": (8_312_345 - 10) / divisor,
        "high": (8_312_345 + 20) / divisor,
        "low": (8_312_345 - 30) / divisor,
        "close": (8_312_345 - 5) / divisor,
    }
    assert (quote["volume_traded"], quote["total_buy_quantity"], quote["total_sell_quantity"]) == (123_456, 500, 600)
    assert full["average_traded_price"] == (8_312_345 - 3) / divisor
    assert (full["oi"], full["oi_day_high"], full["oi_day_low"]) == (11, 12, 10)
    assert full["last_trade_time"] == datetime.fromtimestamp(1_736_137_800)
    assert full["exchange_timestamp"] == datetime.fromtimestamp(1_736_137_801)
    assert full["depth"]["buy"][0] == {"quantity": 10, "price": (8_312_345 - 1) / divisor, "orders": 1}
    assert full["depth"]["sell"][4] == {"quantity": 100, "price": (8_312_345 + 5) / divisor, "orders": 6}
    assert codec.packet_count(frame) == 3
    assert [codec.decode_packet(p)["last_price"] for p in codec.split_frame(frame)] == [8_312_345] * 3


def test_index_packets_decode() -> None:
    token = make_token(1001, 9)
    fields = codec.TickFields(token, 2_450_050, open=2_440_000, high=2_460_000, low=2_430_000, close=2_445_000,
                              exchange_timestamp=1_736_137_900)  # fmt: skip
    quote_packet = codec.packet_for_mode(fields, "quote")
    full_packet = codec.packet_for_mode(fields, "full")
    assert (len(quote_packet) - 2, len(full_packet) - 2) == (28, 32)
    quote, full = PARSER._parse_binary(codec.frame([quote_packet, full_packet]))
    assert quote["tradable"] is False and quote["mode"] == "quote" and full["mode"] == "full"
    assert quote["ohlc"] == {"high": 24_600.0, "low": 24_300.0, "open": 24_400.0, "close": 24_450.0}
    assert full["exchange_timestamp"] == datetime.fromtimestamp(1_736_137_900)
    assert codec.decode_packet(full_packet[2:])["exchange_timestamp"] == 1_736_137_900


def test_heartbeat_and_frame_splitting() -> None:
    assert PARSER._parse_binary(codec.HEARTBEAT) == []
    packets = [codec.ltp_packet(make_token(i, 1), i) for i in range(2500)]
    frames = list(codec.frames(packets, 1000))
    assert [codec.packet_count(f) for f in frames] == [1000, 1000, 500]


def test_money_is_exact_paise() -> None:
    assert rupees_to_paise("1450.05") == 145_005
    assert rupees_to_paise(0.1 + 0.2) == 30
    assert snap_to_tick(145_007, 5) == 145_005 and snap_to_tick(145_008, 5) == 145_010
    assert snap_to_tick(1, 5) == 5


def test_random_walk_is_deterministic_and_on_the_grid() -> None:
    master = default_master()

    def run(seed: int) -> list[int]:
        book = PriceBook(master, NOW, seed=seed)
        for i in range(20):
            book.advance(NOW + timedelta(seconds=i))
        return [q.last for q in book.quotes.values()]

    first = run(5)
    assert first == run(5) and first != run(6)
    assert all(p % 5 == 0 and p > 0 for p in first)


def test_scripted_path_and_pinning() -> None:
    book = PriceBook(default_master(), NOW, seed=1)
    book.script_path("NSE:INFY", [(NOW + timedelta(seconds=3), 145_000), (NOW + timedelta(seconds=5), 146_000)])
    infy = book.quote_by_key("NSE:INFY")
    assert infy is not None
    base = infy.last
    book.advance(NOW + timedelta(seconds=1))
    assert infy.last == base  # pinned: the walk leaves it alone
    assert infy.token in book.advance(NOW + timedelta(seconds=3))
    assert infy.last == 145_000
    book.advance(NOW + timedelta(seconds=9))
    assert infy.last == 146_000


@pytest.mark.parametrize("jsonl", [False, True])
def test_replay_at_speed(jsonl: bool) -> None:
    if jsonl:
        text = (
            '{"timestamp": "2025-01-06T09:15:00", "instrument": "NSE:INFY", "last_price": 1500.5, "volume": 100}\n'
            '{"timestamp": "2025-01-06T09:15:10", "instrument": "NSE:INFY", "last_price": 1501.0, "volume": 150}\n'
        )
    else:
        text = (
            "timestamp,instrument,last_price,volume\n"
            "2025-01-06T09:15:10,NSE:INFY,1501.00,150\n"
            "2025-01-06T09:15:00,NSE:INFY,1500.50,100\n"
        )
    book = PriceBook(default_master(), NOW, seed=1, walk=False)
    book.replay(ReplaySource.from_text(text, jsonl=jsonl, speed=10))
    infy = book.quote_by_key("NSE:INFY")
    assert infy is not None
    book.advance(NOW)
    assert (infy.last, infy.volume) == (150_050, 100)
    book.advance(NOW + timedelta(seconds=0.5))
    assert infy.last == 150_050
    book.advance(NOW + timedelta(seconds=1))  # 10 recorded seconds at 10x
    assert (infy.last, infy.volume, infy.last_quantity) == (150_100, 150, 50)

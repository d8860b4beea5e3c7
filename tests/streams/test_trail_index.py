"""TrailIndex: a trailing stop exits at the first price at or under (highest price since activation - trail)."""

from __future__ import annotations

import random

from streams.trail_index import TrailIndex, percent_level


def feed(index: TrailIndex, instrument: str, prices: list[float]) -> list[tuple[float, list[tuple[int, float]]]]:
    out = []
    for price in prices:
        if index.crossed(instrument, price):
            out.append((price, index.trigger(instrument, price)))
    return out


def test_points_trail_follows_the_high_and_only_rises() -> None:
    index = TrailIndex()
    index.arm(1, "NSE:INFY", high=1500.0, points=10)
    assert index.level(1) == 1490.0
    assert feed(index, "NSE:INFY", [1505.0, 1520.0, 1515.0, 1511.0]) == []
    assert index.level(1) == 1510.0  # the high was 1520, and a fall does not lower it
    assert feed(index, "NSE:INFY", [1510.05, 1510.0]) == [(1510.0, [(1, 1510.0)])]
    assert 1 not in index and index.instruments() == set()


def test_activation_waits_for_its_price_and_the_high_starts_there() -> None:
    index = TrailIndex()
    index.arm(1, "NSE:TCS", high=4000.0, points=20, activate_at=4030.0)
    assert feed(index, "NSE:TCS", [3950.0, 4029.95]) == []  # not active: no trailing stop yet
    assert index.level(1) is None
    assert feed(index, "NSE:TCS", [4030.0, 4012.0]) == []
    assert index.level(1) == 4010.0
    assert feed(index, "NSE:TCS", [4010.0]) == [(4010.0, [(1, 4010.0)])]


def test_percent_trail_is_rounded_up_to_the_tick() -> None:
    assert percent_level(149710, 150) == 147465  # 1,497.10 - 1.5% = 1,474.6435 -> 1,474.65
    index = TrailIndex()
    index.arm(1, "NSE:SBIN", high=800.0, percent=1.5)
    assert feed(index, "NSE:SBIN", [812.0, 799.9]) == []  # 812 - 1.5% = 799.82, on the tick 799.85
    assert feed(index, "NSE:SBIN", [799.85]) == [(799.85, [(1, 799.85)])]


def test_stops_with_different_highs_merge_at_a_new_high() -> None:
    index = TrailIndex()
    index.arm(1, "NSE:LT", high=3500.0, points=100)
    feed(index, "NSE:LT", [3600.0, 3520.0])
    index.arm(2, "NSE:LT", high=3520.0, points=10)  # activated after the fall: its own high is lower
    assert (index.level(1), index.level(2)) == (3500.0, 3510.0)
    assert feed(index, "NSE:LT", [3580.0]) == []
    assert (index.level(1), index.level(2)) == (3500.0, 3570.0)  # 2 rose with the new price, 1 kept its high
    assert feed(index, "NSE:LT", [3610.0]) == []
    assert (index.level(1), index.level(2)) == (3510.0, 3600.0)  # both share the high 3,610 now
    assert feed(index, "NSE:LT", [3600.0]) == [(3600.0, [(2, 3600.0)])]


def test_against_a_naive_model_on_random_paths() -> None:
    rng = random.Random(7)
    for _ in range(30):
        index = TrailIndex()
        naive: dict[int, dict[str, float | None]] = {}
        price = 1000.0
        for sid in range(40):
            points = rng.choice([None, 5.0, 10.0, 2.5])
            percent = None if points is not None else rng.choice([0.5, 1.0, 2.0])
            activate = rng.choice([None, price + rng.choice([1.0, 5.0, 15.0])])
            index.arm(sid, "NSE:X", high=price, points=points, percent=percent, activate_at=activate)
            naive[sid] = {"points": points, "percent": percent, "activate": activate,
                          "high": None if activate is not None else price}  # fmt: skip
            for _ in range(rng.randint(0, 5)):
                price = round(max(price + rng.choice([-3, -1, -0.5, 0.5, 1, 3]), 1.0), 2)
                expected = _naive_step(naive, price)
                got = sorted(sid for _, hits in feed(index, "NSE:X", [price]) for sid, _ in hits)
                assert got == expected, (price, got, expected)


def _naive_step(naive: dict[int, dict[str, float | None]], price: float) -> list[int]:
    hit = []
    for sid, stop in list(naive.items()):
        if stop["high"] is None and stop["activate"] is not None and price >= stop["activate"]:
            stop["high"] = price
        if stop["high"] is None:
            continue
        stop["high"] = max(stop["high"], price)
        high = round(stop["high"] * 100)
        if stop["points"] is not None:
            level = high - round(stop["points"] * 100)
        else:
            assert stop["percent"] is not None
            level = percent_level(high, round(stop["percent"] * 100))
        if round(price * 100) <= level:
            hit.append(sid)
            del naive[sid]
    return sorted(hit)

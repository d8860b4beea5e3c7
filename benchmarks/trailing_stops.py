"""Trailing stops' per-tick cost: `python -m benchmarks.trailing_stops [--ticks N] [--stops N]`.

One instrument, one process, the stop-loss join's own work per tick as the worker does it (`streams/worker.py`
`judge_ticks`: decode the tick's JSON, skip it if its last reader finished it, take it into the price highs,
`ExitIndex.crossed`, `trigger` when crossed, and the protective stops' steps), for:

* fixed stops: 1, and `--stops` (100,000) on the instrument;
* trailing stops: 1, and `--stops`, all active, half trailing by points (60-100 rupees) and half by percent (6-10%);
  the instrument's price highs kept (what re-arms them after a restart), and the first stop with a protective SL-M
  followed in steps of `STEP_TICKS` (the others' ticks cost the steps' lookup only: each raise is a broker
  modification, paced by the trader's rate limits, and costs O(log n) here when it comes);

each on a *rising* path (+0.05 a tick: a new high every tick, which moves every trailing stop) and a *falling* one
(a saw-tooth from 1,000.00 down to 950.00 and back, under the high: no stop is reached, the running high stays).
Prints ticks/s and microseconds per tick for each, and the verdicts on the targets: 100,000 trailing stops within
1.5 times the cost of one, and every case above 50,000 ticks/s. Kafka, Redis and the broker are not involved: the
pipeline benchmark (`python -m benchmarks.pipeline ticks`) measures the worker around this work.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import orjson

from streams.exit_index import ExitIndex, Trail
from streams.price_highs import PriceHighs
from streams.stop_steps import StopSteps

INSTRUMENT = "NSE:BENCH"
RATIO_TARGET = 1.5
TICKS_TARGET = 50_000
STEP_TICKS = 20


class Watch:
    """What the worker keeps per instrument besides the exit index: price highs, protective stops' steps."""

    def __init__(self) -> None:
        self.index = ExitIndex()
        self.highs = PriceHighs()
        self.steps = StopSteps(STEP_TICKS)


def rising(ticks: int) -> list[bytes]:
    return [_tick(1000.0 + i * 0.05) for i in range(ticks)]


def falling(ticks: int) -> list[bytes]:
    return [_tick(1000.0 - (i % 1000) * 0.05) for i in range(ticks)]


def _tick(price: float) -> bytes:
    return orjson.dumps({"instrument": INSTRUMENT, "token": 1, "last_price": round(price, 2), "volume": 1,
                         "received_at": "2025-01-15T04:00:00+00:00"})  # fmt: skip


def fixed_index(stops: int) -> Watch:
    watch = Watch()
    for sid in range(stops):
        watch.index.arm(sid, INSTRUMENT, 900.0 + (sid % 800) * 0.05)  # 900.00-939.95: under both paths
    return watch


def trailing_index(stops: int) -> Watch:
    watch = Watch()
    watch.highs.follow(INSTRUMENT)
    for sid in range(stops):
        spread = sid % 4000
        trail = (
            Trail(high=1000.0, points=60.0 + spread / 100)
            if sid % 2 == 0
            else Trail(high=1000.0, percent=6.0 + spread / 1000)
        )
        watch.index.arm(sid, INSTRUMENT, 500.0, trail=trail)
        if sid == 0:
            watch.steps.follow(sid, INSTRUMENT, 500.0, trail=trail, cost_at=None, entry=1000.0)
    return watch


def run(watch: Watch, ticks: list[bytes]) -> tuple[float, int, int]:
    """Ticks/s, exits and protective stop raises: the worker's per-tick work (decode, highs, crossed, trigger,
    steps). A raise is a broker call that the rate limits pace; here only the deciding of it is measured."""
    index, take, judged, risen = watch.index, watch.highs.take, watch.highs.judged, watch.steps.risen
    rereading = watch.highs.rereading
    crossed, trigger, loads = index.crossed, index.trigger, orjson.loads
    exits = raises = 0
    gc.collect()
    started = time.perf_counter()
    read_at = time.time()
    for offset, value in enumerate(ticks):
        tick = loads(value)
        instrument, price = tick["instrument"], float(tick["last_price"])
        mark = (offset, 0)
        if rereading and judged(instrument, mark):
            continue
        take(instrument, price, read_at, mark)
        if crossed(instrument, price):
            exits += len(trigger(instrument, price))
        raises += len(risen(instrument, price, index))
    return len(ticks) / (time.perf_counter() - started), exits, raises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--stops", type=int, default=100_000)
    args = parser.parse_args()
    paths: dict[str, Callable[[int], list[bytes]]] = {"rising": rising, "falling": falling}
    builders: dict[str, Callable[[int], Watch]] = {"fixed": fixed_index, "trailing": trailing_index}
    rates: dict[tuple[str, str, int], float] = {}
    print(f"{args.ticks:,} ticks per case, one instrument\n")
    print(f"{'stops':<10} {'count':>8} {'path':<8} {'ticks/s':>12} {'us/tick':>8} {'exits':>6} {'raises':>8} "
          f"{'armed in':>9}")  # fmt: skip
    for kind, build in builders.items():
        for count in (1, args.stops):
            for path, make in paths.items():
                started = time.perf_counter()
                index = build(count)
                armed_in = time.perf_counter() - started
                rate, exits, raises = run(index, make(args.ticks))
                rates[(kind, path, count)] = rate
                print(f"{kind:<10} {count:>8,} {path:<8} {rate:>12,.0f} {1e6 / rate:>8.2f} {exits:>6} {raises:>8,} "
                      f"{armed_in:>8.2f}s")  # fmt: skip
    print()
    for path in paths:
        one, many = rates[("trailing", path, 1)], rates[("trailing", path, args.stops)]
        ratio = one / many
        verdict = "meets" if ratio <= RATIO_TARGET else "MISSES"
        print(f"trailing, {path}: {args.stops:,} stops cost {ratio:.2f}x one stop per tick "
              f"(target <= {RATIO_TARGET}x): {verdict}")  # fmt: skip
    slowest = min(rates.values())
    verdict = "meets" if slowest > TICKS_TARGET else "MISSES"
    print(f"slowest case: {slowest:,.0f} ticks/s (target > {TICKS_TARGET:,}): {verdict}")


if __name__ == "__main__":
    main()

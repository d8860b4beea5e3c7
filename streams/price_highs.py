"""Each instrument's highest price since any instant: what a trailing stop's high and a move to cost depend on,
kept so that they survive a worker restart or a rebalance.

A position's trailing high is the highest price read since its stop was armed (from the entry, or from the first
price at its activation); its stop has moved to cost once that high reached the threshold. Both are functions of
one thing per instrument, the highest price since an instant, so that, not one number per position, is what is
kept: a tick costs the same however many positions trail on the instrument, and the flush writes one value per
instrument, never one per position.

Per instrument: (instant, price) pairs whose prices strictly fall from the oldest to the newest. A tick at price p
drops the pairs at or under p and appends itself, so the highest price since instant t is the price of the first
pair at or after t (one bisect). Its length is bounded by the number of 0.05 steps between the instrument's
extremes, whatever the number of ticks. Instants are wall-clock seconds (`time.time()`): the same on every worker
that reads the instrument in turn. Written to Redis (`trail-highs`, one field per instrument) every flush; on
rebuilding its index a worker reads the instruments it does not know. A Redis flushed or rebuilt loses them:
the positions then trail from their entries again, as before.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

import orjson
from redis.asyncio import Redis

HIGHS_KEY = "trail-highs"
ARMED_AT_KEY = "trail-armed-at"  # strategy id -> when its rising stop was armed (wall clock), for recovery
KEEP_SECONDS = 24 * 3600.0  # no position trails for longer (intraday; a CNC one re-arms at most daily)


class PriceHighs:
    def __init__(self) -> None:
        self._pairs: dict[str, list[tuple[float, float]]] = {}  # instrument -> (instant, price), prices falling
        self._changed: set[str] = set()

    def follow(self, instrument: str) -> None:
        """Keep the instrument's highs from now on (a position on it trails or may move to cost)."""
        self._pairs.setdefault(instrument, [])

    def take(self, instrument: str, price: float, at: float) -> None:
        """A price read at `at` (instants never go back). Called for every tick: O(1) amortised."""
        pairs = self._pairs.get(instrument)
        if pairs is None:
            return
        while pairs and pairs[-1][1] <= price:
            pairs.pop()
        pairs.append((at, price))
        self._changed.add(instrument)

    def since(self, instrument: str, at: float | None) -> float | None:
        """The highest price read at or after `at`; None if none is known."""
        pairs = self._pairs.get(instrument)
        return highest_since(pairs, at) if pairs and at is not None else None

    async def flush(self, redis: Redis, now: float) -> None:
        """Write the instruments whose highs changed since the last flush (one field each)."""
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        values: dict[str | bytes, bytes] = {}
        for instrument in changed:
            pairs = self._pairs.get(instrument)
            if pairs is None:
                continue
            stale = bisect.bisect_left(pairs, now - KEEP_SECONDS, key=lambda pair: pair[0])
            del pairs[: min(stale, len(pairs) - 1)]
            values[instrument] = orjson.dumps(pairs)
        try:
            if values:
                await redis.hset(HIGHS_KEY, mapping=values)  # type: ignore[arg-type]
        except Exception:
            self._changed |= changed  # written at the next flush
            raise

    async def reload(self, redis: Redis, instruments: Iterable[str]) -> None:
        """After a rebalance or a restart: this worker's own changes written first, then the instruments' highs
        as Redis has them now (another worker may have read them last), kept from now on."""
        await self.flush(redis, time.time())
        self._pairs = {instrument: [] for instrument in instruments}
        self._pairs.update(await read_highs(redis, sorted(self._pairs)))


async def read_highs(redis: Redis, instruments: list[str]) -> dict[str, list[tuple[float, float]]]:
    """The instruments' highs as the workers last wrote them to Redis."""
    if not instruments:
        return {}
    raws = await redis.hmget(HIGHS_KEY, instruments)
    return {
        instrument: [(float(at), float(price)) for at, price in orjson.loads(raw)]
        for instrument, raw in zip(instruments, raws, strict=True)
        if raw
    }


def highest_since(pairs: list[tuple[float, float]], at: float) -> float | None:
    """The highest price of `pairs` (prices falling, oldest first) read at or after `at`."""
    index = bisect.bisect_left(pairs, at, key=lambda pair: pair[0])
    return pairs[index][1] if index < len(pairs) else None

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

What is written is what the ticks of *finished* batches taught (their exits acknowledged by Kafka), with the
place of the last such tick in its partition (offset, CreateTime). The tick feed commits its offsets on its own
beat, so a worker taking an instrument over may read again ticks its owner had finished: judged against highs
that came after them, an old tick under a later high's stop would exit a position the price never brought down.
Those ticks are skipped (`judged`); every tick after the mark is judged against the highs as they stood
before it, exactly as its first reader would have. The CreateTime guard keeps a recreated topic's ticks, whose
offsets start again, from ever being skipped. A batch that fails is forgotten (`revert`) and read again.
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


Pairs = list[tuple[float, float]]  # (instant, price), prices strictly falling
Mark = tuple[int, int]  # a tick's place in its partition: (offset, CreateTime in ms)


class PriceHighs:
    def __init__(self) -> None:
        self._pairs: dict[str, Pairs] = {}  # instrument -> the highs, with the batch under way
        self._settled: dict[str, tuple[Pairs, Mark | None]] = {}  # ... as of the last finished batch, its last tick
        self._touched: dict[str, Mark | None] = {}  # instruments the batch under way took, its last tick of each
        self._changed: set[str] = set()  # settled, not yet written
        self._judged: dict[str, Mark] = {}  # read back: ticks up to here were finished by whoever read them

    def follow(self, instrument: str) -> None:
        """Keep the instrument's highs from now on (a position on it trails or may move to cost)."""
        if instrument not in self._pairs:
            self._pairs[instrument] = []
            self._settled[instrument] = ([], None)

    def take(self, instrument: str, price: float, at: float, mark: Mark | None = None) -> None:
        """A price read at `at` (instants never go back), from the tick at `mark`. Called for every tick: O(1)
        amortised."""
        pairs = self._pairs.get(instrument)
        if pairs is None:
            return
        while pairs and pairs[-1][1] <= price:
            pairs.pop()
        pairs.append((at, price))
        self._touched[instrument] = mark

    @property
    def rereading(self) -> bool:
        """Whether some instrument's ticks may still be ones its previous reader finished (see `judged`)."""
        return bool(self._judged)

    def judged(self, instrument: str, mark: Mark) -> bool:
        """Whether the tick at `mark` was finished before this worker read the highs back (its exits are in
        Kafka, its price in the highs): then it is not judged again. Ticks come in order: the first one past
        the mark ends the skipping."""
        through = self._judged.get(instrument)
        if through is None:
            return False
        if mark[0] <= through[0] and mark[1] <= through[1]:
            return True
        del self._judged[instrument]
        return False

    def settle(self) -> None:
        """The batch is finished (its exits acknowledged): what it taught is written at the next flush."""
        for instrument, mark in self._touched.items():
            if (pairs := self._pairs.get(instrument)) is not None:
                self._settled[instrument] = (list(pairs), mark)
                self._changed.add(instrument)
        self._touched.clear()

    def revert(self) -> bool:
        """The batch failed and will be read again: forget what it taught. Whether it had taught anything."""
        touched = bool(self._touched)
        for instrument in self._touched:
            if (settled := self._settled.get(instrument)) is not None:
                self._pairs[instrument] = list(settled[0])
        self._touched.clear()
        return touched

    def since(self, instrument: str, at: float | None) -> float | None:
        """The highest price read at or after `at`; None if none is known."""
        pairs = self._pairs.get(instrument)
        return highest_since(pairs, at) if pairs and at is not None else None

    async def flush(self, redis: Redis, now: float) -> None:
        """Write the instruments whose settled highs changed since the last flush (one field each)."""
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        values: dict[str | bytes, bytes] = {}
        for instrument in changed:
            settled = self._settled.get(instrument)
            if settled is None:
                continue
            pairs, mark = settled
            _forget_before(pairs, now - KEEP_SECONDS)
            _forget_before(self._pairs.get(instrument, []), now - KEEP_SECONDS)
            values[instrument] = orjson.dumps({"pairs": pairs, "through": mark})
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
        wanted = sorted(set(instruments))
        stored = await read_stored(redis, wanted)
        self._pairs, self._settled, self._touched, self._judged = {}, {}, {}, {}
        for instrument in wanted:
            pairs, mark = stored.get(instrument, ([], None))
            self._pairs[instrument], self._settled[instrument] = list(pairs), (pairs, mark)
            if mark is not None:
                self._judged[instrument] = mark


async def read_highs(redis: Redis, instruments: list[str]) -> dict[str, Pairs]:
    """The instruments' highs as the workers last wrote them to Redis."""
    return {instrument: pairs for instrument, (pairs, _) in (await read_stored(redis, instruments)).items()}


async def read_stored(redis: Redis, instruments: list[str]) -> dict[str, tuple[Pairs, Mark | None]]:
    """The instruments' highs and the last tick they hold, as written to Redis (a bare list: no mark)."""
    if not instruments:
        return {}
    raws = await redis.hmget(HIGHS_KEY, instruments)
    return {instrument: _decoded(raw) for instrument, raw in zip(instruments, raws, strict=True) if raw}


def _decoded(raw: bytes | str) -> tuple[Pairs, Mark | None]:
    value = orjson.loads(raw)
    pairs, mark = (value, None) if isinstance(value, list) else (value["pairs"], value.get("through"))
    return [(float(at), float(price)) for at, price in pairs], (int(mark[0]), int(mark[1])) if mark else None


def _forget_before(pairs: Pairs, instant: float) -> None:
    """Drop the pairs read before `instant`, but the newest (the highest price since then is still its)."""
    stale = bisect.bisect_left(pairs, instant, key=lambda pair: pair[0])
    del pairs[: min(stale, len(pairs) - 1)]


def highest_since(pairs: list[tuple[float, float]], at: float) -> float | None:
    """The highest price of `pairs` (prices falling, oldest first) read at or after `at`."""
    index = bisect.bisect_left(pairs, at, key=lambda pair: pair[0])
    return pairs[index][1] if index < len(pairs) else None

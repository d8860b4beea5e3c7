"""The runtime layer in Redis, with the seed's key names exactly.

- `strategy:{id}`            hash: static metadata of a running strategy (the StrategySpec + run, day)
- `runtime:{id}`             hash: runtime state (state, position, last_action, orders, entry price, ...)
- `symbol:{instrument}:strategies`  set: ids of running strategies on that instrument (e.g. NSE:INFY)
- `lock:runtime:{id}`        the execution engine's lock on one strategy's runtime
- `ltp`                      hash instrument -> last price: one write per instrument per tick batch,
                             never one per strategy per tick
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import date
from enum import StrEnum
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.events import StrategySpec


class RuntimeState(StrEnum):
    """DESIGN.md section 6: idle -> buying -> bought -> selling -> sold | exited_by_sl | exited_by_target;
    any -> failed | stopped."""

    IDLE = "idle"
    BUYING = "buying"
    BOUGHT = "bought"
    SELLING = "selling"
    SOLD = "sold"
    EXITED_BY_SL = "exited_by_sl"
    EXITED_BY_TARGET = "exited_by_target"
    FAILED = "failed"
    STOPPED = "stopped"


def strategy_key(strategy_id: int) -> str:
    return f"strategy:{strategy_id}"


def runtime_key(strategy_id: int) -> str:
    return f"runtime:{strategy_id}"


def symbol_key(instrument: str) -> str:
    return f"symbol:{instrument}:strategies"


def lock_key(strategy_id: int) -> str:
    return f"lock:runtime:{strategy_id}"


def buys_held_key(user_id: int) -> str:
    """Set from the moment the trader's kill switch (or daily loss limit) is engaged: the execution engine's last
    check before a BUY's call, which Redis answers alone otherwise, then asks the database, where the switch is
    recorded. A flag left over (released, or a new day) costs a read per BUY, never a BUY."""
    return f"buys-held:{user_id}"


BUYS_HELD_SECONDS = 24 * 3600


LTP_KEY = "ltp"
# instrument -> "<ms> <unix seconds>": how late the tick feed read the instrument's last prices, written while
# it reads a second or more behind (the trader's status says the stop is checked that late).
FEED_BEHIND_KEY = "ltp:behind"


def spec_to_hash(spec: StrategySpec, run: int, trading_day: date) -> dict[str, str]:
    return {
        "strategy_id": str(spec.strategy_id),
        "user_id": str(spec.user_id),
        "exchange": spec.exchange,
        "tradingsymbol": spec.tradingsymbol,
        "instrument": spec.instrument,
        "instrument_token": str(spec.instrument_token),
        "quantity": str(spec.quantity),
        "buy_time": spec.buy_time.isoformat(),
        "sell_time": spec.sell_time.isoformat(),
        "reentry_max": str(spec.reentry_max),
        **{
            name: "" if value is None else f"{value:.2f}"
            for name, value in (
                ("stop_loss", spec.stop_loss),
                ("stop_loss_points", spec.stop_loss_points),
                ("stop_loss_percent", spec.stop_loss_percent),
                ("target", spec.target),
                ("target_points", spec.target_points),
                ("target_percent", spec.target_percent),
            )
        },  # fmt: skip
        "product": spec.product.value,
        "protective_stop": "true" if spec.protective_stop else "false",
        "repeat": spec.repeat.value,
        "run": str(run),
        "trading_day": trading_day.isoformat(),
    }


def connect_redis(url: str, max_connections: int = 128, ride_out_seconds: float = 10.0) -> Redis:
    """A client for the services: it rides out a Redis restart and queues for a connection under load.

    A Redis restart (failover, crash, an operator's restart) lasts seconds; a long-running service that
    dies on the first refused connection turns that into an outage of its own (the crash matrix found the
    tick connector doing exactly that). So a refused or dropped connection is retried with backoff for
    about `ride_out_seconds`; the API passes a short window so a request fails fast with 503 instead.
    Every command we send is safe to repeat: hash and set writes are idempotent, a lock's SET NX that
    is repeated after it succeeded only waits for its own TTL, and the rate limiter then counts one
    slot too many (conservative). The pool waits for a free connection rather than failing at its cap:
    a burst of order lanes next to a recovery must queue, not crash.
    """
    retries, waited = 0, 0.0
    while waited < ride_out_seconds:  # ExponentialBackoff(cap=0.5, base=0.05) sleeps 0.1, 0.2, 0.4, 0.5, 0.5, ...
        retries += 1
        waited += min(0.5, 0.05 * 2**retries)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=30,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis(connection_pool=pool)


def _wire(fields: Mapping[str, str]) -> dict[Any, Any]:
    # redis-py types mappings invariantly over bytes|str|int|float keys; ours are all str.
    return dict(fields)


class RuntimeStore:
    """Typed access to the runtime keys. Values are strings on the wire; callers get them as hashes."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def load(
        self,
        spec: StrategySpec,
        run: int,
        trading_day: date,
        runtime: Mapping[str, str],
    ) -> None:
        """Sequence 4: static metadata, runtime, and the symbol set, in one round trip."""
        pipe = self.redis.pipeline(transaction=True)
        self._queue_load(pipe, spec, run, trading_day, runtime)
        await pipe.execute()

    async def load_many(
        self, entries: Iterable[tuple[StrategySpec, int, date, Mapping[str, str]]], chunk: int = 1000
    ) -> int:
        """Recovery's bulk load: one pipelined round trip per `chunk` strategies on one connection."""
        loaded = 0
        pipe = self.redis.pipeline(transaction=False)
        for spec, run, trading_day, runtime in entries:
            self._queue_load(pipe, spec, run, trading_day, runtime)
            loaded += 1
            if loaded % chunk == 0:
                await pipe.execute()
        await pipe.execute()
        return loaded

    @staticmethod
    def _queue_load(pipe: Any, spec: StrategySpec, run: int, trading_day: date, runtime: Mapping[str, str]) -> None:
        pipe.delete(strategy_key(spec.strategy_id), runtime_key(spec.strategy_id))
        pipe.hset(strategy_key(spec.strategy_id), mapping=_wire(spec_to_hash(spec, run, trading_day)))
        pipe.hset(runtime_key(spec.strategy_id), mapping=_wire(runtime))
        pipe.sadd(symbol_key(spec.instrument), str(spec.strategy_id))

    async def unload(self, strategy_id: int, instrument: str) -> None:
        """Sequence 8: delete the keys and the set membership."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(strategy_key(strategy_id), runtime_key(strategy_id))
        pipe.srem(symbol_key(instrument), str(strategy_id))
        await pipe.execute()

    async def hold_buys(self, user_id: int) -> None:
        await self.redis.set(buys_held_key(user_id), "1", ex=BUYS_HELD_SECONDS)

    async def release_buys(self, user_id: int) -> None:
        await self.redis.delete(buys_held_key(user_id))

    async def strategy(self, strategy_id: int) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(strategy_key(strategy_id)))

    async def runtime(self, strategy_id: int) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(runtime_key(strategy_id)))

    async def last_price(self, instrument: str) -> float | None:
        value = await self.redis.hget(LTP_KEY, instrument)
        return float(value) if value is not None else None

    async def last_prices(self, instruments: list[str]) -> dict[str, float]:
        """The last prices the workers wrote (every LAST_PRICE_FLUSH_SECONDS); an instrument never priced is absent."""
        if not instruments:
            return {}
        values = await self.redis.hmget(LTP_KEY, instruments)
        return {i: float(v) for i, v in zip(instruments, values, strict=True) if v is not None}

    async def set_last_prices(self, prices: Mapping[str, float]) -> None:
        if prices:
            await self.redis.hset(LTP_KEY, mapping={k: repr(v) for k, v in prices.items()})

    async def restore_last_prices(self, prices: Mapping[str, float]) -> None:
        """After Redis lost its data: the prices a worker knows, where none has been written since. An instrument
        that does not tick again would otherwise have no price for a chased exit, the P&L or a loss limit."""
        if prices:
            async with self.redis.pipeline(transaction=False) as pipe:
                for instrument, price in prices.items():
                    pipe.hsetnx(LTP_KEY, instrument, repr(price))
                await pipe.execute()

    async def set_feed_behind(self, instruments: Iterable[str], behind_ms: float, cleared: Iterable[str]) -> None:
        """Mark these instruments' prices as read `behind_ms` late; unmark `cleared` (caught up)."""
        pipe = self.redis.pipeline(transaction=False)
        mark = f"{behind_ms:.0f} {time.time():.1f}"
        if marks := dict.fromkeys(instruments, mark):
            pipe.hset(FEED_BEHIND_KEY, mapping=cast(Any, marks))
        if cleared := list(cleared):
            pipe.hdel(FEED_BEHIND_KEY, *cleared)
        await pipe.execute()

"""Sequence 12, the hot path: `GET /strategy/status/{id}` answered from one Redis round trip.

While a strategy is loaded, one Lua script returns `strategy:{id}`, `runtime:{id}` and the instrument's
last price together (the price key depends on the instrument, so a plain pipeline would need two trips).
Ownership is checked against the `user_id` field of `strategy:{id}`: no database query. When the keys are
absent (stopped, finished, or Redis was flushed), the answer is built from the database instead.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.coalesce import Coalesced
from core.exit_prices import ExitRule
from storage.models import OrderLog, OrderLogKind, Strategy
from storage.runtime import FEED_BEHIND_KEY, LTP_KEY, RuntimeState, runtime_key, strategy_key

log = logging.getLogger(__name__)

# Returns one JSON string, not nested arrays: redis-py's pure-Python reply parser costs a few microseconds
# per reply line, and two hashes come back as ~40 lines. One bulk string is one line plus one read.
_READ_STATUS = """
local s = redis.call('HGETALL', KEYS[1])
if #s == 0 then return '' end
local static = {}
for i = 1, #s, 2 do static[s[i]] = s[i + 1] end
local r = redis.call('HGETALL', KEYS[2])
local runtime = {}
for i = 1, #r, 2 do runtime[r[i]] = r[i + 1] end
local price, behind = false, false
if static['instrument'] then
  price = redis.call('HGET', KEYS[3], static['instrument'])
  behind = redis.call('HGET', KEYS[4], static['instrument'])
end
return cjson.encode({s = static, r = runtime, p = price, b = behind})
"""

# A mark older than this is from a worker that stopped writing (caught up, or gone): not shown.
FEED_MARK_FRESH_SECONDS = 10.0
HOLDING_STATES = frozenset({RuntimeState.BOUGHT.value, RuntimeState.SELLING.value})

# What an order result does to the position, for answers built from the order log.
_FILLED_STATE = {"BUY": "bought", "SELL": "sold", "STOPLOSS": "exited_by_sl", "TARGET": "exited_by_target",
                 "EXIT": "sold"}  # fmt: skip


class StatusNotFound(LookupError):
    pass


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if result == result and abs(result) != float("inf") else None


def _exit_rule(static: Mapping[str, str]) -> ExitRule:
    """The stop and target as the strategy's static hash holds them (older hashes: only `stop_loss`)."""
    return ExitRule(*(_float(static.get(name)) for name in (
        "stop_loss", "stop_loss_points", "stop_loss_percent", "target", "target_points", "target_percent",
    )))  # fmt: skip


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _pnl(state: str, entry: float | None, last: float | None, quantity: int | None) -> float | None:
    if state in HOLDING_STATES and entry is not None and last is not None and quantity:
        return round((last - entry) * quantity, 2)
    return None


def feed_delay(mark: object, now: float) -> float | None:
    """Seconds the tick feed reads the instrument's prices late, from a fresh mark ("<ms> <unix s>")."""
    if not isinstance(mark, str):
        return None
    try:
        behind_ms, at = (float(part) for part in mark.split())
    except ValueError:
        return None
    return round(behind_ms / 1000, 1) if now - at <= FEED_MARK_FRESH_SECONDS else None


def status_from_runtime(
    strategy_id: int,
    static: Mapping[str, str],
    runtime: Mapping[str, str],
    last_price: float | None,
    market_data_delay: float | None = None,
) -> dict[str, Any]:
    state = runtime.get("state") or RuntimeState.IDLE.value
    quantity = _int(static.get("quantity"))
    entry_price = _float(runtime.get("entry_price"))
    exits = _exit_rule(static)
    cycle = _int(runtime.get("cycle")) or 1
    return {
        "strategy_id": strategy_id,
        "symbol": static.get("instrument") or f"{static.get('exchange')}:{static.get('tradingsymbol')}",
        "strategy_status": runtime.get("strategy_status") or "running",
        "state": state,
        "position": runtime.get("position") or "none",
        "last_action": runtime.get("last_action") or "",
        "last_price": last_price,
        "market_data_delay_seconds": market_data_delay,
        "quantity": quantity,
        "stop_loss": exits.stop_price(entry_price),
        "target": exits.target_price(entry_price),
        "entry_price": entry_price,
        "entry_at": runtime.get("entry_at") or None,
        "exit_price": _float(runtime.get("exit_price")),
        "exit_at": runtime.get("exit_at") or None,
        "unrealised_pnl": _pnl(state, entry_price, last_price, quantity),
        "run": _int(static.get("run") or runtime.get("run")),
        "cycle": cycle,
        "reentries_left": max((_int(static.get("reentry_max")) or 0) - (cycle - 1), 0),
        "trading_day": static.get("trading_day") or runtime.get("trading_day"),
        "repeat": static.get("repeat") or "once",
        "next_run_day": runtime.get("next_run_day") or None,
        "last_order_status": runtime.get("last_order_status") or None,
        "last_order_message": runtime.get("last_order_message") or None,
        "source": "runtime",
    }


class _ScriptBatcher:
    """Auto-pipelining: status reads that arrive together go to Redis as one pipeline (`core.coalesce`).

    Under load, dozens of polls arrive per loop turn; each alone would pay redis-py's per-command cost
    (pool checkout, packing, a reply read) which dominates this endpoint. Batched, that cost is paid once
    per pipeline. A lone read goes at once.
    """

    def __init__(self, redis: Redis, script: str) -> None:
        self.redis = redis
        self.script = script
        self.sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._reads: Coalesced[list[str], str] = Coalesced(self._send)

    async def __call__(self, keys: list[str]) -> str:
        return await self._reads(keys)

    async def _send(self, batch: list[list[str]]) -> list[Any]:
        try:
            return await self._execute(batch)
        except NoScriptError:
            # Redis restarted or was flushed of scripts: load it once and retry the batch.
            await self.redis.script_load(self.script)
            return await self._execute(batch)

    async def _execute(self, batch: list[list[str]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys in batch:
            pipe.evalsha(self.sha, len(keys), *keys)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            raise NoScriptError("NOSCRIPT")
        return replies


class StatusReader:
    def __init__(self, redis: Redis, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self.redis = redis
        self.session_factory = session_factory
        self._script = _ScriptBatcher(redis, _READ_STATUS)

    async def read(self, strategy_id: int, user_id: int) -> bytes:
        """The status as JSON bytes; raises StatusNotFound for absent and foreign strategies alike."""
        try:
            raw = await self._script([strategy_key(strategy_id), runtime_key(strategy_id), LTP_KEY, FEED_BEHIND_KEY])
        except RedisError as exc:
            # The poll must still answer: the database knows the status, if not the live price.
            log.warning("status %s: Redis unavailable (%s); answering from the database", strategy_id, exc)
            return orjson.dumps(await self._from_database(strategy_id, user_id, redis_ok=False))
        if raw:
            loaded = orjson.loads(raw)
            static, runtime = loaded["s"], loaded["r"] or {}  # cjson encodes an empty table as {}
            if static.get("user_id") != str(user_id):
                raise StatusNotFound(strategy_id)
            price = loaded["p"] if isinstance(loaded["p"], str) else None
            delay = feed_delay(loaded.get("b"), time.time())
            return orjson.dumps(status_from_runtime(strategy_id, static, runtime, _float(price), delay))
        return orjson.dumps(await self._from_database(strategy_id, user_id, redis_ok=True))

    async def _from_database(self, strategy_id: int, user_id: int, *, redis_ok: bool) -> dict[str, Any]:
        async with self.session_factory() as session:
            strategy = (
                await session.execute(select(Strategy).where(Strategy.id == strategy_id, Strategy.user_id == user_id))
            ).scalar_one_or_none()
            if strategy is None:
                raise StatusNotFound(strategy_id)
            results = (
                (
                    await session.execute(
                        select(OrderLog)
                        .where(
                            OrderLog.strategy_id == strategy_id,
                            OrderLog.run == strategy.run,
                            OrderLog.kind == OrderLogKind.RESULT.value,
                        )
                        .order_by(OrderLog.id)
                    )
                )
                .scalars()
                .all()
            )
        last_price = None
        if redis_ok:
            try:
                last_price = _float(await self.redis.hget(LTP_KEY, strategy.instrument))
            except RedisError:
                last_price = None

        state = {"running": RuntimeState.IDLE.value}.get(strategy.status, strategy.status)
        position, last_action = "none", ""
        entry_price: Decimal | None = None
        entry_at = exit_at = None
        exit_price: Decimal | None = None
        last = results[-1] if results else None
        cycle = max(sum(1 for row in results if row.action == "BUY" and row.status in ("filled", "placed")), 1)
        for row in results:
            last_action = row.action
            if row.status == "filled":
                position = state = _FILLED_STATE.get(row.action, position)
                if row.action == "BUY":
                    entry_price, entry_at = row.price, row.created_at.isoformat()
                else:
                    exit_price, exit_at = row.price, row.created_at.isoformat()
            elif row.status in {"failed", "rejected"}:
                state = RuntimeState.FAILED.value
        entry = float(entry_price) if entry_price is not None else None
        return {
            "strategy_id": strategy.id,
            "symbol": strategy.instrument,
            "strategy_status": strategy.status,
            "state": state,
            "position": position,
            "last_action": last_action,
            "last_price": last_price,
            "market_data_delay_seconds": None,
            "quantity": strategy.quantity,
            "stop_loss": strategy.exits.stop_price(entry),
            "target": strategy.exits.target_price(entry),
            "entry_price": entry,
            "entry_at": entry_at,
            "exit_price": float(exit_price) if exit_price is not None else None,
            "exit_at": exit_at,
            "unrealised_pnl": _pnl(state, entry, last_price, strategy.quantity),
            "run": strategy.run,
            "cycle": cycle,
            "reentries_left": strategy.reentry.left(cycle),
            "trading_day": strategy.trading_day.isoformat() if strategy.trading_day else None,
            "repeat": strategy.repeat,
            "next_run_day": strategy.next_run_day.isoformat() if strategy.next_run_day else None,
            "last_order_status": last.status if last is not None else None,
            "last_order_message": last.message if last is not None else None,
            "source": "database",
        }

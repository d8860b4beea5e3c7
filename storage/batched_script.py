"""A Redis script whose concurrent calls share one pipelined round trip.

In a burst hundreds of orders call the same script at once (take a strategy's lock, update its runtime, check
that a BUY's strategy still runs). One call each took a pooled connection each: the pool opened a hundred new
ones (connect, handshake, health check), most of the worker's event loop for an exits burst's first 300 ms.
Here whatever is called while a pipeline is on the wire goes out in the next one, in the order called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio import Redis

from core.coalesce import Coalesced

MAX_CALLS_PER_PIPELINE = 500

Call = tuple[Sequence[str], Sequence[str | int | float]]  # keys, args


class BatchedScript:
    def __init__(self, redis: Redis, script: str) -> None:
        self._script = redis.register_script(script)
        self._redis = redis
        self._calls: Coalesced[Call, object] = Coalesced(self._send, MAX_CALLS_PER_PIPELINE)

    @property
    def batches(self) -> int:
        """Round trips made so far (what the tests count)."""
        return self._calls.batches

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> object:
        """The script's answer; raises what the script raised for this call alone."""
        return await self._calls((keys, args))

    def submit(self, keys: Sequence[str], args: Sequence[str | int | float]) -> asyncio.Future[object]:
        """Queue the call now, in order with every other, for a caller that need not wait for its answer."""
        return self._calls.submit((keys, args))

    async def _send(self, calls: list[Call]) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await self._script(keys=list(keys), args=list(args), client=pipe)
            return list(await pipe.execute(raise_on_error=False))

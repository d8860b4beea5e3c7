"""Last prices asked of the broker for instruments this worker has no price for, coalesced.

A stop armed before its instrument ever ticked here, with Redis emptied by a restart, needs the broker's last
price or a position already through its stop waits for a tick that a quiet instrument may not send. After a
restart, or in a burst of fills, hundreds of instruments are armed within moments; asked one by one, each
was a database read, a decryption, a new HTTP connection and a quote call (about 5 % of the worker's time
in the 1,000-order burst). Instruments asked for while a lookup is under way go out together in the next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Fetch = Callable[[list[str]], Awaitable[dict[str, float]]]


class BrokerPrices:
    def __init__(self, fetch: Fetch, found: Callable[[str, float], object]) -> None:
        self._fetch = fetch  # the broker's quote call (Kite's ltp, chunked by the caller)
        self._found = found
        self._wanted: set[str] = set()  # asked for and not yet answered
        self._queued: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def ask(self, instrument: str) -> None:
        """Look `instrument` up soon, once however often it is asked for until then."""
        if instrument in self._wanted:
            return
        self._wanted.add(instrument)
        self._queued.append(instrument)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(0)  # the rest of a burst of arms asks first
        while self._queued:
            batch, self._queued = sorted(self._queued), []
            try:
                prices = await self._fetch(batch)
            except Exception:
                log.exception("no last prices from the broker for %d instrument(s)", len(batch))
                prices = {}
            finally:
                self._wanted.difference_update(batch)
            for instrument, price in prices.items():
                self._found(instrument, price)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

"""One read shared by concurrent callers, never answering a caller with a read that began before it asked."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class FreshSharedRead(Generic[T]):
    """Concurrent callers share one read, and no caller is answered by a read that began before it asked.

    A caller that arrives while a read is on the wire waits for the next one, which begins when that one ends
    and answers everyone who queued meanwhile. Looking an order up by tag reads the trader's whole order book
    (Kite has no filter); after a restart dozens of one trader's unresolved intents are looked up at once,
    and Kite allows about 10 such requests a second per api_key. The same book answers an order's status,
    polled until the order fills. Sharing cuts a burst's lookups to two, reads start at least `spacing`
    apart (however many orders are followed, a trader's reads stay under Kite's limit), and the rule keeps
    each answer fresher than its question: a lookup that decides whether an order is sent again, or a
    status read after a placement, must not be answered by a book read that began before.

    A read still on the wire after `hedge_after` seconds is not waited for: the next one begins beside it, and
    whichever of them answers first answers everyone it is fresh enough for. A broker that holds one request
    (a timeout, up to the client's own) otherwise held up every lookup of the trader behind it: after a
    restart, positions that the redelivered BUYs were to find stayed unknown for seconds, their crossed stops
    with them (crash matrix). A failed read fails only the callers that no other read on the wire can answer.
    """

    def __init__(
        self, read: Callable[[], Awaitable[T]], spacing: float = 0.0, hedge_after: float | None = None
    ) -> None:
        self._read = read
        self.spacing = spacing  # seconds between the starts of two reads, at least
        self.hedge_after = hedge_after
        self._order = itertools.count()  # orders the asks and the reads' beginnings
        self._waiting: list[tuple[int, asyncio.Future[T]]] = []  # (when it asked, its answer)
        self._on_the_wire: dict[int, float] = {}  # when it began (order) -> loop time
        self._changed = asyncio.Event()  # a read ended
        self._reader: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()
        self._last_began: float | None = None  # loop time

    async def __call__(self) -> T:
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieved)
        self._waiting.append((next(self._order), answer))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_while_asked())
        return await asyncio.shield(answer)  # one caller giving up does not cancel the others' read

    async def _read_while_asked(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                wait = self._until_next_read(loop.time())
                if wait is None or wait > 0:
                    # Whoever asks meanwhile still joins the next read: it has not begun.
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait)
                    continue
                self._last_began = loop.time()
                began = next(self._order)
                self._on_the_wire[began] = self._last_began
                task = asyncio.create_task(self._one_read(began))
                self._reads.add(task)
                task.add_done_callback(self._reads.discard)
        except asyncio.CancelledError:
            for task in list(self._reads):
                task.cancel()
            raise

    def _until_next_read(self, now: float) -> float | None:
        """Seconds until the next read may begin (None: until the one on the wire ends)."""
        if not self._on_the_wire:
            start_at = now
        elif self.hedge_after is not None:
            start_at = max(self._on_the_wire.values()) + self.hedge_after
        else:
            return None
        if self._last_began is not None:
            start_at = max(start_at, self._last_began + self.spacing)
        return start_at - now

    async def _one_read(self, began: int) -> None:
        failure: Exception | None = None
        try:
            result = await self._read()
        except asyncio.CancelledError:
            del self._on_the_wire[began]
            for _, answer in self._waiting:
                answer.cancel()
            raise
        except Exception as exc:  # every caller it answers gets the failure (and retries as it would)
            failure = exc
        del self._on_the_wire[began]
        still_waiting = []
        for asked, answer in self._waiting:
            if answer.done():
                continue
            if asked > began:  # it began before this caller asked
                still_waiting.append((asked, answer))
            elif failure is None:
                answer.set_result(result)
            elif any(other > asked for other in self._on_the_wire):
                still_waiting.append((asked, answer))  # a read that began after it asked may still answer it
            else:
                answer.set_exception(failure)
        self._waiting = still_waiting
        self._changed.set()


def _retrieved(answer: asyncio.Future[Any]) -> None:
    # Callers that all gave up leave nobody to see a failed read: not worth a warning at exit.
    if not answer.cancelled():
        answer.exception()

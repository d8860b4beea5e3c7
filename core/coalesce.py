"""Concurrent requests for the same kind of round trip, sent together.

In a burst hundreds of tasks want the same call at the same moment (a database write, a Redis check), and one
round trip each costs a turn of the event loop and a connection apiece. Here the first request starts a
sender; whatever is requested while a batch is on the wire goes out together in the next one. A lone request
goes at once: there is no waiting to fill a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Sends a batch; answers each item, in order, with its result or the exception that item alone raises.
Send = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Coalesced(Generic[T, R]):
    def __init__(self, send: Send[T, R], max_batch: int = 1000) -> None:
        self._send = send
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # batches sent (what the tests count)

    async def __call__(self, item: T) -> R:
        # Shielded: a caller that gives up (deadline, shutdown) must not cancel the batch it shares with others.
        return await asyncio.shield(self.submit(item))

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue `item` now, in order with every other; its answer, for a caller that need not wait for it."""
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieved)  # a cancelled caller leaves nobody to see a failure
        self._pending.append((item, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        return answer

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    outcomes = await self._send([item for item, _ in batch])
                except Exception as exc:  # the whole batch failed: every caller in it hears why
                    outcomes = [exc] * len(batch)
                self.batches += 1
                for (_, answer), outcome in zip(batch, outcomes, strict=True):
                    _settle(answer, outcome)
        except asyncio.CancelledError:
            # The loop is shutting down: nobody is left to send for these, so their callers hear it.
            for _, answer in batch + self._pending:
                _settle(answer, RuntimeError("the sender was cancelled"))
            self._pending = []
            raise


def _settle(answer: asyncio.Future[R], outcome: R | BaseException) -> None:
    if answer.done():
        return
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)


def _retrieved(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()

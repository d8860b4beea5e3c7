"""Group commit for the execution engine's durable writes: many orders' rows, one transaction.

Every order writes twice on its path (its attempt row before the broker call, its outcome after), and a
burst has hundreds of orders in flight at once. Written one transaction each, they queued for the
connection pool and, on SQLite, for the database's single write lock, whose busy handler sleeps between
tries: in the 1,000-strategy burst each write waited 1.2 to 1.5 s (pool checkout plus lock), three times
per order. Here whatever was submitted while the previous commit ran goes out together, each statement
once for the whole batch (`executemany`), so a batch costs about what one order's write did.

Each entry is all-or-nothing and is durable when `write` returns: the caller may then call the broker.
Should a batch fail (a duplicate row from a redelivery racing its twin, say), it is rolled back and every
entry is written again on its own, so one entry's error reaches only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import Executable

log = logging.getLogger(__name__)

MAX_BATCH = 500  # entries per transaction: bounds one commit's time when far behind

Step = Callable[[AsyncSession], Awaitable[None]]


@dataclass(frozen=True)
class Rows:
    """One execution of `statement` per parameter set; entries' `Rows` of the same statement share one
    `executemany`. Their parameter sets must have the same keys."""

    statement: Executable
    params: Mapping[str, Any]


Write = Rows | Step  # a Step runs on its own: for a write that reads what it changed (an UPDATE ... RETURNING)


@dataclass
class _Entry:
    writes: Sequence[Write]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """One writer per process: while it commits a batch, the next one gathers."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self._pending: list[_Entry] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed, batches and lone retries alike (what the tests count)

    async def write(self, *writes: Write) -> None:
        """Commit `writes` in one transaction, shared with whatever else is waiting; raises what writing them
        alone raised (IntegrityError for a duplicate) and then none of them is kept."""
        entry = _Entry(writes)
        entry.done.add_done_callback(_retrieved)  # a cancelled caller leaves nobody to see a failure
        self._pending.append(entry)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # Shielded: a caller cancelled (deadline, shutdown) must not cancel the batch it shares with others.
        # Its entry may still be committed; that is the same as a crash just after a commit, which every
        # writer here already survives (an attempt row with no call behind it is looked up before re-sending).
        await asyncio.shield(entry.done)

    async def _drain(self) -> None:
        batch: list[_Entry] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._commit_batch(batch)
        except asyncio.CancelledError:
            # The loop is shutting down: nobody is left to commit for the entries, so their writers hear it.
            for entry in batch + self._pending:
                _settle(entry, RuntimeError("the group commit was cancelled"))
            self._pending = []
            raise

    async def _commit_batch(self, batch: list[_Entry]) -> None:
        try:
            await self._commit([write for entry in batch for write in entry.writes])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            log.info("a batch of %d writes failed (%s): writing each on its own", len(batch), type(exc).__name__)
            for entry in batch:
                try:
                    await self._commit(entry.writes)
                except Exception as lone:
                    _settle(entry, lone)
                else:
                    _settle(entry, None)
        else:
            for entry in batch:
                _settle(entry, None)

    async def _commit(self, writes: Sequence[Write]) -> None:
        # Rows of the same statement go out as one executemany, in the order each statement first appears.
        groups: dict[int, tuple[Executable, list[Mapping[str, Any]]]] = {}
        steps: list[Step] = []
        for write in writes:
            if isinstance(write, Rows):
                groups.setdefault(id(write.statement), (write.statement, []))[1].append(write.params)
            else:
                steps.append(write)
        async with self.sessions() as session:
            for statement, params in groups.values():
                await session.execute(statement, list(params) if len(params) > 1 else params[0])
            for step in steps:
                await step(session)
            await session.commit()
        self.commits += 1


def _settle(entry: _Entry, error: BaseException | None) -> None:
    if entry.done.done():
        return
    if error is None:
        entry.done.set_result(None)
    else:
        entry.done.set_exception(error)


def _retrieved(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()

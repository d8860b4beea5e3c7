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

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import Executable

from core.coalesce import Coalesced

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


class AtCommit:
    """A `Rows` parameter given its value as its batch goes out, not when the row was made (`value` then holds it).

    For a date that others read as "sent by then": an attempt row dated when it was handed over and committed a
    second or two later, behind a busy batch, told another process (one that took over the strategy's lock after
    Redis lost it) that the order had been on its way that much longer than it had; it waited out the broker
    timeout from that date, found nothing yet, and sent the same BUY again (crash matrix)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self.value: Any = None

    def resolve(self) -> Any:
        self.value = self._make()
        return self.value


def _resolved(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if not any(isinstance(value, AtCommit) for value in params.values()):
        return params
    return {name: value.resolve() if isinstance(value, AtCommit) else value for name, value in params.items()}


class GroupCommit:
    """One writer per process: while it commits a batch, the next one gathers."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self._batches: Coalesced[Sequence[Write], None] = Coalesced(self._commit_batch, MAX_BATCH)
        self.commits = 0  # transactions committed, batches and lone retries alike (what the tests count)

    async def write(self, *writes: Write) -> None:
        """Commit `writes` in one transaction, shared with whatever else is waiting; raises what writing them
        alone raised (IntegrityError for a duplicate) and then none of them is kept.

        A caller cancelled (deadline, shutdown) does not cancel the batch it shares with others: its entry may
        still be committed, which is the same as a crash just after a commit, and every writer here already
        survives that (an attempt row with no call behind it is looked up before re-sending)."""
        await self._batches(writes)

    async def _commit_batch(self, batch: list[Sequence[Write]]) -> list[BaseException | None]:
        try:
            await self._commit([write for entry in batch for write in entry])
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.info("a batch of %d writes failed (%s): writing each on its own", len(batch), type(exc).__name__)
            outcomes: list[BaseException | None] = []
            for entry in batch:
                try:
                    await self._commit(entry)
                except Exception as lone:
                    outcomes.append(lone)
                else:
                    outcomes.append(None)
            return outcomes
        return [None] * len(batch)

    async def _commit(self, writes: Sequence[Write]) -> None:
        # Rows of the same statement go out as one executemany, in the order each statement first appears.
        groups: dict[int, tuple[Executable, list[Mapping[str, Any]]]] = {}
        steps: list[Step] = []
        for write in writes:
            if isinstance(write, Rows):
                groups.setdefault(id(write.statement), (write.statement, []))[1].append(_resolved(write.params))
            else:
                steps.append(write)
        async with self.sessions() as session:
            for statement, params in groups.values():
                await session.execute(statement, list(params) if len(params) > 1 else params[0])
            for step in steps:
                await step(session)
            await session.commit()
        self.commits += 1

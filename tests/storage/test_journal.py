"""The group commit on a real database (SQLite file and PostgreSQL): batching, durability, and one entry's
error staying with its own writer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import cast

import pytest
from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.db import session_factory
from storage.journal import AtCommit, GroupCommit, Rows
from storage.models import Notification, User

NOTIFICATIONS = cast(Table, Notification.__table__)
INSERT = insert(NOTIFICATIONS)
RETITLE = (
    update(NOTIFICATIONS)
    .where(NOTIFICATIONS.c.notification_id == bindparam("match"))
    .values(title=bindparam("new_title"))
)
NOW = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


@pytest.fixture
def sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(db_engine)


async def a_user(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        user = User(email="journal@example.com", password_hash="x", created_at=NOW)
        session.add(user)
        await session.commit()
        return user.id


def notice(user_id: int, name: str, title: str = "t") -> Rows:
    return Rows(INSERT, {"notification_id": name, "user_id": user_id, "strategy_id": None, "kind": "k",
                         "title": title, "message": "m", "created_at": NOW})  # fmt: skip


async def titles(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    async with sessions() as session:
        rows = await session.execute(select(Notification.notification_id, Notification.title))
        return dict(rows.tuples().all())


async def test_writes_submitted_together_share_transactions_and_are_durable_when_write_returns(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)

    async def one(n: int) -> None:
        await journal.write(notice(user_id, f"n{n}"))
        # Durable on return: another session (another connection) already sees it.
        async with sessions() as session:
            found = await session.scalar(select(func.count()).where(Notification.notification_id == f"n{n}"))
        assert found == 1

    await asyncio.gather(*(one(n) for n in range(100)))

    assert len(await titles(sessions)) == 100
    # The first write went alone; the 99 that queued behind it went out together, not one commit each.
    assert journal.commits <= 3


async def test_a_duplicate_fails_only_its_own_writer_and_the_rest_of_its_batch_is_kept(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    await journal.write(notice(user_id, "taken"))

    outcomes = await asyncio.gather(
        journal.write(notice(user_id, "a")),
        journal.write(notice(user_id, "b"), notice(user_id, "taken")),  # all-or-nothing: "b" must not be kept
        journal.write(notice(user_id, "c")),
        return_exceptions=True,
    )

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], IntegrityError)
    assert sorted(await titles(sessions)) == ["a", "c", "taken"]


async def test_updates_of_one_statement_in_a_batch_each_change_their_own_row(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    await asyncio.gather(*(journal.write(notice(user_id, f"n{n}")) for n in range(5)))
    commits = journal.commits

    await asyncio.gather(*(journal.write(Rows(RETITLE, {"match": f"n{n}", "new_title": f"title {n}"}))
                           for n in range(5)))  # fmt: skip

    assert await titles(sessions) == {f"n{n}": f"title {n}" for n in range(5)}
    assert journal.commits - commits <= 2


async def test_a_step_runs_in_the_batch_transaction(sessions: async_sessionmaker[AsyncSession]) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    seen: list[int] = []

    async def count_mine(session: AsyncSession) -> None:
        # Runs after the batch's rows, inside its transaction: it sees them before the commit.
        seen.append(await session.scalar(select(func.count()).select_from(NOTIFICATIONS)) or 0)

    await asyncio.gather(journal.write(notice(user_id, "x")), journal.write(notice(user_id, "y"), count_mine))

    assert seen and seen[-1] >= 1
    assert sorted(await titles(sessions)) == ["x", "y"]


async def test_a_writer_cancelled_while_waiting_does_not_cancel_the_batch_it_shares(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    first = asyncio.create_task(journal.write(notice(user_id, "first")))
    await asyncio.sleep(0)  # the writer has taken "first"; the next two gather behind it
    impatient = asyncio.create_task(journal.write(notice(user_id, "impatient")))
    patient = asyncio.create_task(journal.write(notice(user_id, "patient")))
    await asyncio.sleep(0)
    impatient.cancel()

    await asyncio.gather(first, patient)

    assert impatient.cancelled()
    assert "patient" in await titles(sessions)


async def test_a_value_given_at_commit_is_made_when_its_batch_goes_out_not_when_it_was_handed_over(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    release = asyncio.Event()
    stage = {"now": "handed over"}

    async def slow(session: AsyncSession) -> None:
        await release.wait()  # the batch ahead is still committing

    first = asyncio.create_task(journal.write(notice(user_id, "first"), slow))
    await asyncio.sleep(0)  # the writer has taken "first"; the next write gathers behind it
    titled = AtCommit(lambda: stage["now"])
    row = notice(user_id, "dated")
    second = asyncio.create_task(journal.write(Rows(INSERT, {**row.params, "title": titled})))
    await asyncio.sleep(0)
    stage["now"] = "went out"
    release.set()
    await asyncio.gather(first, second)

    assert titled.value == "went out"
    assert (await titles(sessions))["dated"] == "went out"

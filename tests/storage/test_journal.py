"""The group commit on a real database (SQLite file and PostgreSQL): batching, durability, and one entry's
error staying with its own writer."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import cast

import pytest
from sqlalchemy import Table, bindparam, func, insert, select, text, update
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


@asynccontextmanager
async def writes_held(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[None]:
    """Another transaction holds the notifications table: the journal's writes wait in the database meanwhile."""
    bind = sessions.kw["bind"]
    if bind.dialect.name == "sqlite":
        holder = sqlite3.connect(bind.url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("COMMIT")
            holder.close()
        return
    async with sessions() as session, session.begin():
        await session.execute(text("LOCK TABLE notifications IN EXCLUSIVE MODE"))
        yield


async def test_a_value_given_at_commit_is_made_when_its_batch_goes_out_not_when_it_was_handed_over(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user_id = await a_user(sessions)
    journal = GroupCommit(sessions)
    first_went_out = threading.Event()  # its value is made in the writer's thread on SQLite
    stage = {"now": "handed over"}

    def first_title() -> str:
        first_went_out.set()
        return "first"

    async with writes_held(sessions):
        # The first batch goes out and waits in the database; the next write gathers behind it.
        first = asyncio.create_task(journal.write(titled_notice(user_id, "first", AtCommit(first_title))))
        assert await asyncio.to_thread(first_went_out.wait, 10)
        titled = AtCommit(lambda: stage["now"])
        second = asyncio.create_task(journal.write(titled_notice(user_id, "dated", titled)))
        await asyncio.sleep(0)  # the task starts: its write is handed over
        stage["now"] = "went out"
    await asyncio.gather(first, second)

    assert titled.value == "went out"
    assert (await titles(sessions))["dated"] == "went out"


def titled_notice(user_id: int, name: str, title: AtCommit) -> Rows:
    return Rows(INSERT, {**notice(user_id, name).params, "title": title})

"""Daily strategies without the API: the next trading day, what stops a day from starting, and the roller's
start or skip happening once however many workers check at once (real database and Redis, a manual clock)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time

from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ManualClock
from manager.daily_runs import DailyRuns, Waiting, blocker
from schemas.events import LifecycleKind, StrategyLifecycle, UserNotification
from storage.db import session_factory
from storage.models import BrokerAccount, Notification, Strategy, User
from tests.fixtures.api import IST
from tests.fixtures.services import build_settings
from tests.manager.test_strategy_manager import RecordingPublisher, make_strategy, manager_for

MONDAY, HOLI, WEDNESDAY = date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 4)


def at(day: date, hh: int, mm: int) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST)


async def test_the_next_run_day_skips_weekends_and_nse_holidays(db_engine: AsyncEngine, redis: Redis) -> None:
    manager = manager_for(db_engine, redis, RecordingPublisher(), ManualClock(at(MONDAY, 8, 0)))
    assert manager.next_run_day("daily", MONDAY) == WEDNESDAY  # Tuesday 3 March 2026: Holi
    assert manager.next_run_day("daily", WEDNESDAY) == date(2026, 3, 5)
    assert manager.next_run_day("daily", date(2026, 3, 6)) == date(2026, 3, 9)  # Friday -> Monday
    # Thursday 2 April 2026 -> Monday 6 April: Good Friday, then the weekend.
    assert manager.next_run_day("daily", date(2026, 4, 2)) == date(2026, 4, 6)
    assert manager.next_run_day("daily", date(2026, 12, 24)) == date(2026, 12, 28)  # Christmas, a Friday
    assert manager.next_run_day("once", MONDAY) is None


def waiting(**overrides: object) -> Waiting:
    values: dict[str, object] = {
        "strategy_id": 1, "user_id": 1, "run": 1, "day": WEDNESDAY, "buy_at": at(WEDNESDAY, 9, 20),
        "sell_at": at(WEDNESDAY, 15, 0), "kill_switch_day": None, "token_expires_at": at(date(2026, 3, 5), 6, 0),
        "has_egress": True,
    }  # fmt: skip
    values.update(overrides)
    return Waiting(**values)  # type: ignore[arg-type]


def test_what_keeps_a_day_from_starting() -> None:
    assert blocker(waiting(), egress_required=True) is None
    assert blocker(waiting(kill_switch_day=WEDNESDAY), egress_required=False) == "kill switch engaged for 2026-03-04"
    assert blocker(waiting(kill_switch_day=MONDAY), egress_required=False) is None  # an older day's switch
    assert blocker(waiting(token_expires_at=None), egress_required=False) == "broker not connected"
    # Yesterday's Kite session dies at 06:00 today: it cannot carry the day's run to its SELL.
    expired = blocker(waiting(token_expires_at=at(WEDNESDAY, 6, 0)), egress_required=False)
    assert expired is not None and "broker session expired" in expired
    assert blocker(waiting(has_egress=False), egress_required=True) == "no egress configured for order calls"


async def daily_waiting_for(db_engine: AsyncEngine, day: date, token_expires_at: datetime) -> tuple[int, int]:
    """A daily strategy whose run 1 completed, waiting for `day`; its trader's Kite session ends then."""
    now = datetime.now(UTC)
    strategy_id, user_id = await make_strategy(
        db_engine, repeat="daily", status="completed", run=1, trading_day=MONDAY, next_run_day=day,
        buy_time=time(9, 20), sell_time=time(15, 0), stop_loss=None, stop_loss_points=10,
    )  # fmt: skip
    async with db_engine.begin() as conn:
        await conn.execute(
            BrokerAccount.__table__.insert().values(
                user_id=user_id, api_key_encrypted=b"k", api_secret_encrypted=b"s", access_token_encrypted=b"t",
                broker_user_id="AB1234", token_issued_at=now, token_expires_at=token_expires_at, created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
    return strategy_id, user_id


async def strategy_row(db_engine: AsyncEngine, strategy_id: int) -> Strategy:
    async with session_factory(db_engine)() as session:
        return (await session.execute(select(Strategy).where(Strategy.id == strategy_id))).scalar_one()


async def test_several_workers_start_the_day_once_from_its_window_on(db_engine: AsyncEngine, redis: Redis) -> None:
    settings = build_settings(single_trader=True)
    clock = ManualClock(at(WEDNESDAY, 8, 0))
    strategy_id, _ = await daily_waiting_for(db_engine, WEDNESDAY, at(date(2026, 3, 5), 6, 0))
    publishers = [RecordingPublisher() for _ in range(3)]
    rollers = [DailyRuns(settings, session_factory(db_engine), manager_for(db_engine, redis, p, clock), p)
               for p in publishers]  # fmt: skip

    assert await rollers[0].check() == ([], [])  # 08:00: before the window (30 minutes before 09:20)
    clock.set(at(WEDNESDAY, 8, 50))
    outcomes = await asyncio.gather(*(roller.check() for roller in rollers))
    assert sorted(started for started, _ in outcomes) == [[], [], [strategy_id]]
    started = [e for p in publishers for _, _, e in p.sent if isinstance(e, StrategyLifecycle)]
    assert [(e.kind, e.run, e.trading_day, e.next_run_day) for e in started] == [
        (LifecycleKind.STARTED, 2, WEDNESDAY, date(2026, 3, 5))
    ]
    row = await strategy_row(db_engine, strategy_id)
    assert (row.status, row.run, row.trading_day, row.next_run_day) == ("running", 2, WEDNESDAY, date(2026, 3, 5))
    assert await rollers[1].check() == ([], [])  # running: nothing more to do


async def test_a_day_that_cannot_start_is_skipped_once_with_a_notice(db_engine: AsyncEngine, redis: Redis) -> None:
    settings = build_settings(single_trader=True)
    clock = ManualClock(at(WEDNESDAY, 9, 0))
    # The session from Monday died at 06:00 Tuesday; the trader does not log in on Wednesday.
    strategy_id, user_id = await daily_waiting_for(db_engine, WEDNESDAY, at(HOLI, 6, 0))
    publishers = [RecordingPublisher() for _ in range(3)]
    rollers = [DailyRuns(settings, session_factory(db_engine), manager_for(db_engine, redis, p, clock), p)
               for p in publishers]  # fmt: skip
    assert await rollers[0].check() == ([], [])  # in the window: the trader may still log in
    clock.set(at(WEDNESDAY, 9, 20))
    outcomes = await asyncio.gather(*(roller.check() for roller in rollers))
    assert sorted(skipped for _, skipped in outcomes) == [[], [], [strategy_id]]
    row = await strategy_row(db_engine, strategy_id)
    assert (row.status, row.run, row.next_run_day) == ("completed", 1, date(2026, 3, 5))
    notices = [e for p in publishers for _, _, e in p.sent if isinstance(e, UserNotification)]
    assert [n.kind.value for n in notices] == ["daily_run_skipped"]
    assert "broker session expired" in notices[0].message and "2026-03-05" in notices[0].message
    async with session_factory(db_engine)() as session:
        stored = (await session.scalars(select(Notification.kind).where(Notification.user_id == user_id))).all()
    assert stored == ["daily_run_skipped"]

    # A kill switch engaged on Thursday morning: that day is skipped too, for its own reason.
    async with db_engine.begin() as conn:
        await conn.execute(update(User).where(User.id == user_id).values(kill_switch_day=date(2026, 3, 5)))
        await conn.execute(update(BrokerAccount).where(BrokerAccount.user_id == user_id)
                           .values(token_expires_at=at(date(2026, 3, 6), 6, 0)))  # fmt: skip
    clock.set(at(date(2026, 3, 5), 9, 20))
    assert await rollers[1].check() == ([], [strategy_id])
    assert "kill switch" in [e for _, _, e in publishers[1].sent if isinstance(e, UserNotification)][-1].message
    assert (await strategy_row(db_engine, strategy_id)).next_run_day == date(2026, 3, 6)


async def test_days_that_went_by_while_nothing_ran_are_skipped_at_once(db_engine: AsyncEngine, redis: Redis) -> None:
    settings = build_settings(single_trader=True)
    clock = ManualClock(at(date(2026, 3, 9), 8, 0))  # the Monday after: last week's Wednesday never started
    strategy_id, _ = await daily_waiting_for(db_engine, WEDNESDAY, at(date(2026, 3, 10), 6, 0))
    publisher = RecordingPublisher()
    roller = DailyRuns(settings, session_factory(db_engine), manager_for(db_engine, redis, publisher, clock), publisher)
    assert await roller.check() == ([], [strategy_id])
    # One notice, not four; and today still has its run ahead.
    assert (await strategy_row(db_engine, strategy_id)).next_run_day == date(2026, 3, 9)
    clock.set(at(date(2026, 3, 9), 9, 0))
    assert await roller.check() == ([strategy_id], [])


async def test_a_trader_stop_between_two_runs_ends_the_repetition(db_engine: AsyncEngine, redis: Redis) -> None:
    settings = build_settings(single_trader=True)
    clock = ManualClock(at(HOLI, 12, 0))
    strategy_id, user_id = await daily_waiting_for(db_engine, WEDNESDAY, at(date(2026, 3, 5), 6, 0))
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    outcome = await manager.stop(strategy_id, user_id=user_id)
    assert (outcome.status, outcome.already_stopped, outcome.squared_off) == ("stopped", False, False)
    row = await strategy_row(db_engine, strategy_id)
    assert (row.status, row.next_run_day) == ("stopped", None)
    clock.set(at(WEDNESDAY, 9, 0))
    assert await DailyRuns(settings, session_factory(db_engine), manager, publisher).check() == ([], [])
    assert (await manager.stop(strategy_id, user_id=user_id)).already_stopped


async def test_the_kill_switch_stops_todays_run_but_not_the_repetition(db_engine: AsyncEngine, redis: Redis) -> None:
    clock = ManualClock(at(WEDNESDAY, 9, 0))
    strategy_id, user_id = await daily_waiting_for(db_engine, WEDNESDAY, at(date(2026, 3, 5), 6, 0))
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    assert await manager.start_day(strategy_id, WEDNESDAY, after_run=1) is not None
    assert await manager.start_day(strategy_id, WEDNESDAY, after_run=1) is None  # a second worker: already done
    await manager.stop(strategy_id, user_id=user_id, reason="kill switch", end_repetition=False)
    row = await strategy_row(db_engine, strategy_id)
    assert (row.status, row.run, row.next_run_day) == ("stopped", 2, date(2026, 3, 5))
    await manager.stop(strategy_id, user_id=user_id)  # the trader's own STOP, later: no more runs
    assert (await strategy_row(db_engine, strategy_id)).next_run_day is None

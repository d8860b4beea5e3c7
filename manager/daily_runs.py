"""Strategies that repeat every NSE trading day: each day's run starts by itself, or the day is skipped.

A daily strategy waits between runs with `next_run_day` set (the Strategy Manager sets it when a run starts:
the trading day after it, weekends and NSE holidays skipped). Every worker checks on a timer, from the database
alone, so nothing depends on a process that was running yesterday:

- from `DAILY_START_LEAD_MINUTES` before the day's buy_time, the run starts if the day can start: the trader's
  kill switch does not hold that day, and the broker session lasts past the day's sell_time (a Kite token dies at
  06:00; a trader who reconnects in the morning is in time);
- if it still cannot at buy_time (or the day went by while nothing was running), the day is skipped with a
  notice saying why, and the next trading day is tried.

Both moves are compare-and-sets on (run, next_run_day), so of several workers checking at once exactly one
starts the run or skips the day, and a trader's STOP or START in between wins. The skip notice has a
deterministic id: told once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.market import MarketCalendar
from core.settings import Settings
from manager.strategy_manager import EventPublisher, ManagerUnavailable, StrategyManager
from schemas.events import NotificationKind, Repeat, UserNotification
from storage.models import BrokerAccount, Notification, Strategy, StrategyStatus, StrategyStatusChange, User
from storage.runtime import runtime_key

log = logging.getLogger(__name__)

NOTIFICATIONS_TOPIC = "notifications"


@dataclass(frozen=True, slots=True)
class Waiting:
    """A daily strategy between runs, with what decides whether its day can start."""

    strategy_id: int
    user_id: int
    run: int
    day: date
    buy_at: datetime
    sell_at: datetime
    kill_switch_day: date | None
    token_expires_at: datetime | None
    has_egress: bool


def blocker(waiting: Waiting, egress_required: bool) -> str | None:
    """Why `waiting.day` cannot start now, or None if it can."""
    if waiting.kill_switch_day is not None and waiting.kill_switch_day >= waiting.day:
        return f"kill switch engaged for {waiting.day}"
    if waiting.token_expires_at is None:
        return "broker not connected"
    if waiting.token_expires_at <= waiting.sell_at:
        return "broker session expired: reconnect (POST /broker/connect) before the buy time"
    if egress_required and not waiting.has_egress:
        return "no egress configured for order calls"
    return None


class DailyRuns:
    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], manager: StrategyManager,
        publisher: EventPublisher,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.sessions = sessions
        self.manager = manager
        self.publisher = publisher
        self.calendar: MarketCalendar = manager.calendar
        self.lead = timedelta(minutes=settings.daily_start_lead_minutes)

    async def check(self) -> tuple[list[int], list[int]]:
        """Start the runs whose day can start, skip the days that cannot; returns (started, skipped) ids."""
        now = self.manager.clock.now()
        started: list[int] = []
        skipped: list[int] = []
        for waiting in await self._waiting(now):
            if now < waiting.buy_at - self.lead:
                continue  # not yet: the trader may still reconnect or release the kill switch
            reason = blocker(waiting, self.settings.egress_required)
            if reason is None and now >= waiting.buy_at:
                reason = "its buy time passed before the run could start"  # nothing was running, or Kafka was down
            if reason is None:
                try:
                    outcome = await self.manager.start_day(waiting.strategy_id, waiting.day, waiting.run)
                except ManagerUnavailable:
                    log.exception("daily run of strategy %s for %s did not start", waiting.strategy_id, waiting.day)
                    continue
                if outcome is not None:
                    started.append(waiting.strategy_id)
                    log.info("strategy %s: daily run %s started for %s", waiting.strategy_id, outcome.run,
                             waiting.day)  # fmt: skip
            elif now >= waiting.buy_at and await self._skip(waiting, reason, now):
                skipped.append(waiting.strategy_id)
        return started, skipped

    async def _waiting(self, now: datetime) -> list[Waiting]:
        today = self.calendar.local(now).date()
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(Strategy.id, Strategy.user_id, Strategy.run, Strategy.next_run_day, Strategy.buy_time,
                           Strategy.sell_time, User.kill_switch_day, BrokerAccount.token_expires_at,
                           BrokerAccount.egress_url_encrypted.is_not(None))
                    .join(User, User.id == Strategy.user_id)
                    .outerjoin(BrokerAccount, BrokerAccount.user_id == Strategy.user_id)
                    .where(Strategy.repeat == Repeat.DAILY.value, Strategy.next_run_day <= today,
                           Strategy.status != StrategyStatus.RUNNING.value, Strategy.archived_at.is_(None),
                           User.deleted_at.is_(None))
                )
            ).all()  # fmt: skip
        return [
            Waiting(
                strategy_id=sid,
                user_id=uid,
                run=run,
                day=day,
                buy_at=self.calendar.at(day, buy),
                sell_at=self.calendar.at(day, sell),
                kill_switch_day=kill_day,
                token_expires_at=_aware(expires),
                has_egress=bool(egress),
            )
            for sid, uid, run, day, buy, sell, kill_day, expires, egress in rows
            if day is not None  # the query's condition: for the type checker
        ]

    async def _skip(self, waiting: Waiting, reason: str, now: datetime) -> bool:
        """Move the strategy on to the next trading day and tell the trader; False if someone else already did."""
        today = self.calendar.local(now).date()
        # Days long gone (nothing ran for days) move on to the first one still ahead: one notice, not one a day.
        next_day = self.calendar.next_trading_day(max(waiting.day + timedelta(days=1), today))
        if self.calendar.at(next_day, self.calendar.local(waiting.buy_at).time()) <= now:
            next_day = self.calendar.next_trading_day(next_day + timedelta(days=1))
        async with self.sessions() as session:
            moved = (
                await session.execute(
                    update(Strategy)
                    .where(Strategy.id == waiting.strategy_id, Strategy.run == waiting.run,
                           Strategy.next_run_day == waiting.day, Strategy.status != StrategyStatus.RUNNING.value)
                    .values(next_run_day=next_day, updated_at=now)
                    .returning(Strategy.id)
                )
            ).scalar_one_or_none()  # fmt: skip
            if moved is None:
                await session.rollback()
                return False
            status = (
                await session.execute(select(Strategy.status).where(Strategy.id == waiting.strategy_id))
            ).scalar_one()
            session.add(StrategyStatusChange(strategy_id=waiting.strategy_id, status=status, at=now,
                                             reason=f"daily run for {waiting.day} skipped: {reason}"))  # fmt: skip
            await session.commit()
        redis = self.manager.runtime.redis
        if await redis.exists(runtime_key(waiting.strategy_id)):  # the status shows the new day at once
            await redis.hset(runtime_key(waiting.strategy_id), "next_run_day", next_day.isoformat())
        log.warning("strategy %s: daily run for %s skipped (%s); next %s", waiting.strategy_id, waiting.day, reason,
                    next_day)  # fmt: skip
        await self._tell(waiting, reason, next_day, now)
        return True

    async def _tell(self, waiting: Waiting, reason: str, next_day: date, now: datetime) -> None:
        kind = NotificationKind.DAILY_RUN_SKIPPED
        notice = UserNotification(
            notification_id=f"strategy:{waiting.strategy_id}:{waiting.day.isoformat()}:{kind.value}",
            user_id=waiting.user_id, strategy_id=waiting.strategy_id, kind=kind, title="Daily Run Skipped",
            message=f"No run on {waiting.day}: {reason}. The next run is on {next_day}.", occurred_at=now,
        )  # fmt: skip
        try:
            async with self.sessions() as session:
                session.add(Notification(
                    notification_id=notice.notification_id, user_id=notice.user_id, strategy_id=notice.strategy_id,
                    kind=kind.value, title=notice.title, message=notice.message, created_at=now,
                ))  # fmt: skip
                await session.commit()
        except IntegrityError:
            return  # already told
        await self.publisher.publish(NOTIFICATIONS_TOPIC, waiting.user_id, notice)


def _aware(instant: datetime | None) -> datetime | None:
    # SQLite hands timezone-aware columns back naive; the project writes UTC.
    if instant is None or instant.tzinfo is not None:
        return instant
    return instant.replace(tzinfo=UTC)

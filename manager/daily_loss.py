"""A trader's daily loss limit across all their strategies: realised (today's closed positions, from the order
log) plus unrealised (open positions at the last price), counted as the P&L view counts them (`storage/pnl.py`).
Reached, the trader's kill switch is engaged for the day (every strategy stopped, every position squared off, no
START), and the trader is told once.

Checked by every worker on a timer, O(positions of traders with a limit); the actions are idempotent (the kill
switch day is a column, a stop of a stopped strategy does nothing, the notice has a deterministic id), so two
workers checking at once do no harm.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from manager.strategy_manager import EventPublisher, StrategyManager
from schemas.events import NotificationKind, UserNotification
from storage.models import Notification, Strategy, StrategyStatus, User
from storage.pnl import DayPnl, day_pnl, open_instruments, runs_opened_between

log = logging.getLogger(__name__)

NOTIFICATIONS_TOPIC = "notifications"
LIMIT_REASON = "daily loss limit"
KILL_SWITCH_REASON = "kill switch"  # the reason the manual switch gives (api/routes/kill_switch.py)

LastPrices = Callable[[list[str]], Awaitable[dict[str, float]]]


class DailyLossLimits:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], manager: StrategyManager, publisher: EventPublisher,
        last_prices: LastPrices,
    ) -> None:  # fmt: skip
        self.sessions = sessions
        self.manager = manager
        self.publisher = publisher
        self.last_prices = last_prices

    async def check(self) -> list[int]:
        """Engage the kill switch of every trader whose day's loss reached their limit, and finish the stops of a
        day engaged earlier that still has a running strategy; returns the traders acted on.

        The switch is written before the strategies are stopped, so a worker that dies between the two leaves an
        engaged day with strategies running (and a START racing the manual switch can do the same): the next
        check stops them. Nothing else runs a strategy on an engaged day (START and the daily roller refuse it)."""
        now = self.manager.clock.now()
        local = self.manager.calendar.local(now)
        today = local.date()
        day_start = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
        async with self.sessions() as session:
            users = (
                await session.execute(
                    select(User.id, User.daily_max_loss, User.kill_switch_day)
                    .where((User.daily_max_loss.is_not(None)) | (User.kill_switch_day == today))
                    .where(User.id.in_(select(Strategy.user_id).where(Strategy.status == StrategyStatus.RUNNING.value)))
                )
            ).all()
            reached: list[tuple[int, float, DayPnl]] = []
            unfinished: list[int] = []
            for user_id, max_loss, engaged_day in users:
                if engaged_day is not None and engaged_day >= today:
                    unfinished.append(user_id)
                    continue
                runs = await runs_opened_between(session, user_id, day_start, day_start + timedelta(days=1))
                holding = open_instruments(runs)
                pnl = day_pnl(runs, await self.last_prices(sorted(holding)) if holding else {})
                if max_loss is not None and -pnl.total >= float(max_loss):
                    reached.append((user_id, float(max_loss), pnl))
        for user_id, limit, pnl in reached:
            await self._stop_the_day(user_id, limit, pnl, today, now)
        for user_id in unfinished:
            log.warning("user %s: the kill switch is engaged for %s and strategies still run: stopping them",
                        user_id, today)  # fmt: skip
            await self.manager.runtime.hold_buys(user_id)  # again: Redis may have restarted since the switch
            notice = await self._notice_of(user_id, today)
            await self._finish(user_id, KILL_SWITCH_REASON if notice is None else LIMIT_REASON, notice)
        return [user_id for user_id, _, _ in reached] + unfinished

    async def _stop_the_day(self, user_id: int, limit: float, pnl: DayPnl, today: date, now: datetime) -> None:
        log.warning("user %s reached the daily loss limit %.2f (realised %.2f, unrealised %.2f): stopping the day",
                    user_id, limit, pnl.realised, pnl.unrealised)  # fmt: skip
        notice = UserNotification(
            notification_id=self._notice_id(user_id, today), user_id=user_id, kind=NotificationKind.DAILY_LOSS_LIMIT,
            title="Daily Loss Limit Reached – Trading Stopped",
            message=f"Today's loss {-pnl.total:.2f} (realised {-pnl.realised:.2f}, open {-pnl.unrealised:.2f}) reached "
            f"your limit {limit:.2f}: every strategy stopped and every position squared off for the day",
            occurred_at=now,
        )  # fmt: skip
        # The switch and the notice in one transaction: a day found engaged with strategies still running (a worker
        # died in the stops below) is finished by the next check, which knows from the notice that the limit did it.
        await self.manager.runtime.hold_buys(user_id)  # first: a BUY about to leave is withdrawn from now on
        try:
            async with self.sessions() as session:
                await session.execute(update(User).where(User.id == user_id).values(kill_switch_day=today))
                session.add(Notification(
                    notification_id=notice.notification_id, user_id=user_id, strategy_id=None, kind=notice.kind.value,
                    title=notice.title, message=notice.message, created_at=now,
                ))  # fmt: skip
                await session.commit()
        except IntegrityError:  # told already today: engaged again after a release, or by another worker
            async with self.sessions() as session:
                await session.execute(update(User).where(User.id == user_id).values(kill_switch_day=today))
                await session.commit()
            await self._finish(user_id, LIMIT_REASON, None)
            return
        await self._finish(user_id, LIMIT_REASON, notice)

    async def _finish(self, user_id: int, reason: str, notice: UserNotification | None) -> None:
        """Stop the trader's running strategies for the day (squaring off), then send the notice (once more, with the
        same notice id, when a check finishes a day cut short: delivery is at least once)."""
        async with self.sessions() as session:
            running = (
                await session.scalars(
                    select(Strategy.id).where(Strategy.user_id == user_id,
                                              Strategy.status == StrategyStatus.RUNNING.value)
                )
            ).all()  # fmt: skip
        for strategy_id in running:
            await self.manager.stop(
                strategy_id, user_id=user_id, square_off=True, reason=reason, end_repetition=False
            )  # for the day: a daily strategy runs tomorrow
        if notice is not None:
            await self.publisher.publish(NOTIFICATIONS_TOPIC, user_id, notice)

    async def _notice_of(self, user_id: int, today: date) -> UserNotification | None:
        """The day's limit notice, where the limit engaged the switch (none: the trader engaged it)."""
        async with self.sessions() as session:
            row = await session.scalar(
                select(Notification).where(Notification.notification_id == self._notice_id(user_id, today))
            )
        if row is None:
            return None
        return UserNotification(notification_id=row.notification_id, user_id=user_id,
                                kind=NotificationKind.DAILY_LOSS_LIMIT, title=row.title, message=row.message,
                                occurred_at=row.created_at)  # fmt: skip

    @staticmethod
    def _notice_id(user_id: int, today: date) -> str:
        return f"user:{user_id}:{today.isoformat()}:{NotificationKind.DAILY_LOSS_LIMIT.value}"

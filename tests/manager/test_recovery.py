"""Recovery's safety nets for lost SELLs and orphaned positions, against a real database and Redis."""

from __future__ import annotations

import asyncio
import sys
import time as time_module
from datetime import UTC, date, datetime, time
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ManualClock
from core.market import MarketCalendar
from manager.recovery import Recovery
from manager.strategy_manager import StrategyManager
from schemas.events import Action, Event, OrderIntent, Trigger, broker_tag_for, intent_id_for
from storage.db import session_factory
from storage.models import OrderLog, Strategy, User
from storage.runtime import RuntimeStore, buys_held_key, strategy_key
from tests.fixtures.api import IST
from tests.fixtures.services import build_settings

DAY = date(2025, 1, 15)  # a Wednesday the NSE trades


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Event]] = []

    async def publish(self, topic: str, key: str | int, event: Event) -> None:
        self.sent.append((topic, str(key), event))

    async def publish_nowait(self, topic: str, key: str | int, event: Event) -> asyncio.Future[object]:
        await self.publish(topic, key, event)
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def running_strategy(
    engine: AsyncEngine, *, sell_time: time, bought: bool, status: str = "running", day: date = DAY
) -> int:
    now = datetime.now(UTC)
    sessions = session_factory(engine)
    async with sessions() as session:
        user = User(email=f"r{now.timestamp()}@example.com", password_hash="x", created_at=now)
        session.add(user)
        await session.flush()
        strategy = Strategy(
            user_id=user.id, exchange="NSE", tradingsymbol="INFY", instrument_token=408065, quantity=5,
            buy_time=time(10, 0), sell_time=sell_time, stop_loss=Decimal("1400.05"), product="MIS",
            status=status, run=1, trading_day=day, created_at=now, updated_at=now,
        )  # fmt: skip
        session.add(strategy)
        await session.flush()
        if bought:
            intent_id = intent_id_for(strategy.id, DAY, 1, Action.BUY)
            session.add(
                OrderLog(
                    intent_id=intent_id, strategy_id=strategy.id, user_id=user.id, run=1, action="BUY",
                    kind="result", attempt=0, status="filled", broker_tag=broker_tag_for(intent_id),
                    broker_order_id="250115000000001", quantity=5, price=Decimal("1500"), created_at=now,
                )
            )  # fmt: skip
        await session.commit()
        return strategy.id


async def test_a_redis_rebuilt_holds_the_buys_of_a_trader_whose_kill_switch_is_engaged_today(
    db_engine: AsyncEngine, redis: Redis
) -> None:
    """The hold went with the Redis that restarted, and a BUY that finds its strategy loaded does not ask the
    database (crash matrix: two BUYs 3.2 s after the daily loss limit, their strategies not yet stopped)."""
    settings = build_settings()
    clock = ManualClock(datetime(2025, 1, 15, 10, 30, tzinfo=IST))
    publisher = RecordingPublisher()
    sessions = session_factory(db_engine)
    manager = StrategyManager(sessions, RuntimeStore(redis), publisher, clock, MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, publisher, manager)  # type: ignore[arg-type]
    engaged = await running_strategy(db_engine, sell_time=time(15, 0), bought=False)
    released = await running_strategy(db_engine, sell_time=time(15, 0), bought=False)
    yesterday = await running_strategy(db_engine, sell_time=time(15, 0), bought=False)
    async with sessions() as session:
        owners = {s.id: s.user_id for s in await session.scalars(select(Strategy))}
        for strategy_id, day in ((engaged, DAY), (released, None), (yesterday, date(2025, 1, 14))):
            user = await session.get(User, owners[strategy_id])
            assert user is not None
            user.kill_switch_day = day
        await session.commit()

    await recovery.run(republish=False)
    assert await redis.exists(buys_held_key(owners[engaged])) == 1
    assert await redis.exists(buys_held_key(owners[released])) == 0
    assert await redis.exists(buys_held_key(owners[yesterday])) == 0
    assert await redis.exists(strategy_key(engaged)) == 1  # loaded, and its BUY withdrawn by the hold


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_an_open_position_past_its_sell_time_gets_its_sell_once(db_engine: AsyncEngine, redis: Redis) -> None:
    """Regression for crash-matrix seed 9: SELL time events lost between the scheduler and a worker that
    had just restarted after a broker restart left positions open past their sell time."""
    settings = build_settings(sell_overdue_seconds=10)
    clock = ManualClock(datetime(2025, 1, 15, 11, 0, 30, tzinfo=IST))
    publisher = RecordingPublisher()
    sessions = session_factory(db_engine)
    manager = StrategyManager(sessions, RuntimeStore(redis), publisher, clock, MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, publisher, manager)  # type: ignore[arg-type]

    overdue = await running_strategy(db_engine, sell_time=time(11, 0), bought=True)
    await running_strategy(db_engine, sell_time=time(11, 0, 25), bought=True)  # 5 s late: the scheduler's turn
    await running_strategy(db_engine, sell_time=time(11, 0), bought=False)  # nothing to sell
    await running_strategy(db_engine, sell_time=time(12, 0), bought=True)  # not due

    assert await recovery.exit_overdue_sells() == 1
    [(topic, key, intent)] = publisher.sent
    assert isinstance(intent, OrderIntent) and topic == "orders" and key == str(overdue)
    assert (intent.action, intent.trigger, intent.run, intent.trading_day) == (Action.SELL, Trigger.RECOVERY, 1, DAY)
    # The scheduler's own SELL has the same intent id: execution places one order whichever comes first.
    assert intent.intent_id == intent_id_for(overdue, DAY, 1, Action.SELL)
    assert intent.due_at == datetime(2025, 1, 15, 11, 0, tzinfo=IST)

    assert await recovery.exit_overdue_sells() == 0  # sent once; the engine is on it
    clock.advance(20)
    assert await recovery.exit_overdue_sells() == 1  # the 5-s-late one is overdue now


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_a_stopped_strategy_left_holding_shares_is_squared_off_at_start(
    db_engine: AsyncEngine, redis: Redis
) -> None:
    """Regression for crash-matrix seed 5: a BUY filled after the trader's STOP; the worker recorded the fill
    and died before it requested the square-off, and the Kafka broker restarted empty, so the BUY intent was
    never redelivered to repair it. The shares stayed at the broker with no strategy managing them."""
    settings = build_settings()
    clock = ManualClock(datetime(2025, 1, 15, 11, 0, 30, tzinfo=IST))
    publisher = RecordingPublisher()
    sessions = session_factory(db_engine)
    manager = StrategyManager(sessions, RuntimeStore(redis), publisher, clock, MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, publisher, manager)  # type: ignore[arg-type]

    orphan = await running_strategy(db_engine, sell_time=time(12, 0), bought=True, status="stopped")
    await running_strategy(db_engine, sell_time=time(12, 0), bought=False, status="stopped")  # nothing held
    await running_strategy(db_engine, sell_time=time(12, 0), bought=False)  # running, nothing held

    await recovery.exit_crossed_stops()
    [(topic, key, intent)] = publisher.sent
    assert isinstance(intent, OrderIntent) and (topic, key) == ("orders", str(orphan))
    assert intent.intent_id == intent_id_for(orphan, DAY, 1, Action.EXIT)  # the STOP's own: never two orders
    async with sessions() as session:
        [requested] = (await session.execute(select(OrderLog).where(OrderLog.action == "EXIT"))).scalars().all()
    assert (requested.strategy_id, requested.kind, requested.attempt, requested.status) == (
        orphan,
        "attempt",
        0,
        "requested",
    )

    # The next start finds the request: it re-sends that one intent (same id), and asks for nothing new.
    publisher.sent.clear()
    await recovery.exit_crossed_stops()
    assert [event.intent_id for _, _, event in publisher.sent if isinstance(event, OrderIntent)] == [intent.intent_id]
    async with sessions() as session:
        assert len((await session.execute(select(OrderLog).where(OrderLog.action == "EXIT"))).scalars().all()) == 1


# A worker that takes the recovery lock, is recovering, and is then killed (SIGKILL: no release).
_HOLDER_KILLED_MID_RECOVERY = """
import asyncio, sys
from manager.recovery import Recovery
from storage.runtime import connect_redis

from core.settings import Settings

async def main() -> None:
    recovery = Recovery(Settings(), None, connect_redis(sys.argv[1]), None, None)

    async def recovering_for_ever(republish=True):
        print("recovering", flush=True)
        await asyncio.Event().wait()

    async def redis_was_flushed():
        return "no marker", False

    recovery.run = recovering_for_ever
    recovery.needed = redis_was_flushed
    await recovery.ensure()

asyncio.run(main())
"""


async def test_a_worker_killed_mid_recovery_holds_up_the_next_recovery_only_briefly(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression for crash-matrix seed 3: Redis restarted, a worker began recovering and was killed with the
    Kafka broker; its restarted successor waited 6 s on the dead worker's recovery lock (10 s TTL) before
    recovering, and the stops crossed meanwhile were exited 6 to 9 s after the system was back up."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER_KILLED_MID_RECOVERY, redis_url, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            assert (await holder.stdout.readline()).strip() == b"recovering"  # type: ignore[union-attr]
    finally:
        holder.kill()
        await holder.wait()
    killed_at = time_module.monotonic()

    recovery = Recovery(build_settings(), None, redis, None, None)  # type: ignore[arg-type]

    async def run(republish: bool = True) -> str:
        return "recovered"

    async def redis_was_flushed() -> tuple[str, bool]:
        return "no marker", False

    monkeypatch.setattr(recovery, "run", run)
    monkeypatch.setattr(recovery, "needed", redis_was_flushed)
    assert await recovery.ensure() == "recovered"
    # The lock outlives its dead holder by at most its TTL (3 s); with the old 10 s this waited up to 10 s.
    assert time_module.monotonic() - killed_at < 6.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_stopped_strategy_of_today_left_holding_shares_is_squared_off_while_running(
    db_engine: AsyncEngine, redis: Redis
) -> None:
    """Regression for crash-matrix seed 34: the trader's STOP read a stale "no position" from Redis (rebuilt
    while the BUY was being recorded) and sent no EXIT; no worker restarted afterwards, so the check at start
    never ran, and the shares stayed at the broker. Every worker now looks every few seconds."""
    settings = build_settings()
    clock = ManualClock(datetime(2025, 1, 15, 11, 0, 30, tzinfo=IST))
    publisher = RecordingPublisher()
    sessions = session_factory(db_engine)
    manager = StrategyManager(sessions, RuntimeStore(redis), publisher, clock, MarketCalendar(settings))
    recovery = Recovery(settings, sessions, redis, publisher, manager)  # type: ignore[arg-type]

    orphan = await running_strategy(db_engine, sell_time=time(12, 0), bought=True, status="stopped")
    await running_strategy(db_engine, sell_time=time(12, 0), bought=True, status="stopped", day=date(2025, 1, 14))

    assert await recovery.exit_orphaned_positions() == 1  # today's only: older days are the start check's
    [(topic, key, intent)] = publisher.sent
    assert isinstance(intent, OrderIntent) and (topic, key) == ("orders", str(orphan))
    assert intent.intent_id == intent_id_for(orphan, DAY, 1, Action.EXIT)
    assert await recovery.exit_orphaned_positions() == 0  # its EXIT is recorded: asked once

"""The execution engine's test bench: a real database and Redis, a scriptable fake broker, a recording Kafka.

A fake broker because the tests script its failures call by call (a timeout after the order was taken, a
hung connection); the simulator's own fault injection is exercised by the end-to-end tests."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
import tenacity
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from connectors import retrying
from connectors.broker import BrokerEgressDown, BrokerError, BrokerUnavailable, ensure_in_time
from connectors.orders import BrokerOrder, OrderGateway
from core.clock import ManualClock
from core.market import MarketCalendar
from manager.run_specs import initial_runtime, spec_for
from manager.strategy_manager import StrategyManager
from schemas.events import (
    Action,
    Event,
    OrderIntent,
    OrderResult,
    StrategyLifecycle,
    Trigger,
    UserNotification,
    intent_id_for,
)
from storage.db import session_factory
from storage.models import Notification, OrderLog, OrderLogKind, Strategy, User
from storage.runtime import RuntimeStore
from streams.execution import Executor
from tests.fixtures.services import build_settings

IST = ZoneInfo("Asia/Kolkata")
DAY = date(2025, 1, 15)  # Wednesday, NSE open
BUY_AT = datetime(2025, 1, 15, 10, 30, tzinfo=IST)

# The integrity core (fill, redelivery, adoption, retries) runs on SQLite and PostgreSQL; the rest of the
# engine's logic does not depend on the database, so it runs on SQLite only to keep the module fast.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same retry policy, millisecond waits: the engine still backs off, the suite does not crawl."""
    monkeypatch.setattr(
        retrying,
        "wait_exponential_jitter",
        lambda **_: tenacity.wait_exponential_jitter(initial=0.001, max=0.01, jitter=0.001),
    )


# ----------------------------------------------------------------------------------------------- fakes


class PlacedButLost(Exception):
    """Script step: the broker takes the order, then the answer is lost (timeout / 5xx)."""


@dataclass
class FakeGateway:
    """A broker order book. `script` says what each placement does, in order; unscripted calls fill."""

    fill_price: float = 1500.0
    script: list[BrokerError | str] = field(default_factory=list)
    orders: dict[str, BrokerOrder] = field(default_factory=dict)
    placements: list[dict[str, Any]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    leave_by: list[float | None] = field(default_factory=list)  # each placement's `leave_by`
    # Runs once as a placement arrives, before the order is taken: what lands while the call is in flight.
    on_place: Callable[[], Awaitable[object]] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(250_115_000_001))

    def add_order(self, tag: str, status: str = "COMPLETE", message: str | None = None) -> BrokerOrder:
        order_id = str(next(self._ids))
        filled = status == "COMPLETE"
        order = BrokerOrder(
            order_id=order_id,
            status=status,
            tag=tag,
            average_price=self.fill_price if filled else None,
            filled_quantity=5 if filled else 0,
            status_message=message,
        )
        self.orders[order_id] = order
        return order

    async def last_price(self, instrument: str) -> float:
        return self.fill_price

    async def place_market_order(
        self, *, exchange: str, tradingsymbol: str, side: str, quantity: int, product: str, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        ensure_in_time(leave_by)
        if self.script and self.script[0] == "starts-late":  # the call's thread started past `leave_by`: not made
            self.script.pop(0)
            ensure_in_time(float("-inf"))
        if self.on_place is not None:
            arriving, self.on_place = self.on_place, None
            await arriving()
        self.placements.append(
            {"exchange": exchange, "tradingsymbol": tradingsymbol, "side": side, "quantity": quantity,
             "product": product, "tag": tag}
        )  # fmt: skip
        self.leave_by.append(leave_by)
        step = self.script.pop(0) if self.script else "fill"
        if isinstance(step, BrokerError):
            raise step
        if step == "placed-but-lost":
            self.add_order(tag)
            raise BrokerUnavailable("broker did not answer in time")
        if step == "rejected":
            return self.add_order(tag, "REJECTED", "RMS: margin exceeds limit").order_id
        if step == "arrives-after-egress-dropped":
            # The proxy dropped the connection mid-request; the request reaches the broker a moment later.
            asyncio.get_running_loop().call_later(0.2, self.add_order, tag)
            raise BrokerEgressDown("the egress proxy is unreachable or could not reach the broker")
        if step == "placed-then-stalled":
            self.add_order(tag)
            await asyncio.Event().wait()  # the call never returns (a hung connection)
        assert step == "fill", step
        return self.add_order(tag).order_id

    async def order_status(self, order_id: str) -> BrokerOrder:
        return self.orders[order_id]

    async def find_by_tag(self, tag: str) -> BrokerOrder | None:
        self.lookups.append(tag)
        return next((o for o in self.orders.values() if o.tag == tag), None)

    def orders_tagged(self, tag: str) -> list[BrokerOrder]:
        return [o for o in self.orders.values() if o.tag == tag]


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Event]] = []

    async def publish(self, topic: str, key: str | int, event: Event) -> None:
        self.sent.append((topic, str(key), event))

    def lifecycle(self) -> list[StrategyLifecycle]:
        return [e for _, _, e in self.sent if isinstance(e, StrategyLifecycle)]

    def results(self) -> list[OrderResult]:
        return [e for _, _, e in self.sent if isinstance(e, OrderResult)]

    def notifications(self) -> list[UserNotification]:
        return [e for _, _, e in self.sent if isinstance(e, UserNotification)]


# -------------------------------------------------------------------------------------------- fixtures


@dataclass
class Engine:
    executor: Executor
    gateway: FakeGateway
    publisher: RecordingPublisher
    clock: ManualClock
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    strategy_id: int
    user_id: int

    def intent(self, action: Action, *, run: int = 1, due_at: datetime | None = None) -> OrderIntent:
        now = self.clock.now()
        return OrderIntent(
            intent_id=intent_id_for(self.strategy_id, DAY, run, action),
            strategy_id=self.strategy_id,
            user_id=self.user_id,
            run=run,
            action=action,
            trigger={Action.STOPLOSS: Trigger.PRICE, Action.EXIT: Trigger.USER}.get(action, Trigger.SCHEDULE),
            trading_day=DAY,
            instrument="NSE:INFY",
            quantity=5,
            due_at=due_at or now,
            created_at=now,
            trigger_price=1390.0 if action is Action.STOPLOSS else None,
        )

    async def died_after_logging(self, intent: OrderIntent, *, seconds_ago: float = 60.0) -> None:
        """A worker logged attempt 1 of `intent` ("sending") `seconds_ago` and died before any answer was
        recorded (long ago by default: what it sent has reached the broker, or never will)."""
        sent_at = self.clock.now() - timedelta(seconds=seconds_ago)
        async with self.sessions() as session:
            session.add(
                OrderLog(
                    intent_id=intent.intent_id, strategy_id=self.strategy_id, user_id=self.user_id, run=intent.run,
                    action=intent.action.value, kind="attempt", attempt=1, status="sending",
                    broker_tag=intent.broker_tag, quantity=5, created_at=sent_at,
                )
            )  # fmt: skip
            await session.commit()

    async def log_rows(self, kind: OrderLogKind | None = None) -> list[OrderLog]:
        async with self.sessions() as session:
            query = select(OrderLog).where(OrderLog.strategy_id == self.strategy_id).order_by(OrderLog.id)
            if kind is not None:
                query = query.where(OrderLog.kind == kind.value)
            return list((await session.execute(query)).scalars())

    async def attempts(self, intent: OrderIntent) -> list[tuple[int, str]]:
        return [
            (r.attempt, r.status) for r in await self.log_rows(OrderLogKind.ATTEMPT) if r.intent_id == intent.intent_id
        ]

    async def results(self) -> list[tuple[str, str]]:
        return [(r.action, r.status) for r in await self.log_rows(OrderLogKind.RESULT)]

    async def strategy(self) -> Strategy:
        async with self.sessions() as session:
            strategy = await session.get(Strategy, self.strategy_id)
            assert strategy is not None
            return strategy

    async def notifications(self) -> list[tuple[str, str, str]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(Notification.kind, Notification.title, Notification.message).order_by(Notification.id)
            )
            return [(k, t, m) for k, t, m in rows]

    async def runtime(self) -> dict[str, str]:
        return await RuntimeStore(self.redis).runtime(self.strategy_id)


async def create_running_strategy(sessions: async_sessionmaker[AsyncSession], now: datetime) -> Strategy:
    async with sessions() as session:
        user = User(email=f"exec-{uuid.uuid4().hex}@example.com", password_hash="x", created_at=now)
        session.add(user)
        await session.flush()
        strategy = Strategy(
            user_id=user.id, exchange="NSE", tradingsymbol="INFY", instrument_token=408065, quantity=5,
            buy_time=time(10, 30), sell_time=time(15, 0), stop_loss=Decimal("1400.05"), product="MIS",
            status="running", run=1, trading_day=DAY, created_at=now, updated_at=now,
        )  # fmt: skip
        session.add(strategy)
        await session.commit()
        return strategy


async def make_engine(db_engine: AsyncEngine, redis: Redis, **settings_overrides: object) -> Engine:
    # The fakes answer at once, so the broker timeout only sets how long a scripted timeout's order waits before it
    # is looked up: a second runs the same logic as the default seven, in a seventh of the time.
    defaults = {"order_max_attempts": 4, "missed_buy_grace_seconds": 60, "broker_timeout_seconds": 1.0}
    settings = build_settings(**(defaults | settings_overrides))
    clock = ManualClock(BUY_AT)
    sessions = session_factory(db_engine)
    publisher = RecordingPublisher()
    runtime = RuntimeStore(redis)
    manager = StrategyManager(sessions, runtime, publisher, clock, MarketCalendar(settings))
    strategy = await create_running_strategy(sessions, clock.now())
    await runtime.load(spec_for(strategy), 1, DAY, initial_runtime(1, DAY, clock.now()))
    gateway = FakeGateway()

    async def gateways(user_id: int) -> OrderGateway:
        assert user_id == strategy.user_id
        return gateway

    executor = Executor(settings, clock, sessions, redis, publisher, gateways, manager)
    return Engine(executor, gateway, publisher, clock, sessions, redis, strategy.id, strategy.user_id)


@pytest_asyncio.fixture
async def engine(db_engine: AsyncEngine, redis: Redis) -> AsyncIterator[Engine]:
    yield await make_engine(db_engine, redis)

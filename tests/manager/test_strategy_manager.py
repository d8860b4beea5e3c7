"""The Strategy Manager without the API: idempotence, races, failure compensation, auto-stop, reload."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ManualClock
from core.market import MarketCalendar
from manager.strategy_manager import ManagerUnavailable, StrategyManager, StrategyNotFound
from schemas.events import Event, LifecycleKind, OrderIntent, StrategyLifecycle
from storage.db import session_factory
from storage.models import OrderLog, Strategy, StrategyStatusChange, User
from storage.runtime import RuntimeStore, runtime_key, strategy_key
from tests.fixtures.api import IST
from tests.fixtures.services import build_settings


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str, Event]] = []
        self.fail = fail

    async def publish(self, topic: str, key: str | int, event: Event) -> None:
        if self.fail:
            raise ConnectionError("Kafka is down")
        self.sent.append((topic, str(key), event))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 1, 15, 10, 0, tzinfo=IST))


async def make_strategy(engine: AsyncEngine, **overrides: object) -> tuple[int, int]:
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        user_id = (
            await conn.execute(
                User.__table__.insert()
                .values(email=f"m{now.timestamp()}@example.com", password_hash="x", created_at=now)
                .returning(User.__table__.c.id)
            )
        ).scalar_one()
        values: dict[str, object] = {
            "user_id": user_id, "exchange": "NSE", "tradingsymbol": "INFY", "instrument_token": 408065,
            "quantity": 5, "buy_time": time(10, 30), "sell_time": time(15, 0), "stop_loss": Decimal("1400.05"),
            "product": "MIS", "status": "created", "run": 0, "created_at": now, "updated_at": now,
        }  # fmt: skip
        values.update(overrides)
        strategy_id = (
            await conn.execute(Strategy.__table__.insert().values(**values).returning(Strategy.__table__.c.id))
        ).scalar_one()
    return strategy_id, user_id


def manager_for(
    engine: AsyncEngine, redis: Redis, publisher: RecordingPublisher, clock: ManualClock
) -> StrategyManager:
    return StrategyManager(
        session_factory(engine), RuntimeStore(redis), publisher, clock, MarketCalendar(build_settings())
    )


async def test_trading_day_rules(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    manager = manager_for(db_engine, redis, RecordingPublisher(), clock)
    assert manager.trading_day_for(time(15, 0)) == (datetime(2025, 1, 15).date(), True)
    assert manager.trading_day_for(time(9, 45)) == (datetime(2025, 1, 16).date(), False)
    friday_evening = datetime(2025, 1, 17, 16, 0, tzinfo=IST)
    assert manager.trading_day_for(time(15, 0), friday_evening) == (datetime(2025, 1, 20).date(), False)
    saturday = datetime(2025, 1, 18, 10, 0, tzinfo=IST)
    assert manager.trading_day_for(time(15, 0), saturday) == (datetime(2025, 1, 20).date(), False)
    mahashivratri = datetime(2025, 2, 26, 10, 0, tzinfo=IST)  # 26 Feb 2025: Mahashivratri, NSE closed
    assert manager.trading_day_for(time(15, 0), mahashivratri) == (datetime(2025, 2, 27).date(), False)


async def test_concurrent_starts_make_one_run(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    outcomes = await asyncio.gather(*(manager.start(strategy_id, user_id=user_id) for _ in range(5)))
    assert {o.run for o in outcomes} == {1}
    assert sum(not o.already_running for o in outcomes) == 1
    started = [e for _, _, e in publisher.sent if isinstance(e, StrategyLifecycle)]
    assert [e.kind for e in started] == [LifecycleKind.STARTED]


async def test_failed_publish_undoes_the_start(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    manager = manager_for(db_engine, redis, RecordingPublisher(fail=True), clock)
    strategy_id, user_id = await make_strategy(db_engine)
    with pytest.raises(ManagerUnavailable, match="Kafka is down"):
        await manager.start(strategy_id, user_id=user_id)
    assert not await redis.exists(strategy_key(strategy_id), runtime_key(strategy_id))
    async with db_engine.connect() as conn:
        row = (
            await conn.execute(select(Strategy.status, Strategy.status_reason).where(Strategy.id == strategy_id))
        ).one()
        history = (await conn.execute(select(StrategyStatusChange.status).order_by(StrategyStatusChange.id))).all()
    assert row.status == "stopped"
    assert "start failed" in (row.status_reason or "")
    assert [h.status for h in history] == ["running", "stopped"]


async def test_failed_stop_leaves_it_running_for_a_retry(
    db_engine: AsyncEngine, redis: Redis, clock: ManualClock
) -> None:
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    await manager.start(strategy_id, user_id=user_id)
    publisher.fail = True
    with pytest.raises(ManagerUnavailable):
        await manager.stop(strategy_id, user_id=user_id)
    async with db_engine.connect() as conn:
        assert (await conn.execute(select(Strategy.status))).scalar_one() == "running"
    publisher.fail = False
    outcome = await manager.stop(strategy_id, user_id=user_id)
    assert (outcome.status, outcome.already_stopped) == ("stopped", False)


async def test_auto_stop_as_failed_squares_off(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    from schemas.events import Trigger
    from storage.models import StrategyStatus

    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, _ = await make_strategy(db_engine)
    await manager.start(strategy_id)
    await redis.hset(runtime_key(strategy_id), "state", "bought")
    outcome = await manager.stop(
        strategy_id, reason="order failed", final_status=StrategyStatus.FAILED, trigger=Trigger.RECOVERY
    )
    assert (outcome.status, outcome.squared_off) == ("failed", True)
    kinds = [(topic, type(e).__name__) for topic, _, e in publisher.sent]
    assert kinds == [("strategy-lifecycle", "StrategyLifecycle"), ("orders", "OrderIntent"),
                     ("strategy-lifecycle", "StrategyLifecycle")]  # fmt: skip
    intent = publisher.sent[1][2]
    assert isinstance(intent, OrderIntent) and intent.trigger is Trigger.RECOVERY
    last = publisher.sent[2][2]
    assert isinstance(last, StrategyLifecycle) and last.kind is LifecycleKind.FAILED and last.reason == "order failed"


async def test_a_stop_squares_off_a_position_the_order_log_holds_even_when_redis_says_none(
    db_engine: AsyncEngine, redis: Redis, clock: ManualClock
) -> None:
    """Regression for crash-matrix seed 34: Redis, rebuilt after a restart while the BUY was being recorded,
    said "waiting"; the STOP believed it and sent no EXIT, leaving the shares at the broker."""
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    await manager.start(strategy_id)
    async with db_engine.begin() as conn:
        await conn.execute(
            OrderLog.__table__.insert().values(
                intent_id=f"{strategy_id}:2025-01-15:1:BUY", strategy_id=strategy_id, user_id=user_id, run=1,
                action="BUY", kind="result", attempt=0, status="filled", broker_tag="t", broker_order_id="1",
                quantity=5, price=Decimal("1500"), created_at=datetime.now(UTC),
            )
        )  # fmt: skip
    assert (await redis.hgetall(runtime_key(strategy_id)))["state"] == "idle"  # stale: the BUY has filled

    outcome = await manager.stop(strategy_id, user_id=user_id)

    assert outcome.squared_off
    exits = [e for topic, _, e in publisher.sent if topic == "orders"]
    assert len(exits) == 1 and isinstance(exits[0], OrderIntent) and exits[0].action.value == "EXIT"


async def test_not_found_and_foreign(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    manager = manager_for(db_engine, redis, RecordingPublisher(), clock)
    strategy_id, user_id = await make_strategy(db_engine)
    with pytest.raises(StrategyNotFound):
        await manager.start(strategy_id, user_id=user_id + 1000)
    with pytest.raises(StrategyNotFound):
        await manager.stop(999_999)


async def test_load_recreates_keys_without_a_new_run(db_engine: AsyncEngine, redis: Redis, clock: ManualClock) -> None:
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    await manager.start(strategy_id, user_id=user_id)
    await redis.flushdb()
    async with session_factory(db_engine)() as session:
        strategy = await manager.get(session, strategy_id, None)
    await manager.load(strategy, {"state": "bought", "position": "bought"})
    runtime = await redis.hgetall(runtime_key(strategy_id))
    assert (runtime["run"], runtime["state"], runtime["trading_day"]) == ("1", "bought", "2025-01-15")
    assert (await redis.hgetall(strategy_key(strategy_id)))["user_id"] == str(user_id)


async def test_a_stop_while_a_re_entry_buy_is_on_its_way_names_its_exit_for_that_buys_cycle(
    db_engine: AsyncEngine, redis: Redis, clock: ManualClock
) -> None:
    """Crash matrix: cycle 1 was stopped out and cycle 2's BUY was sent when the daily loss limit stopped the
    strategy. The EXIT was named for cycle 1, so the one sale of cycle 2's shares read as cycle 1's second exit."""
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    await manager.start(strategy_id)
    rows = [
        ("BUY", "result", "filled", "1"),
        ("STOPLOSS", "result", "filled", "2"),
        ("c2:BUY", "attempt", "sending", None),
    ]
    async with db_engine.begin() as conn:
        for name, kind, status, order_id in rows:
            await conn.execute(
                OrderLog.__table__.insert().values(
                    intent_id=f"{strategy_id}:2025-01-15:1:{name}", strategy_id=strategy_id, user_id=user_id, run=1,
                    action=name.split(":")[-1], kind=kind, attempt=0 if kind == "result" else 1, status=status,
                    broker_tag=name, broker_order_id=order_id, quantity=5, price=Decimal("1500"),
                    created_at=datetime.now(UTC),
                )
            )  # fmt: skip
    await redis.hset(runtime_key(strategy_id), "state", "buying")

    outcome = await manager.stop(strategy_id, user_id=user_id)

    assert outcome.squared_off
    [exit_intent] = [e for topic, _, e in publisher.sent if topic == "orders" and isinstance(e, OrderIntent)]
    assert (exit_intent.action.value, exit_intent.cycle, exit_intent.intent_id) == (
        "EXIT",
        2,
        f"{strategy_id}:2025-01-15:1:c2:EXIT",
    )

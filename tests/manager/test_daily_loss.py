"""A trader's day P&L (realised from the fills of closed positions, unrealised from the last price of open ones),
and the daily loss limit's check that acts on it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ManualClock
from manager.daily_loss import DailyLossLimits
from schemas.events import NotificationKind, UserNotification
from storage.db import session_factory
from storage.models import Notification, Strategy, User
from storage.pnl import RunFills, Runs, day_pnl, open_instruments, run_pnl
from tests.manager.test_strategy_manager import RecordingPublisher, clock, make_strategy, manager_for

__all__ = ["clock"]  # the fixture, shared with the manager's tests


def test_realised_and_unrealised_add_up_across_strategies_and_runs() -> None:
    runs: Runs = {
        # strategy 1, run 1: bought 10 at 100, stopped out at 95: -50 realised
        (1, 1): RunFills(
            "NSE:A", 10, [("BUY", "filled", Decimal("100"), "1"), ("STOPLOSS", "filled", Decimal("95"), "2")]
        ),
        # strategy 1 restarted (run 2): bought 10 at 96, open
        (1, 2): RunFills("NSE:A", 10, [("BUY", "filled", Decimal("96"), "3")]),
        # strategy 2: 5 bought at 200, open; a failed exit does not close it
        (2, 1): RunFills("NSE:B", 5, [("BUY", "filled", Decimal("200"), "4"), ("SELL", "failed", None, None)]),
        # strategy 3: its BUY was rejected: nothing held
        (3, 1): RunFills("NSE:C", 7, [("BUY", "rejected", None, None)]),
    }
    assert open_instruments(runs) == {"NSE:A", "NSE:B"}
    pnl = day_pnl(runs, {"NSE:A": 94.5, "NSE:B": 210.0})
    assert (pnl.realised, pnl.unrealised, pnl.total) == (-50.0, -15.0 + 50.0, -15.0)
    assert day_pnl(runs, {}).unrealised == 0.0  # no price known yet: nothing counted


def test_every_cycle_of_a_run_that_re_entered_counts() -> None:
    # Bought 10 at 100, stopped at 95 (-50); bought again at 95, stopped at 90 (-50); bought again at 90, open.
    history = [("BUY", "filled", Decimal("100"), "1"), ("STOPLOSS", "filled", Decimal("95"), "2"),
               ("BUY", "filled", Decimal("95"), "3"), ("STOPLOSS", "filled", Decimal("90"), "4"),
               ("BUY", "filled", Decimal("90"), "5")]  # fmt: skip
    pnl = day_pnl({(1, 1): RunFills("NSE:A", 10, history)}, {"NSE:A": 88.0})
    assert (pnl.realised, pnl.unrealised) == (-100.0, -20.0)
    run = run_pnl(RunFills("NSE:A", 10, history), {"NSE:A": 88.0})
    assert run is not None and (run.bought_quantity, run.sold_quantity, run.bought_value, run.sold_value) == (
        30,
        20,
        Decimal("2850.00"),
        Decimal("1850.00"),
    )


def test_a_run_is_one_lot_counted_in_exact_paise() -> None:
    closed = RunFills(
        "NSE:A", 3, [("BUY", "filled", Decimal("100.10"), "1"), ("TARGET", "filled", Decimal("100.30"), "2")]
    )
    pnl = run_pnl(closed, {"NSE:A": 1.0})
    assert pnl is not None and not pnl.open
    # 0.20 x 3 is 0.60 exactly (in floats 100.3 - 100.1 is 0.19999...).
    assert (pnl.bought_value, pnl.sold_value, pnl.realised, pnl.unrealised, pnl.last_price) == (
        Decimal("300.30"), Decimal("300.90"), Decimal("0.60"), Decimal("0"), None,
    )  # fmt: skip
    held = RunFills("NSE:A", 3, [("BUY", "filled", Decimal("100.10"), "1"), ("SELL", "rejected", None, None)])
    pnl = run_pnl(held, {"NSE:A": 99.95})
    assert pnl is not None and pnl.open
    assert (pnl.realised, pnl.unrealised, pnl.last_price) == (Decimal("0"), Decimal("-0.45"), Decimal("99.95"))
    assert run_pnl(RunFills("NSE:A", 3, [("BUY", "rejected", None, None)]), {}) is None


# ------------------------------------------------------------------------------------------ the limit's check


async def _engaged_with_one_running(
    db_engine: AsyncEngine, redis: Redis, clock: ManualClock, told: bool
) -> tuple[DailyLossLimits, RecordingPublisher, int]:
    """A trader whose kill switch is engaged today while a strategy still runs: what a worker that died between
    engaging the switch and stopping the strategies leaves behind."""
    publisher = RecordingPublisher()
    manager = manager_for(db_engine, redis, publisher, clock)
    strategy_id, user_id = await make_strategy(db_engine)
    await manager.start(strategy_id)
    today = manager.calendar.local(clock.now()).date()
    async with db_engine.begin() as conn:
        await conn.execute(update(User).where(User.id == user_id).values(kill_switch_day=today))
        if told:
            await conn.execute(Notification.__table__.insert().values(
                notification_id=DailyLossLimits._notice_id(user_id, today), user_id=user_id, kind="daily_loss_limit",
                title="Daily Loss Limit Reached", message="Today's loss 900.00 reached your limit 800.00",
                created_at=clock.now(),
            ))  # fmt: skip
    publisher.sent.clear()

    async def no_prices(keys: list[str]) -> dict[str, float]:
        return {}

    return DailyLossLimits(session_factory(db_engine), manager, publisher, no_prices), publisher, strategy_id


@pytest.mark.parametrize("told", [True, False], ids=["limit", "manual-switch"])
async def test_a_check_finishes_the_stops_of_a_day_engaged_but_cut_short(
    db_engine: AsyncEngine, redis: Redis, clock: ManualClock, told: bool
) -> None:
    limits, publisher, strategy_id = await _engaged_with_one_running(db_engine, redis, clock, told)

    assert len(await limits.check()) == 1

    async with db_engine.connect() as conn:
        status, reason = (
            await conn.execute(select(Strategy.status, Strategy.status_reason).where(Strategy.id == strategy_id))
        ).one()
    assert (status, reason) == ("stopped", "daily loss limit" if told else "kill switch")
    notices = [e for topic, _, e in publisher.sent if topic == "notifications"]
    assert [isinstance(n, UserNotification) and n.kind for n in notices] == (
        [NotificationKind.DAILY_LOSS_LIMIT] if told else []
    )
    # Finished: the next check has nothing left to do.
    assert await limits.check() == []

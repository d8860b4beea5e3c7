"""Strategies that run every NSE trading day, end to end through the REST API only, on a sped-up clock (a day in
about 20 s): each trading day's run starts by itself, an NSE holiday and a day the kill switch holds are skipped,
and the next trading day trades. Real Kafka, Redis, database, `algo worker` and `algo scheduler`; the simulator's
audit is the judge: the tag of every order it placed names the intent, and so the day and the run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import httpx
import pytest

from core.clock import ScaledClock, set_clock
from core.settings import Settings
from schemas.events import Action, broker_tag_for, intent_id_for
from tests.fixtures.api import IST
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_exits_e2e import status_of
from tests.streams.test_pipeline_e2e import eventually, placements, start

# 4,000 clock seconds a real second: a day goes by in about 22 s, a BUY at 09:20 and its SELL at 11:00 are 1.5 s
# apart. Holi, Tuesday 3 March 2026, is an NSE holiday (the `holidays` calendar the project uses).
SPEED = 4000.0
HOLI = date(2026, 3, 3)
BUY, SELL = "09:20", "11:00"


@pytest.fixture
def pinned_clock(request: pytest.FixtureRequest) -> Iterator[ScaledClock]:
    """A day and more before the first run's BUY: the services start meanwhile (Kafka first, if need be)."""
    clock = ScaledClock(start=request.param, speed=SPEED)
    set_clock(clock)
    try:
        yield clock
    finally:
        set_clock(None)


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    # Seconds of the clock are quarter-milliseconds here: a BUY handed over a few hundred real ms late is still
    # in its grace; the day's run may start from 06:20 and is looked for every 0.1 s (7 clock minutes).
    return api_settings.model_copy(update={
        "missed_buy_grace_seconds": 4 * 3600.0, "sell_overdue_seconds": 3600.0,
        "daily_start_lead_minutes": 180.0, "daily_run_check_seconds": 0.1,
    })  # fmt: skip


def day_of(clock: ScaledClock) -> date:
    return clock.now().astimezone(IST).date()


async def reach(clock: ScaledClock, day: date, hh: int, mm: int) -> None:
    """Time itself is what is awaited: the exchange clock reading `day` hh:mm."""
    await clock.sleep_until(datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST))


async def reconnect(client: httpx.AsyncClient, user: Any, simulator: Any) -> None:
    """The trader's morning login: yesterday's Kite session died at 06:00."""
    token = simulator.state.mint_request_token(user.broker.api_key)
    body = {"api_key": user.broker.api_key, "api_secret": user.broker.api_secret, "request_token": token}
    response = await client.post("/broker/connect", json=body, headers=user.headers)
    assert response.status_code == 200, response.text


def placed_tags(simulator: Any, api_key: str) -> list[tuple[str, str]]:
    return [(r.params["transaction_type"], r.params["tag"]) for r in placements(simulator, api_key)
            if r.outcome == "placed"]  # fmt: skip


def day_orders(sid: int, day: date, run: int) -> list[tuple[str, str]]:
    """The BUY and SELL of `run` on `day`, as their tags."""
    return [(side, broker_tag_for(intent_id_for(sid, day, run, Action(side)))) for side in ("BUY", "SELL")]


async def daily_strategy(client: httpx.AsyncClient, user: Any, make_strategy: Any, simulator: Any) -> int:
    simulator.state.set_price("NSE:INFY", 1500.0)
    body = await make_strategy(user, symbol="NSE:INFY", buy_time=BUY, sell_time=SELL, stop_loss=...,
                               stop_loss_points=50, repeat="daily")  # fmt: skip
    assert (body["repeat"], body["next_run_day"]) == ("daily", None)
    return int(body["strategy_id"])


async def run_done(client: httpx.AsyncClient, user: Any, sid: int, run: int, next_day: date) -> bool:
    status = await status_of(client, user, sid)
    return (status["run"], status["strategy_status"], status["next_run_day"]) == (
        run,
        "completed",
        next_day.isoformat(),
    )


@pytest.mark.slow  # a minute or so over three trading days: `make pytest-slow`, which CI runs
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the pipeline, not the database, under test
@pytest.mark.parametrize("pinned_clock", [datetime(2026, 2, 28, 18, 0, tzinfo=IST)], indirect=True)
async def test_a_daily_strategy_trades_monday_skips_the_holi_holiday_and_trades_wednesday(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    monday, wednesday = date(2026, 3, 2), date(2026, 3, 4)
    user = await make_user()
    sid = await daily_strategy(client, user, make_strategy, simulator)
    assert day_of(pinned_clock) < monday  # the weekend: the first run is Monday's
    await start(client, user, sid)
    status = await status_of(client, user, sid)
    assert (status["repeat"], status["trading_day"], status["next_run_day"]) == ("daily", "2026-03-02", "2026-03-04")

    await eventually(lambda: run_done(client, user, sid, 1, wednesday), 60, "Monday's run sold", pipeline)
    assert placed_tags(simulator, user.broker.api_key) == day_orders(sid, monday, 1)

    # Wednesday morning: the trader logs in again; the run starts by itself, a new run with its own intents.
    await reach(pinned_clock, wednesday, 6, 5)
    assert placed_tags(simulator, user.broker.api_key) == day_orders(sid, monday, 1)  # nothing on the holiday
    await reconnect(client, user, simulator)
    await eventually(lambda: run_done(client, user, sid, 2, date(2026, 3, 5)), 60, "Wednesday's run sold", pipeline)
    assert placed_tags(simulator, user.broker.api_key) == day_orders(sid, monday, 1) + day_orders(sid, wednesday, 2)
    assert HOLI.isoformat() not in str((await client.get(f"/strategy/{sid}/orders", headers=user.headers)).json())

    # The trader's STOP ends the repetition: Thursday has no run.
    stopped = await client.post(f"/strategy/{sid}/stop", headers=user.headers)
    assert stopped.status_code == 200 and stopped.json()["already_stopped"] is False, stopped.text
    detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
    assert (detail["status"], detail["next_run_day"], detail["run"]) == ("stopped", None, 2)
    await reach(pinned_clock, date(2026, 3, 5), 9, 30)
    assert len(placed_tags(simulator, user.broker.api_key)) == 4


@pytest.mark.slow  # a minute or so: `make pytest-slow`, which CI runs
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("pinned_clock", [datetime(2026, 3, 2, 18, 0, tzinfo=IST)], indirect=True)
async def test_a_day_the_kill_switch_holds_is_skipped_with_a_notice_and_the_next_trading_day_trades(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    wednesday, thursday, friday = date(2026, 3, 4), date(2026, 3, 5), date(2026, 3, 6)
    user = await make_user()
    sid = await daily_strategy(client, user, make_strategy, simulator)
    assert day_of(pinned_clock) < wednesday  # Monday evening or the holiday: the first run is Wednesday's
    await start(client, user, sid)
    await eventually(lambda: run_done(client, user, sid, 1, thursday), 60, "Wednesday's run sold", pipeline)

    # Thursday, before the day's run may start: the trader engages the kill switch (and does not log in).
    await reach(pinned_clock, thursday, 1, 0)
    engaged = await client.post("/kill-switch", headers=user.headers)
    assert engaged.status_code == 200 and engaged.json()["trading_day"] == thursday.isoformat(), engaged.text

    async def told() -> list[dict[str, Any]]:
        notices = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
        return [n for n in notices if n["kind"] == "daily_run_skipped" and n["strategy_id"] == sid]

    [notice] = await eventually(told, 60, "the trader told Thursday is skipped", pipeline)
    assert "2026-03-05" in notice["message"] and "kill switch" in notice["message"], notice
    status = await status_of(client, user, sid)
    assert (status["run"], status["next_run_day"]) == (1, friday.isoformat())

    await reach(pinned_clock, friday, 6, 5)
    await reconnect(client, user, simulator)
    await eventually(lambda: run_done(client, user, sid, 2, date(2026, 3, 9)), 60, "Friday's run sold", pipeline)
    assert placed_tags(simulator, user.broker.api_key) == day_orders(sid, wednesday, 1) + day_orders(sid, friday, 2)
    assert len(await told()) == 1
    await client.post(f"/strategy/{sid}/stop", headers=user.headers)

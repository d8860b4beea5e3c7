"""Creating, starting and stopping a daily strategy through the API: the `repeat` field validated like the others,
the next run day in the status and the strategy, and a trader's STOP ending the repetition."""

from __future__ import annotations

import httpx

from tests.fixtures.api import MakeStrategy, MakeUser
from tests.fixtures.factories import strategy_body

DAILY_REFUSALS = [
    ({"repeat": "weekly"}, "repeat", "'once' or 'daily'"),
    ({"repeat": "daily"}, "stop_loss", "a daily strategy takes stop_loss_points or stop_loss_percent"),
    ({"repeat": "daily", "stop_loss": ..., "stop_loss_points": 10, "target": 1600},
     "target", "a daily strategy takes target_points or target_percent"),
]  # fmt: skip


async def test_create_refuses_a_bad_repeat_and_fixed_prices_for_a_daily_strategy(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    once = await make_strategy(user)  # connects the broker; repeat defaults to once
    assert (once["repeat"], once["next_run_day"]) == ("once", None)
    for overrides, field, words in DAILY_REFUSALS:
        response = await client.post("/strategy/create", json=strategy_body(**overrides), headers=user.headers)
        assert response.status_code == 422, (overrides, response.text)
        problems = response.json()["detail"]
        assert any(p["field"] == field and words in p["message"] for p in problems), (overrides, problems)


async def test_a_daily_strategy_shows_its_next_run_day_until_the_trader_stops_it(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    # Wednesday 15 January 2025, 10:00: today's run, then Thursday's.
    created = await make_strategy(user, stop_loss=..., stop_loss_percent="1", repeat="daily", buy_time="10:30")
    sid = created["strategy_id"]
    assert created["repeat"] == "daily"
    started = await client.post(f"/strategy/{sid}/start", headers=user.headers)
    assert started.status_code == 200 and started.json()["trading_day"] == "2025-01-15", started.text
    status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
    assert (status["repeat"], status["trading_day"], status["next_run_day"]) == ("daily", "2025-01-15", "2025-01-16")
    detail = (await client.get(f"/strategy/{sid}", headers=user.headers)).json()
    assert detail["next_run_day"] == "2025-01-16"

    stopped = await client.post(f"/strategy/{sid}/stop", headers=user.headers)
    assert stopped.status_code == 200, stopped.text
    status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
    assert (status["strategy_status"], status["next_run_day"], status["repeat"]) == ("stopped", None, "daily")

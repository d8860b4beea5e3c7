"""Kite's per-day cap on a trader's order calls, through the whole pipeline: a day whose budget runs out (here
eaten by retries of failed BUYs) skips the BUY that no longer fits and still places every exit.

The broker (simulator) answers the call past its day cap with a 429 that would stay until the next day; the
product keeps `BROKER_EXIT_RESERVE` of the day for exits, so no exit ever meets it. Judged by the simulator's
audit: no 429, every filled BUY has exactly one filled exit, and no more order calls than the day allows.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.clock import ScaledClock
from core.settings import Settings
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import clock_time, eventually, start
from tests.streams.test_resting_orders_e2e import trade

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

DAY_CAP = 10
EXIT_RESERVE = 4  # BUYs may use 6 of the day's 10 calls
STRATEGIES = 4  # a BUY and an exit each: 8 fit the day at START
FAILED_BUYS = 4  # answered 503 and retried: 4 + 4 BUY calls and 4 exits would be 12


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"broker_orders_per_day": DAY_CAP, "broker_exit_reserve": EXIT_RESERVE})


async def test_a_day_out_of_budget_skips_the_buy_that_no_longer_fits_and_still_places_every_exit(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, connect_broker: Any,
) -> None:  # fmt: skip
    simulator.state.config.orders_per_day = DAY_CAP
    simulator.state.set_price("NSE:INFY", 1500.0)
    user = await make_user()
    creds = await connect_broker(user)
    buy_time, _ = clock_time(pinned_clock, 6)
    sell_time, _ = clock_time(pinned_clock, 600)
    ids = []
    for _ in range(STRATEGIES):
        body = await make_strategy(user, buy_time=buy_time, sell_time=sell_time, stop_loss=1400.0, quantity=1)
        ids.append(int(body["strategy_id"]))
    # Four BUY calls fail before the broker reads them: their retries spend the day's budget.
    simulator.state.inject_fault("error", api_key=creds.api_key, scope="orders", count=FAILED_BUYS, status=503)
    for sid in ids:
        await start(client, user, sid)

    def orders(side: str, status: str = "COMPLETE") -> list[Any]:
        return [
            o for o in simulator.state.find_orders(creds.api_key) if o.transaction_type == side and o.status == status
        ]

    async def skipped() -> list[dict[str, Any]]:
        notes = (await client.get("/notifications", headers=user.headers)).json()["notifications"]
        return [n for n in notes if n["title"] == "BUY skipped"]

    notices = await eventually(skipped, 60, "a BUY skipped for the day's budget", pipeline)
    assert "keeps its last orders for exits" in notices[0]["message"]
    bought = STRATEGIES - len(notices)
    assert bought >= 1
    await eventually(lambda: len(orders("BUY")) == bought, 60, f"{bought} BUYs filled", pipeline)
    await trade(simulator, pipeline, pinned_clock, "NSE:INFY", 1390.0)  # one tick through every stop
    await eventually(lambda: len(orders("SELL")) == bought, 60, "every position's stop exit filled", pipeline)

    records = simulator.state.audit_records(api_key=creds.api_key)
    assert [r for r in records if r.http_status == 429] == []
    calls = [r for r in records if r.action in ("place", "modify", "cancel")]
    assert len(calls) <= DAY_CAP
    sells = [r for r in calls if r.params.get("transaction_type") == "SELL"]
    assert len(sells) == bought and len({r.tag for r in sells}) == bought  # one exit per position, each placed once
    skipped_ids = {n["strategy_id"] for n in notices}
    for sid in skipped_ids:
        status = (await client.get(f"/strategy/status/{sid}", headers=user.headers)).json()
        assert status["strategy_status"] == "stopped"

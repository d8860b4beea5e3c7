"""START is refused when the day's orders cannot fit the broker's daily limit (Kite: 5,000 a day per api_key):
a run that starts must be able to exit."""

from __future__ import annotations

import httpx
import pytest

from core.settings import Settings
from tests.fixtures.api import MakeStrategy, MakeUser

ORDERS_PER_DAY = 5  # room for two runs of a BUY and an exit each, not for a third


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"broker_orders_per_day": ORDERS_PER_DAY})


async def test_a_start_the_days_orders_cannot_fit_is_refused_with_the_reason(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    first, second, third = [await make_strategy(user) for _ in range(3)]
    for strategy in (first, second):
        response = await client.post("/strategy/start", json={"strategy_id": strategy["strategy_id"]},
                                     headers=user.headers)  # fmt: skip
        assert response.status_code == 200, response.text
    refused = await client.post("/strategy/start", json={"strategy_id": third["strategy_id"]}, headers=user.headers)
    assert refused.status_code == 409
    assert f"limit of {ORDERS_PER_DAY} a day" in refused.text and "START refused" in refused.text
    status = await client.get(f"/strategy/status/{third['strategy_id']}", headers=user.headers)
    assert status.json().get("status") != "running"
    other = await make_user()  # another trader's day is their own
    theirs = await make_strategy(other)
    started = await client.post("/strategy/start", json={"strategy_id": theirs["strategy_id"]}, headers=other.headers)
    assert started.status_code == 200, started.text

"""The re-entry fields of POST /strategy/create: stored and returned, or refused with 422 naming the field."""

from __future__ import annotations

from typing import Any

import httpx

from tests.fixtures.api import MakeStrategy, MakeUser
from tests.fixtures.factories import strategy_body

REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"reentry_max": -1}, "reentry_max", "greater than or equal to 0"),
    ({"reentry_max": 11}, "reentry_max", "less than or equal to 10"),
    ({"reentry_max": "twice"}, "reentry_max", "integer"),
    ({"reentry_mode": "later"}, "reentry_mode", "immediate"),
    ({"reentry_until": "15:15"}, "reentry_until", "before sell_time"),
    ({"reentry_until": "15:30"}, "reentry_until", "before sell_time"),
    ({"reentry_until": "10:30"}, "reentry_until", "after buy_time"),
    ({"reentry_until": "10:00"}, "reentry_until", "after buy_time"),
    ({"reentry_until": "2pm"}, "reentry_until", "HH:MM"),
]


async def test_create_refuses_bad_re_entry_fields_naming_them(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    await make_strategy(user)  # connects the broker
    for overrides, field, words in REFUSALS:
        body = strategy_body(buy_time="10:30", sell_time="15:15", **overrides)
        response = await client.post("/strategy/create", json=body, headers=user.headers)
        assert response.status_code == 422, (overrides, response.text)
        problems = response.json()["detail"]
        assert any(p["field"] == field and words in p["message"] for p in problems), (overrides, problems)
        assert "Traceback" not in response.text


async def test_re_entry_fields_are_stored_and_returned(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    plain = await make_strategy(user)
    assert (plain["reentry_max"], plain["reentry_until"], plain["reentry_mode"]) == (0, None, "immediate")
    made = await make_strategy(user, reentry_max=2, reentry_until="14:00", reentry_mode="at_entry")
    detail = (await client.get(f"/strategy/{made['strategy_id']}", headers=user.headers)).json()
    for body in (made, detail):
        assert (body["reentry_max"], body["reentry_until"], body["reentry_mode"]) == (2, "14:00:00", "at_entry")

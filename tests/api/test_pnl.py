"""The P&L view through the API: rows per strategy per day from the order log's fills, unrealised at the last
price the workers wrote to Redis. Real database (both kinds), Redis and the Kite simulator; the fills stand in
for the execution engine here (tests/streams/test_pnl_e2e.py has them come from the simulator)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ScaledClock
from storage.models import Strategy
from storage.runtime import RuntimeStore
from tests.api.test_strategy_edits import insert_fill
from tests.fixtures.api import MakeStrategy, MakeUser


async def set_run(engine: AsyncEngine, sid: int, run: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Strategy).where(Strategy.id == sid).values(run=run))


async def test_a_day_has_a_row_per_strategy_with_realised_unrealised_and_a_total(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, db_engine: AsyncEngine,
    redis: Any, pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user, other = await make_user(), await make_user()
    closed = (await make_strategy(user, quantity=10))["strategy_id"]
    held = (await make_strategy(user, symbol="NSE:TCS", stop_loss=3000, quantity=3))["strategy_id"]
    unpriced = (await make_strategy(user, symbol="NSE:SBIN", stop_loss=500, quantity=4))["strategy_id"]
    theirs = (await make_strategy(other))["strategy_id"]
    # `closed` traded twice (two runs): +12.50 then -3.00. `held` bought 3 at 3400.10, priced at 3390.05 now.
    await insert_fill(db_engine, pinned_clock, closed, user.id, 1, "BUY", "1500.10")
    await insert_fill(db_engine, pinned_clock, closed, user.id, 1, "SELL", "1501.35")
    await insert_fill(db_engine, pinned_clock, closed, user.id, 2, "BUY", "1502.00")
    await insert_fill(db_engine, pinned_clock, closed, user.id, 2, "STOPLOSS", "1501.70")
    await insert_fill(db_engine, pinned_clock, held, user.id, 1, "BUY", "3400.10", quantity=3)
    await insert_fill(db_engine, pinned_clock, unpriced, user.id, 1, "BUY", "600.00", quantity=4)
    await insert_fill(db_engine, pinned_clock, theirs, other.id, 1, "BUY", "1000.00")
    await insert_fill(db_engine, pinned_clock, theirs, other.id, 1, "SELL", "2000.00")
    await RuntimeStore(redis).set_last_prices({"NSE:TCS": 3390.05, "NSE:INFY": 1.0})

    response = await client.get("/pnl?day=2025-01-15", headers=user.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    rows = {row["strategy_id"]: row for row in body["strategies"]}
    assert list(rows) == [closed, held, unpriced]  # not the other trader's
    assert rows[closed] == {
        "strategy_id": closed, "symbol": "NSE:INFY", "day": "2025-01-15", "runs": 2, "bought_quantity": 20,
        "sold_quantity": 20, "open_quantity": 0, "average_buy_price": "1501.05", "average_sell_price": "1501.53",
        "last_price": None, "realised": "9.50", "unrealised": "0.00", "total": "9.50",
    }  # fmt: skip
    assert (rows[held]["open_quantity"], rows[held]["last_price"], rows[held]["unrealised"]) == (3, "3390.05", "-30.15")
    # No price known yet for SBIN: held, counted at 0 rather than guessed.
    assert (rows[unpriced]["open_quantity"], rows[unpriced]["last_price"], rows[unpriced]["unrealised"]) == (
        4, None, "0.00",
    )  # fmt: skip
    assert (body["realised"], body["unrealised"], body["total"]) == ("9.50", "-30.15", "-20.65")
    assert (await client.get("/pnl", headers=user.headers)).json() == body  # today by default

    empty = (await client.get("/pnl?day=2025-01-14", headers=user.headers)).json()
    assert (empty["strategies"], empty["total"]) == ([], "0.00")


async def test_a_strategy_has_a_row_per_day_it_traded_and_an_edit_does_not_rewrite_history(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, db_engine: AsyncEngine,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    sid = (await make_strategy(user, quantity=10))["strategy_id"]
    yesterday = ScaledClock(start=pinned_clock.now() - timedelta(days=1))
    await insert_fill(db_engine, yesterday, sid, user.id, 1, "BUY", "100.00")
    await insert_fill(db_engine, yesterday, sid, user.id, 1, "SELL", "99.00")
    await set_run(db_engine, sid, 1)
    edited = await client.patch(f"/strategy/{sid}", json={"quantity": 50}, headers=user.headers)
    assert edited.status_code == 200, edited.text
    await insert_fill(db_engine, pinned_clock, sid, user.id, 2, "BUY", "101.00", quantity=50)
    await insert_fill(db_engine, pinned_clock, sid, user.id, 2, "TARGET", "101.20", quantity=50)

    body = (await client.get(f"/strategy/{sid}/pnl?from=2025-01-01&to=2025-01-15", headers=user.headers)).json()
    assert [(d["day"], d["bought_quantity"], d["realised"]) for d in body["days"]] == [
        ("2025-01-14", 10, "-10.00"),  # the quantity it was bought with, not the edited one
        ("2025-01-15", 50, "10.00"),
    ]
    assert (body["from_day"], body["to_day"], body["total"]) == ("2025-01-01", "2025-01-15", "0.00")
    one_day = (await client.get(f"/strategy/{sid}/pnl?from=2025-01-14&to=2025-01-14", headers=user.headers)).json()
    assert [d["day"] for d in one_day["days"]] == ["2025-01-14"]
    by_default = (await client.get(f"/strategy/{sid}/pnl", headers=user.headers)).json()
    assert (by_default["from_day"], by_default["to_day"], by_default["total"]) == ("2024-12-17", "2025-01-15", "0.00")


async def test_bad_days_are_refused_naming_the_parameter(client: httpx.AsyncClient, make_user: MakeUser,
                                                         make_strategy: MakeStrategy) -> None:  # fmt: skip
    user = await make_user()
    sid = (await make_strategy(user))["strategy_id"]
    for path, field, words in [
        ("/pnl?day=2025-13-01", "day", "date"),
        ("/pnl?day=yesterday", "day", "date"),
        (f"/strategy/{sid}/pnl?from=2025-01-15&to=2025-01-14", "from", "on or before to"),
        (f"/strategy/{sid}/pnl?from=2024-01-01&to=2025-01-14", "from", "at most 366 days"),
        (f"/strategy/{sid}/pnl?to=2025-02-30", "to", "date"),
    ]:
        response = await client.get(path, headers=user.headers)
        assert response.status_code == 422, (path, response.text)
        [problem] = response.json()["detail"]
        assert problem["field"] == field and words in problem["message"], (path, problem)
    assert (await client.get("/pnl")).status_code == 401

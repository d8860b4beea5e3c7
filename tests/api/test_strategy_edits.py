"""Editing (PATCH) and archiving a strategy through the API, against real Redis, Kafka, database and the Kite
simulator."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clock import ScaledClock
from storage.models import OrderLog, StrategyStatusChange
from storage.runtime import runtime_key, strategy_key
from tests.fixtures.api import ApiUser, MakeStrategy, MakeUser


async def patch(client: httpx.AsyncClient, user: ApiUser, sid: int, body: Any) -> httpx.Response:
    return await client.patch(f"/strategy/{sid}", json=body, headers=user.headers)


async def insert_fill(
    engine: AsyncEngine, clock: ScaledClock, sid: int, user_id: int, run: int, action: str, price: str,
    quantity: int = 10,
) -> None:  # fmt: skip
    """A filled order's result row, as the execution engine writes it (stood in for where the test is the API)."""
    async with engine.begin() as conn:
        await conn.execute(
            OrderLog.__table__.insert().values(
                intent_id=f"{sid}:2025-01-15:{run}:{action}", strategy_id=sid, user_id=user_id, run=run,
                action=action, kind="result", attempt=0, status="filled", broker_tag=f"t{sid}{action[:4]}",
                broker_order_id=f"{sid}{run}{action}", price=Decimal(price), quantity=quantity, message=None,
                created_at=clock.now(),
            )
        )  # fmt: skip


async def history_count(engine: AsyncEngine, sid: int) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(StrategyStatusChange).where(StrategyStatusChange.strategy_id == sid)
        return int((await conn.execute(query)).scalar_one())


async def test_an_edit_changes_what_it_names_keeps_the_rest_and_the_next_start_uses_it(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, redis: Redis, db_engine: AsyncEngine
) -> None:
    user = await make_user()
    created = await make_strategy(user, quantity=10, stop_loss=1400.05, target=1600)
    sid = created["strategy_id"]
    await client.post(f"/strategy/{sid}/start", headers=user.headers)
    await client.post(f"/strategy/{sid}/stop", headers=user.headers)
    events_before = await history_count(db_engine, sid)

    # A stop in percent replaces the stop price (one group, one form); null clears the target.
    response = await patch(client, user, sid, {"quantity": 20, "stop_loss_percent": "1.5", "target": None})
    assert response.status_code == 200, response.text
    edited = response.json()
    assert (edited["strategy_id"], edited["run"], edited["status"]) == (sid, 1, "stopped")
    assert (edited["quantity"], edited["stop_loss"], Decimal(edited["stop_loss_percent"]), edited["target"]) == (
        20, None, Decimal("1.5"), None,
    )  # fmt: skip
    unchanged = ("symbol", "buy_time", "sell_time", "product", "created_at", "instrument_token")
    assert {k: edited[k] for k in unchanged} == {k: created[k] for k in unchanged}
    assert (await client.get(f"/strategy/{sid}", headers=user.headers)).json() == edited
    assert await history_count(db_engine, sid) == events_before

    # Another instrument, by symbol: exchange, tradingsymbol and token follow.
    moved = (await patch(client, user, sid, {"symbol": "BSE:TCS", "stop_loss": 3000})).json()
    assert (moved["symbol"], moved["exchange"], moved["tradingsymbol"]) == ("BSE:TCS", "BSE", "TCS")
    assert moved["instrument_token"] != created["instrument_token"]
    assert (Decimal(moved["stop_loss"]), moved["stop_loss_percent"]) == (Decimal(3000), None)

    started = (await client.post(f"/strategy/{sid}/start", headers=user.headers)).json()
    assert started["run"] == 2
    spec = await redis.hgetall(strategy_key(sid))
    assert (spec["instrument"], spec["quantity"], spec["stop_loss"]) == ("BSE:TCS", "20", "3000.00")


EDIT_REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"quantity": 0}, "quantity", "greater than 0"),
    ({"quantity": "ten"}, "quantity", "integer"),
    ({"buy_time": "9:30"}, "buy_time", "HH:MM"),
    ({"buy_time": "09:00"}, "buy_time", "market hours 09:15-15:30"),
    ({"buy_time": "15:16"}, "sell_time", "after buy_time"),  # against the stored sell_time 15:15
    ({"sell_time": "15:25"}, "sell_time", "MIS square-off at 15:20"),
    ({"stop_loss": 100.03}, "stop_loss", "0.05 tick"),
    ({"stop_loss": None}, "stop_loss", "required"),
    ({"stop_loss": 1600}, "stop_loss", "must be below the last price 1"),  # the market moves from 1,500
    ({"target": 1450}, "target", "must be above the last price 1"),
    ({"trail_activation_points": 5}, "trail_activation_points", "needs a trailing stop"),
    ({"symbol": "NSE:NOSUCHSYMBOL"}, "symbol", "unknown instrument"),
    ({"symbol": "INFY"}, "symbol", "EXCHANGE:TRADINGSYMBOL"),
    ({"product": "BO"}, "product", "MIS"),
    ({"strategy_id": 5}, "strategy_id", "not allowed"),
    ({"unexpected": 1}, "unexpected", "not allowed"),
    ({}, "body", "at least one field"),
]


async def test_an_edit_is_refused_exactly_as_a_create_would_be(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, simulator: Any
) -> None:
    simulator.state.set_price("NSE:INFY", 1500.0)
    user = await make_user()
    created = await make_strategy(user, buy_time="10:30", sell_time="15:15", stop_loss=1400.05)
    sid = created["strategy_id"]
    for change, field, words in EDIT_REFUSALS:
        response = await patch(client, user, sid, change)
        assert response.status_code == 422, (change, response.text)
        problems = response.json()["detail"]
        assert any(p["field"] == field and words in p["message"] for p in problems), (change, problems)
    not_an_object = await patch(client, user, sid, [1, 2])
    assert not_an_object.status_code == 422
    assert (await client.get(f"/strategy/{sid}", headers=user.headers)).json() == created  # nothing stored


async def test_a_running_strategy_is_not_edited_or_archived_and_another_traders_is_not_found(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    owner, other = await make_user(), await make_user()
    created = await make_strategy(owner)
    sid = created["strategy_id"]
    await client.post(f"/strategy/{sid}/start", headers=owner.headers)
    for response in (
        await patch(client, owner, sid, {"quantity": 5}),
        await client.post(f"/strategy/{sid}/archive", headers=owner.headers),
    ):
        assert response.status_code == 409, response.text
        assert f"stop it first (POST /strategy/{sid}/stop)" in response.json()["detail"]
    assert (await client.get(f"/strategy/{sid}", headers=owner.headers)).json()["quantity"] == created["quantity"]

    await client.post(f"/strategy/{sid}/stop", headers=owner.headers)
    await make_strategy(other)  # a broker of their own: the 404 is about ownership, not a missing connection
    for response in (
        await patch(client, other, sid, {"quantity": 5}),
        await client.post(f"/strategy/{sid}/archive", headers=other.headers),
        await client.post(f"/strategy/{sid}/unarchive", headers=other.headers),
        await client.get(f"/strategy/{sid}/pnl", headers=other.headers),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == "strategy not found"
    assert (await patch(client, owner, sid, {"quantity": 5})).json()["quantity"] == 5


async def test_an_archived_strategy_is_hidden_never_started_and_keeps_its_orders(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, db_engine: AsyncEngine,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    kept = await make_strategy(user)
    archived = await make_strategy(user, symbol="NSE:TCS", stop_loss=3000)
    sid = archived["strategy_id"]
    await client.post(f"/strategy/{sid}/start", headers=user.headers)
    await insert_fill(db_engine, pinned_clock, sid, user.id, 1, "BUY", "3400.00")
    await insert_fill(db_engine, pinned_clock, sid, user.id, 1, "SELL", "3412.50")
    await client.post(f"/strategy/{sid}/stop", headers=user.headers)

    response = await client.post(f"/strategy/{sid}/archive", headers=user.headers)
    assert response.status_code == 200, response.text
    assert response.json()["archived_at"] is not None
    again = await client.post(f"/strategy/{sid}/archive", headers=user.headers)  # idempotent
    assert again.json()["archived_at"] == response.json()["archived_at"]

    listed = (await client.get("/strategies", headers=user.headers)).json()["strategies"]
    assert [s["strategy_id"] for s in listed] == [kept["strategy_id"]]
    everything = (await client.get("/strategies?include_archived=true", headers=user.headers)).json()["strategies"]
    assert [s["strategy_id"] for s in everything] == [sid, kept["strategy_id"]]

    for refused in (
        await client.post(f"/strategy/{sid}/start", headers=user.headers),
        await client.post("/strategy/start", json={"strategy_id": sid}, headers=user.headers),
        await patch(client, user, sid, {"quantity": 1}),
    ):
        assert refused.status_code == 409, refused.text
        assert f"archived; unarchive it first (POST /strategy/{sid}/unarchive)" in refused.json()["detail"]

    orders = (await client.get(f"/strategy/{sid}/orders", headers=user.headers)).json()["orders"]
    assert [(o["action"], o["status"]) for o in orders] == [("BUY", "filled"), ("SELL", "filled")]
    assert (await client.get(f"/strategy/{sid}", headers=user.headers)).status_code == 200
    pnl = (await client.get(f"/strategy/{sid}/pnl", headers=user.headers)).json()
    assert Decimal(pnl["realised"]) == Decimal("125.00")  # (3412.50 - 3400.00) x 10

    restored = await client.post(f"/strategy/{sid}/unarchive", headers=user.headers)
    assert restored.json()["archived_at"] is None
    assert len((await client.get("/strategies", headers=user.headers)).json()["strategies"]) == 2
    restarted = await client.post(f"/strategy/{sid}/start", headers=user.headers)
    assert (restarted.status_code, restarted.json()["run"]) == (200, 2)


async def test_what_places_orders_stays_until_the_last_runs_orders_are_settled(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, redis: Redis,
    db_engine: AsyncEngine, pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    """The engine places a run's EXIT with the strategy's stored instrument, quantity and product: an edit of them
    while that EXIT is on its way would sell something else."""
    user = await make_user()
    sid = (await make_strategy(user, quantity=10))["strategy_id"]
    await client.post(f"/strategy/{sid}/start", headers=user.headers)
    await insert_fill(db_engine, pinned_clock, sid, user.id, 1, "BUY", "1500.00")
    await redis.hset(runtime_key(sid), mapping={"state": "bought", "position": "bought", "last_action": "BUY"})
    assert (await client.post(f"/strategy/{sid}/stop", headers=user.headers)).json()["squared_off"] is True

    for change, field in [({"quantity": 11}, "quantity"), ({"symbol": "NSE:TCS", "stop_loss": 3000}, "symbol"),
                          ({"product": "CNC"}, "product")]:  # fmt: skip
        refused = await patch(client, user, sid, change)
        assert refused.status_code == 409, refused.text
        [problem] = refused.json()["detail"]
        assert problem["field"] == field and "run 1's EXIT order is not settled yet" in problem["message"], problem
    # What the engine does not read may change meanwhile.
    assert (await patch(client, user, sid, {"stop_loss": 1450})).status_code == 200

    await insert_fill(db_engine, pinned_clock, sid, user.id, 1, "EXIT", "1490.00")
    edited = await patch(client, user, sid, {"quantity": 11})
    assert (edited.status_code, edited.json()["quantity"]) == (200, 11)


async def test_a_position_kept_at_stop_keeps_its_instrument(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, db_engine: AsyncEngine,
    pinned_clock: ScaledClock,
) -> None:  # fmt: skip
    user = await make_user()
    sid = (await make_strategy(user, quantity=10))["strategy_id"]
    await client.post(f"/strategy/{sid}/start", headers=user.headers)
    await insert_fill(db_engine, pinned_clock, sid, user.id, 1, "BUY", "1500.00")
    await client.post(f"/strategy/{sid}/stop", json={"square_off": False}, headers=user.headers)
    refused = await patch(client, user, sid, {"symbol": "NSE:TCS", "stop_loss": 3000})
    assert refused.status_code == 409, refused.text
    [problem] = refused.json()["detail"]
    assert problem["field"] == "symbol" and "run 1 still holds 10 NSE:INFY" in problem["message"], problem

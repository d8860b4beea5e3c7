"""Sequence 11: every read and write is scoped to the token's user. Another user's strategy is
indistinguishable from one that does not exist, on every endpoint, running or not."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.models import Notification
from storage.runtime import runtime_key
from tests.fixtures.api import MakeStrategy, MakeUser

MISSING_ID = 987_654_321


def strategy_calls(strategy_id: int) -> list[tuple[str, str, dict[str, object] | None]]:
    return [
        ("GET", f"/strategy/status/{strategy_id}", None),
        ("GET", f"/strategy/{strategy_id}", None),
        ("GET", f"/strategy/{strategy_id}/orders", None),
        ("POST", f"/strategy/{strategy_id}/start", None),
        ("POST", "/strategy/start", {"strategy_id": strategy_id}),
        ("POST", f"/strategy/{strategy_id}/stop", None),
        ("POST", "/strategy/stop", {"strategy_id": strategy_id}),
        ("POST", "/strategy/stop", {"strategy_id": strategy_id, "square_off": False}),
    ]


def _shape(response: httpx.Response) -> tuple[int, object]:
    return response.status_code, response.json()["detail"]


async def test_other_users_strategies_are_404_like_missing_ones(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy, redis: Redis, db_engine: AsyncEngine
) -> None:
    alice, bob = await make_user(), await make_user()
    alice_running = (await make_strategy(alice))["strategy_id"]
    alice_idle = (await make_strategy(alice, symbol="NSE:TCS", stop_loss=3000))["strategy_id"]
    bob_own = (await make_strategy(bob, symbol="NSE:SBIN", stop_loss=700))["strategy_id"]
    assert (await client.post(f"/strategy/{alice_running}/start", headers=alice.headers)).status_code == 200
    await redis.hset(runtime_key(alice_running), mapping={"state": "bought"})  # a stop would square off

    for target in (alice_running, alice_idle):
        for method, path, body in strategy_calls(target):
            foreign = await client.request(method, path, json=body, headers=bob.headers)
            missing_path = path.replace(str(target), str(MISSING_ID))
            missing_body = {**body, "strategy_id": MISSING_ID} if body else None
            missing = await client.request(method, missing_path, json=missing_body, headers=bob.headers)
            assert _shape(foreign) == _shape(missing) == (404, "strategy not found"), (method, path)

    # Bob's attempts changed nothing of Alice's.
    status = (await client.get(f"/strategy/status/{alice_running}", headers=alice.headers)).json()
    assert (status["strategy_status"], status["state"], status["run"]) == ("running", "bought", 1)
    idle = (await client.get(f"/strategy/{alice_idle}", headers=alice.headers)).json()
    assert (idle["status"], idle["run"]) == ("created", 0)

    # Lists hold only one's own.
    alice_list = {
        s["strategy_id"] for s in (await client.get("/strategies", headers=alice.headers)).json()["strategies"]
    }
    bob_list = {s["strategy_id"] for s in (await client.get("/strategies", headers=bob.headers)).json()["strategies"]}
    assert alice_list == {alice_running, alice_idle}
    assert bob_list == {bob_own}

    # Each sees their own broker account.
    alice_broker = (await client.get("/broker/status", headers=alice.headers)).json()
    bob_broker = (await client.get("/broker/status", headers=bob.headers)).json()
    assert alice_broker["broker_user_id"] == alice.broker.user_id
    assert bob_broker["broker_user_id"] == bob.broker.user_id != alice.broker.user_id

    async with db_engine.begin() as conn:
        await conn.execute(
            Notification.__table__.insert().values(
                notification_id="alice-1", user_id=alice.id, strategy_id=alice_running, kind="order_filled",
                title="Filled", message="BUY filled", created_at=datetime.now(UTC),
            )
        )  # fmt: skip
    assert len((await client.get("/notifications", headers=alice.headers)).json()["notifications"]) == 1
    assert (await client.get("/notifications", headers=bob.headers)).json()["notifications"] == []

    # Bob's own strategy works for Bob while Alice's runs: independent runtimes.
    assert (await client.post(f"/strategy/{bob_own}/start", headers=bob.headers)).json()["run"] == 1
    assert (await client.get(f"/strategy/status/{bob_own}", headers=bob.headers)).json()["state"] == "idle"
    assert (await client.get(f"/strategy/status/{bob_own}", headers=alice.headers)).status_code == 404

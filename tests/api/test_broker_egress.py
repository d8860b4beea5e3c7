"""A broker connection's egress: checked through a real proxy before saving, stored encrypted, shown without
credentials, and required for START where the deployment says so."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount
from tests.fixtures.api import ConnectBroker, MakeStrategy, MakeUser, SimulatorLike
from tests.fixtures.factories import api_key
from tests.fixtures.proxies import StartProxies


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"require_egress": True})


async def _connect_body(simulator: SimulatorLike, egress: str) -> dict[str, str]:
    creds = simulator.state.create_account(api_key=api_key())
    return {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": creds.access_token,
            "egress": egress}  # fmt: skip


async def test_connect_with_egress_stores_it_encrypted_and_shows_no_credentials(
    client: httpx.AsyncClient, make_user: MakeUser, connect_broker: ConnectBroker, egress_proxies: StartProxies,
    db_engine: AsyncEngine, api_settings: Settings,
) -> None:  # fmt: skip
    (proxy,) = egress_proxies(1)
    user = await make_user()
    # tinyproxy here asks for no credentials: a proxy ignores the ones it does not ask for, and they must
    # still be kept secret.
    with_credentials = f"http://egressuser7:Xq%40zz-9w@{proxy.listen}:{proxy.port}"
    await connect_broker(user, egress=with_credentials)

    status = await client.get("/broker/status", headers=user.headers)
    assert status.json()["egress"] == f"http://{proxy.listen}:{proxy.port}"
    assert "Xq%40zz" not in status.text and "egressuser7" not in status.text
    async with db_engine.connect() as conn:
        stored = (await conn.execute(select(BrokerAccount.egress_url_encrypted, BrokerAccount.egress_display))).one()
    assert b"Xq%40zz" not in stored[0] and b"egressuser7" not in stored[0]
    assert SecretBox(api_settings).decrypt(stored[0]) == with_credentials
    assert stored[1] == f"http://{proxy.listen}:{proxy.port}"

    # The morning's reconnect need not repeat the egress: it stays; an empty one removes it.
    creds = user.broker
    reconnect = {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": creds.access_token}
    assert (await client.post("/broker/connect", json=reconnect, headers=user.headers)).json()["egress"] is not None
    removed = await client.post("/broker/connect", json={**reconnect, "egress": ""}, headers=user.headers)
    assert removed.status_code == 200 and removed.json()["egress"] is None


@pytest.mark.parametrize(
    ("egress", "reason"),
    [
        ("ftp://127.0.0.2:21", "scheme must be one of"),
        ("http://127.0.0.2", "port is missing"),
        ("socks5://:1080", "host is missing"),
        ("http://127.0.0.2:3128/path", "no path"),
    ],
)
async def test_malformed_egress_is_422_naming_the_field(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike, egress: str, reason: str
) -> None:
    user = await make_user()
    response = await client.post("/broker/connect", json=await _connect_body(simulator, egress), headers=user.headers)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["field"] == "egress" and reason in problem["message"]


async def test_an_egress_that_does_not_answer_is_refused_and_nothing_saved(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike, egress_proxies: StartProxies
) -> None:
    (proxy,) = egress_proxies(1)
    proxy.stop()
    user = await make_user()
    response = await client.post("/broker/connect", json=await _connect_body(simulator, proxy.url),
                                 headers=user.headers)  # fmt: skip
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["field"] == "egress" and "did not answer" in problem["message"]
    assert (await client.get("/broker/status", headers=user.headers)).json()["connected"] is False


@pytest.mark.parametrize("host", ["10.0.0.7", "192.168.1.1", "169.254.169.254", "[::1]", "100.64.0.1"])
async def test_an_egress_on_a_network_the_deployment_does_not_allow_is_refused(
    client: httpx.AsyncClient, make_user: MakeUser, simulator: SimulatorLike, host: str
) -> None:
    """/broker/connect must not connect wherever a user points it: its answers would map the deployment's own
    network (the fixtures allow only 127.0.0.0/8, where the tests' proxies listen)."""
    user = await make_user()
    body = await _connect_body(simulator, f"http://{host}:8888")
    response = await client.post("/broker/connect", json=body, headers=user.headers)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["field"] == "egress" and "EGRESS_ALLOWED_NETWORKS" in problem["message"]
    assert (await client.get("/broker/status", headers=user.headers)).json()["connected"] is False


async def test_start_without_a_required_egress_is_409_naming_it(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    strategy = await make_strategy(user)
    response = await client.post("/strategy/start", json={"strategy_id": strategy["strategy_id"]},
                                 headers=user.headers)  # fmt: skip
    assert response.status_code == 409, response.text
    assert "egress" in response.json()["detail"] and "SINGLE_TRADER" in response.json()["detail"]


async def test_a_socks5_egress_is_checked_and_shown(
    client: httpx.AsyncClient, make_user: MakeUser, connect_broker: ConnectBroker, egress_proxies: StartProxies
) -> None:
    (proxy,) = egress_proxies(1, kind="socks5")
    user = await make_user()
    await connect_broker(user, egress=proxy.url)
    status = (await client.get("/broker/status", headers=user.headers)).json()
    assert status["egress"] == f"socks5h://{proxy.listen}:{proxy.port}"

"""GET /health (liveness, for anyone) and GET /health/ready (each dependency and why, for operators only)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from api.main import create_app
from api.services import Services
from core.embedded import free_port
from core.settings import Settings
from tests.fixtures.api import OPERATOR_TOKEN

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


async def test_liveness_names_nothing(client: httpx.AsyncClient, api_settings: Settings) -> None:
    """Finding 6: /health named the Redis URL, the database path, the Kafka bootstrap and the broker to anyone."""
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "up"}
    for internal in (api_settings.redis_url, api_settings.kafka_bootstrap, api_settings.kite_api_root, "sqlite"):
        assert internal not in response.text


async def test_readiness_is_for_operators_only(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-operator-token"}):
        refused = await client.get("/health/ready", headers=headers)
        assert refused.status_code == 401
        assert "components" not in refused.text
    response = await client.get("/health/ready", headers=OPERATOR)
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "up"
    assert set(body["components"]) == {"kafka", "redis", "database", "broker"}
    assert all(c["status"] == "up" for c in body["components"].values())


async def test_readiness_checks_are_shared_not_repeated(client: httpx.AsyncClient, app: FastAPI) -> None:
    """Finding 6: every call probed every dependency; 200 calls, 10 at a time, took 26 s."""
    services: Services = app.state.services
    for _ in range(20):
        answers = await asyncio.gather(*(client.get("/health/ready", headers=OPERATOR) for _ in range(10)))
        assert {a.status_code for a in answers} == {200}
    # 200 answers within the cache's lifetime (a couple of seconds here): one or two real checks.
    assert services.readiness.checks <= 3, services.readiness.checks


async def test_a_dependency_down_is_503_with_reason(api_settings: Settings) -> None:
    dead_port = free_port()
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{dead_port}/0"})
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            response = await http.get("/health/ready", headers=OPERATOR)
            # The API itself keeps serving what needs no Redis, liveness included.
            assert (await http.get("/openapi.json")).status_code == 200
            assert (await http.get("/health")).status_code == 200
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "down"
    assert body["components"]["redis"]["status"] == "down"
    assert str(dead_port) in body["components"]["redis"]["detail"]
    assert body["components"]["database"]["status"] == "up"

"""GET /health: each dependency up or down with the reason; 200 only when all are up."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from api.main import create_app
from core.embedded import free_port
from core.settings import Settings


async def test_all_up(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "up"
    assert set(body["components"]) == {"kafka", "redis", "database", "broker"}
    assert all(c["status"] == "up" for c in body["components"].values())


async def test_a_dependency_down_is_503_with_reason(api_settings: Settings) -> None:
    dead_port = free_port()
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{dead_port}/0"})
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            response = await http.get("/health")
            # The API itself keeps serving what needs no Redis.
            assert (await http.get("/openapi.json")).status_code == 200
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "down"
    assert body["components"]["redis"]["status"] == "down"
    assert str(dead_port) in body["components"]["redis"]["detail"]
    assert body["components"]["database"]["status"] == "up"

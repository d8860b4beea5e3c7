"""The last-resort handler: a 500 without internals, logged with the request id the client also gets."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from api.errors import RequestIdMiddleware


async def _broken_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("secret internals: password=hunter2")


async def test_unhandled_error_is_a_bare_500_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="api")
    transport = httpx.ASGITransport(app=RequestIdMiddleware(_broken_app))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        response = await client.get("/anything", headers={"X-Request-ID": "abc123"})
    assert response.status_code == 500
    body = response.json()
    assert body["request_id"] == "abc123" == response.headers["x-request-id"]
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert "abc123" in caplog.text

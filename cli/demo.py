"""`algo up --demo`: a demo trader, the simulator's demo account connected, two strategies started.

Everything goes through the public REST API, exactly as the mobile app would. Routes are found in the
API's OpenAPI document by the request models of `schemas/api.py`, so the demo follows the API as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from core.clock import clock_from_settings
from core.settings import Settings

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password-2024"  # noqa: S105 - a throwaway account on a throwaway local stack
DEMO_STRATEGIES = [("NSE:INFY", 10, 0.99), ("NSE:RELIANCE", 5, 0.98)]  # symbol, quantity, stop-loss ratio


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class Routes:
    register: str
    login: str
    broker_connect: str
    strategy_create: str
    strategy_start: str


def _request_model(operation: dict[str, Any]) -> str | None:
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    return str(ref).rsplit("/", 1)[-1] or None


def find_routes(openapi: dict[str, Any]) -> Routes:
    """Map the demo's steps to POST routes by the request model each one takes."""
    by_model: dict[str, str] = {}
    start: str | None = None
    for path, operations in openapi.get("paths", {}).items():
        post = operations.get("post")
        if post is None:
            continue
        if model := _request_model(post):
            by_model.setdefault(model, path)
        if "start" in path.split("/"):
            start = path
    wanted = {
        "register": "RegisterRequest",
        "login": "LoginRequest",
        "broker_connect": "BrokerConnectRequest",
        "strategy_create": "StrategyCreateRequest",
    }
    missing = [model for model in wanted.values() if model not in by_model]
    if missing or start is None:
        raise DemoError(f"the API does not serve {', '.join(missing) or 'a strategy start route'} yet")
    return Routes(**{step: by_model[model] for step, model in wanted.items()}, strategy_start=start)


def _demo_account() -> dict[str, str]:
    """The simulator's built-in demo account (KITE_SIM_DEMO_* or its documented defaults)."""
    simulator = importlib.import_module("connectors.kite_sim")
    account_type = getattr(simulator, "DemoAccount", None)
    if account_type is None:
        raise DemoError("the simulator does not expose a DemoAccount yet")
    account = account_type.from_env()
    return {"api_key": account.api_key, "api_secret": account.api_secret, "access_token": account.access_token}


def _check(response: httpx.Response, step: str) -> dict[str, Any]:
    if response.is_error:
        raise DemoError(f"{step}: HTTP {response.status_code} {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


async def run_demo(settings: Settings, say: Callable[[str], None]) -> list[str]:
    """Set the demo up; returns the lines telling the operator what to poll. Failures are reported, not
    raised: the stack stays up for exploring even if a demo step cannot be done."""
    try:
        return await _run_demo(settings, say)
    except (DemoError, httpx.HTTPError) as exc:
        say(f"demo: {exc}")
        return [f"Demo            not set up: {exc}"]


async def _run_demo(settings: Settings, say: Callable[[str], None]) -> list[str]:
    api = f"http://127.0.0.1:{settings.api_port}"
    async with httpx.AsyncClient(base_url=api, timeout=15.0) as client:
        routes = find_routes(_check(await client.get("/openapi.json"), "openapi"))
        credentials = {"email": DEMO_EMAIL, "password": DEMO_PASSWORD}
        response = await client.post(routes.register, json=credentials)
        if response.status_code == 409:  # registered by an earlier demo against the same database
            response = await client.post(routes.login, json=credentials)
        token = _check(response, "register")["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        _check(await client.post(routes.broker_connect, json=_demo_account()), "connect broker")
        say(f"demo: registered {DEMO_EMAIL} and connected the simulator's demo account")

        # buy_time a minute or two ahead on the shared (sped-up) clock; sell a few minutes later.
        tz = ZoneInfo(settings.market_timezone)
        now = clock_from_settings(settings).now().astimezone(tz)
        buy = (now + timedelta(minutes=2)).replace(second=0, microsecond=0)
        sell = buy + timedelta(minutes=5)
        ids: list[int] = []
        for symbol, quantity, stop_ratio in DEMO_STRATEGIES:
            quote = await _last_price(settings, symbol)
            body = {
                "symbol": symbol,
                "quantity": quantity,
                "buy_time": buy.strftime("%H:%M"),
                "sell_time": sell.strftime("%H:%M"),
                "stop_loss": f"{_to_tick(quote * stop_ratio):.2f}",
            }
            strategy_id = int(_check(await client.post(routes.strategy_create, json=body), "create")["strategy_id"])
            start_path = routes.strategy_start.replace("{strategy_id}", str(strategy_id))
            payload = None if "{strategy_id}" in routes.strategy_start else {"strategy_id": strategy_id}
            _check(await client.post(start_path, json=payload), "start")
            ids.append(strategy_id)
            say(f"demo: strategy {strategy_id} {symbol} x{quantity} BUY {buy:%H:%M} SELL {sell:%H:%M} started")
    return _poll_lines(api, token, ids, now, buy)


async def _last_price(settings: Settings, symbol: str) -> float:
    """The simulator's current price, so the demo's stop-loss sits just under the market."""
    async with httpx.AsyncClient(base_url=settings.kite_api_root, timeout=5.0) as client:
        response = await client.get("/quote/ltp", params={"i": symbol}, headers={"X-Kite-Version": "3"})
    if response.is_error:
        return 1000.0  # the stop-loss need not be tight for a demo; any positive tick value will do
    return float(response.json()["data"][symbol]["last_price"])


def _to_tick(price: float) -> float:
    return round(round(price / 0.05) * 0.05, 2)


def _poll_lines(api: str, token: str, ids: list[int], now: datetime, buy: datetime) -> list[str]:
    auth = f"-H 'Authorization: Bearer {token}'"
    return [
        f"Demo            clock reads {now:%H:%M:%S}; BUY fires at {buy:%H:%M} exchange time",
        *(f"Poll            curl -s {auth} {api}/strategy/status/{sid}" for sid in ids),
        "Order results   kcat -C -t order-results (or any Kafka consumer) on the bootstrap above",
    ]

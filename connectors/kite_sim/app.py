"""The simulator's ASGI app: Kite Connect v3 REST at the root, KiteTicker at `/ws`, control at `/_sim/`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from datetime import time as dt_time
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from connectors.kite_sim import errors
from connectors.kite_sim.errors import KiteError, success
from connectors.kite_sim.faults import Fault, FaultKind, FaultScope
from connectors.kite_sim.feed import FeedHub
from connectors.kite_sim.prices import ReplaySource
from connectors.kite_sim.state import Account, SimulatorState
from core.clock import Clock

QUOTE_LIMIT = 500  # Kite's cap on instruments per /quote call (ltp/ohlc allow 1000)
LTP_LIMIT = 1000


def _form(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _api_key_of(authorization: str | None) -> str | None:
    if authorization and authorization.startswith("token "):
        return authorization[6:].partition(":")[0] or None
    return None


def _json(data: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status_code, media_type=errors.JSON_CONTENT_TYPE)


class Holds:
    """Requests held by `timeout` faults wait here until their time is up or someone releases them."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        event = self._event
        if event is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    def _release(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    def release(self) -> None:
        """Thread-safe."""
        if self._loop is None:
            return
        if threading.get_ident() == self._thread:
            self._release()
        else:
            self._loop.call_soon_threadsafe(self._release)


def _fault_error(fault: Fault) -> KiteError:
    if fault.kind is FaultKind.RATE_LIMIT:
        return errors.rate_limit_error()
    if fault.kind is FaultKind.TIMEOUT:
        return KiteError(504, "NetworkException", "Gateway timed out.")
    return KiteError(fault.status, fault.error_type, fault.message or "Simulated upstream failure.")


class OrderGateway:
    """Place / modify / cancel, with faults, auth, the rate limit and the audit record, independent of
    the web framework: the placement fast path calls it straight from ASGI."""

    def __init__(self, state: SimulatorState, holds: Holds) -> None:
        self.state = state
        self.holds = holds

    async def handle(
        self,
        action: str,
        variety: str,
        target: str | None,
        params: dict[str, str],
        authorization: str | None,
        received_at: datetime,
        received_monotonic: float,
        source_ip: str | None = None,
    ) -> tuple[int, bytes]:
        sim = self.state
        api_key = _api_key_of(authorization)
        record = sim.audit.open(
            action, received_at, received_monotonic, api_key, variety, params, target, source_ip=source_ip
        )
        placement = action == "place"
        terminal = None
        reject_message = None
        try:
            if sim.faults.active:
                decision = sim.faults.decide(api_key, placement)
                record.faults = decision.fired
                if decision.latency_seconds:
                    await asyncio.sleep(decision.latency_seconds)
                terminal = decision.terminal
                if decision.reject is not None:
                    reject_message = decision.reject.message or "Order rejected by the exchange (simulated)."
                if terminal is not None and not terminal.process:
                    if terminal.kind is FaultKind.TIMEOUT:
                        await self.holds.wait(terminal.hold_seconds)
                    raise _fault_error(terminal)
            account = sim.authenticate(authorization)
            sim.check_source_address(account, source_ip)
            sim.check_rate_limit(account, action)
            if placement:
                order = sim.place_order(account, variety, params, reject_message)
                record.outcome = "placed"
            elif action == "modify":
                order = sim.modify_order(account, variety, target or "", params)
                record.outcome = "modified"
            else:
                order = sim.cancel_order(account, variety, target or "")
                record.outcome = "cancelled"
            record.order_id = order.order_id
            record.order_status = order.status
            if terminal is not None:  # `process=True`: it happened, but the client will not hear so
                if terminal.kind is FaultKind.TIMEOUT:
                    await self.holds.wait(terminal.hold_seconds)
                raise _fault_error(terminal)
        except KiteError as exc:
            timed_out = terminal is not None and terminal.kind is FaultKind.TIMEOUT
            record.outcome = "timeout" if timed_out else "error"
            record.http_status = exc.status_code
            record.error_type = exc.error_type
            record.message = exc.message
            record.completed_monotonic = time.monotonic()
            return exc.status_code, exc.body()
        record.http_status = 200
        record.completed_monotonic = time.monotonic()
        return 200, errors.success_body({"order_id": order.order_id})


_JSON_HEADERS = [(b"content-type", b"application/json")]


class KiteMiddleware:
    """Two jobs in front of the framework:

    * the order-placement fast path: `POST /orders/{variety}` goes straight to `OrderGateway`, skipping
      routing and dependency resolution (placement is benchmarked at thousands per second);
    * faults for every other Kite route (order requests fault inside the gateway, so the audit log sees
      them too; the `/_sim/` control API is never faulted).
    """

    def __init__(self, app: ASGIApp, state: SimulatorState, holds: Holds, gateway: OrderGateway) -> None:
        self.app = app
        self.state = state
        self.holds = holds
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path.startswith("/orders/") and path.count("/") == 2 and len(path) > 8:
            await self._place(scope, receive, send, path[8:])
            return
        if not self.state.faults.active or path.startswith("/_sim"):
            await self.app(scope, receive, send)
            return
        if path.startswith("/orders/") and method in ("PUT", "DELETE"):
            await self.app(scope, receive, send)
            return
        decision = self.state.faults.decide(_api_key_of(_header(scope, b"authorization")), is_placement=False)
        if decision.latency_seconds:
            await asyncio.sleep(decision.latency_seconds)
        fault = decision.terminal
        if fault is None:
            await self.app(scope, receive, send)
            return
        if fault.kind is FaultKind.TIMEOUT:
            await self.holds.wait(fault.hold_seconds)
        await _fault_error(fault).response()(scope, receive, send)

    async def _place(self, scope: Scope, receive: Receive, send: Send, variety: str) -> None:
        received_monotonic = time.monotonic()
        received_at = self.state.clock.now()
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, body = await self.gateway.handle(
            "place",
            variety,
            None,
            _form(b"".join(chunks)),
            _header(scope, b"authorization"),
            received_at,
            received_monotonic,
            _client_host(scope),
        )
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})


def _client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


# --- control API bodies ------------------------------------------------------------------------------


class AccountIn(BaseModel):
    api_key: str = Field(min_length=1)
    api_secret: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    email: str | None = None
    balance: float = 1_000_000.0
    access_token: str | None = None
    redirect_url: str | None = None
    holdings: list[tuple[str, int, float]] = []


class IpWhitelistIn(BaseModel):
    ips: list[str] = Field(min_length=1)
    force: bool = False  # skip the once-a-week limit (test setup)


class StepIn(BaseModel):
    price: float = Field(gt=0)
    at: datetime | None = None
    after_seconds: float | None = None


class PriceIn(BaseModel):
    price: float | None = Field(default=None, gt=0)
    quantity: int = 1
    steps: list[StepIn] | None = None
    unpin: bool = False


class FaultIn(BaseModel):
    kind: str
    api_key: str | None = None
    scope: FaultScope = FaultScope.ALL
    count: int | None = Field(default=None, ge=1)
    probability: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    latency_ms: float = 0.0
    hold_seconds: float = 300.0
    status: int | None = None
    error_type: str = "NetworkException"
    message: str = ""
    process: bool = False


class ConfigIn(BaseModel):
    rate_limit_enabled: bool | None = None
    orders_per_second: int | None = Field(default=None, ge=1)
    slippage_ticks: int | None = Field(default=None, ge=0)
    mis_margin_percent: int | None = Field(default=None, ge=1, le=100)
    tick_interval: float | None = Field(default=None, ge=0)
    heartbeat_interval: float | None = Field(default=None, gt=0)
    max_subscriptions: int | None = Field(default=None, ge=1)
    max_connections_per_key: int | None = Field(default=None, ge=1)
    max_packets_per_frame: int | None = Field(default=None, ge=1, le=65535)
    request_token_ttl_seconds: float | None = Field(default=None, gt=0)
    market_protection_required: bool | None = None
    market_protection_band: bool | None = None
    fast_move_slippage: bool | None = None
    max_modifications: int | None = Field(default=None, ge=0)
    modification_limit_enabled: bool | None = None
    market_hours_enforced: bool | None = None
    mis_square_off_enabled: bool | None = None
    mis_square_off_time: dt_time | None = None
    orders_per_minute: int | None = Field(default=None, ge=1)
    orders_per_day: int | None = Field(default=None, ge=1)
    minute_limit_enabled: bool | None = None
    day_limit_enabled: bool | None = None
    rate_limit_counts_modify_cancel: bool | None = None
    read_limits_enabled: bool | None = None
    quotes_per_second: int | None = Field(default=None, ge=1)
    other_reads_per_second: int | None = Field(default=None, ge=1)
    historical_per_second: int | None = Field(default=None, ge=1)
    static_ip_check: bool | None = None
    walk: bool | None = None
    move_probability: float | None = Field(default=None, ge=0, le=1)


class ReplayIn(BaseModel):
    path: str | None = None
    text: str | None = None
    jsonl: bool = False
    speed: float = Field(default=1.0, gt=0)


# Immediate actions accepted by POST /_sim/faults next to the request-matching fault kinds.
ACTIONS = ("expire_token", "drop_ws", "pause_feed", "resume_feed")


def create_app(state: SimulatorState | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the simulator app around `state` (a fresh one on `clock` if not given)."""
    sim = state or SimulatorState(clock=clock)
    hub = FeedHub(sim)
    holds = Holds()
    gateway = OrderGateway(sim, holds)
    sim.release_hook = holds.release

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        hub.bind_loop()
        holds.bind()
        engine = asyncio.create_task(hub.run_engine(), name="kite-sim-engine")
        try:
            yield
        finally:
            holds.release()
            hub.drop()
            engine.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await engine

    app = FastAPI(
        title="Kite Connect simulator",
        lifespan=lifespan,
        docs_url="/_sim/docs",
        openapi_url="/_sim/openapi.json",
        redoc_url=None,
    )
    app.state.sim = sim
    app.state.hub = hub
    app.add_middleware(KiteMiddleware, state=sim, holds=holds, gateway=gateway)

    # --- the Kite envelope for every failure --------------------------------------------------------

    async def on_kite_error(_: Request, exc: Exception) -> Response:
        if not isinstance(exc, KiteError):
            raise exc
        return exc.response()

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):
            raise exc
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return errors.input_error(f"Invalid `{where}`: {first.get('msg', 'invalid input')}.").response()

    async def on_http_error(_: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):
            raise exc
        if exc.status_code == 404:
            return errors.input_error("Route not found.").response()
        if exc.status_code == 405:
            return errors.input_error("Method not allowed on this route.").response()
        return KiteError(exc.status_code, "GeneralException", str(exc.detail)).response()

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        return errors.general_error(f"Internal simulator error: {type(exc).__name__}.").response()

    app.add_exception_handler(KiteError, on_kite_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    def auth(request: Request) -> Any:
        return sim.authenticate(request.headers.get("authorization"))

    # --- session ------------------------------------------------------------------------------------

    @app.get("/connect/login", include_in_schema=False)
    async def connect_login(request: Request) -> Response:
        """Kite's login page, auto-approved: redirect to the account's redirect_url with a request_token."""
        api_key = request.query_params.get("api_key", "")
        account = sim.accounts.get(api_key)
        if account is None:
            raise errors.input_error("Invalid `api_key`.")
        request_token = sim.mint_request_token(api_key)
        if account.redirect_url:
            query = urlencode({"action": "login", "type": "login", "status": "success", "request_token": request_token})
            separator = "&" if "?" in account.redirect_url else "?"
            return RedirectResponse(f"{account.redirect_url}{separator}{query}", status_code=302)
        return success({"request_token": request_token})

    @app.post("/session/token")
    async def session_token(request: Request) -> Response:
        form = _form(await request.body())
        for name in ("api_key", "request_token", "checksum"):
            if not form.get(name):
                raise errors.input_error(f"Missing `{name}`.")
        return success(sim.generate_session(form["api_key"], form["request_token"], form["checksum"]))

    @app.delete("/session/token")
    async def session_invalidate(request: Request) -> Response:
        params = request.query_params
        api_key = params.get("api_key", "")
        access_token = params.get("access_token", "")
        if not api_key or not access_token:
            raise errors.input_error("Missing `api_key` or `access_token`.")
        sim.invalidate_access_token(api_key, access_token)
        return success(True)

    def reader(request: Request) -> Account:
        """The account of an authenticated read other than a quote: Kite allows 10 such a second per api_key."""
        account = auth(request)
        sim.check_read_limit(account)
        return account

    # --- user ---------------------------------------------------------------------------------------

    @app.get("/user/profile")
    async def profile(request: Request) -> Response:
        return success(sim.profile_json(reader(request)))

    @app.get("/user/margins")
    async def margins(request: Request) -> Response:
        return success(sim.margins_json(reader(request)))

    @app.get("/user/margins/{segment}")
    async def margins_segment(request: Request, segment: str) -> Response:
        account = reader(request)
        if segment not in ("equity", "commodity"):
            raise errors.input_error("Invalid segment.")
        return success(sim.margins_json(account, segment))

    # --- orders -------------------------------------------------------------------------------------

    async def order_request(request: Request, action: str) -> Response:
        received_monotonic = time.monotonic()
        received_at = sim.clock.now()
        if request.method in ("POST", "PUT"):
            params = _form(await request.body())
        else:
            params = dict(request.query_params)
        status, body = await gateway.handle(
            action,
            request.path_params["variety"],
            request.path_params.get("order_id"),
            params,
            request.headers.get("authorization"),
            received_at,
            received_monotonic,
            _client_host(request.scope),
        )
        return Response(body, status_code=status, media_type=errors.JSON_CONTENT_TYPE)

    @app.post("/orders/{variety}")
    async def place_order(request: Request) -> Response:
        return await order_request(request, "place")

    @app.put("/orders/{variety}/{order_id}")
    async def modify_order(request: Request) -> Response:
        return await order_request(request, "modify")

    @app.delete("/orders/{variety}/{order_id}")
    async def cancel_order(request: Request) -> Response:
        return await order_request(request, "cancel")

    @app.get("/orders")
    async def orders(request: Request) -> Response:
        return success(sim.orders_json(reader(request)))

    @app.get("/orders/{order_id}")
    async def order_history(request: Request, order_id: str) -> Response:
        return success(sim.get_order(reader(request), order_id).history_dicts())

    @app.get("/orders/{order_id}/trades")
    async def order_trades(request: Request, order_id: str) -> Response:
        return success([t.to_dict() for t in sim.order_trades(reader(request), order_id)])

    @app.get("/trades")
    async def trades(request: Request) -> Response:
        return success(sim.trades_json(reader(request)))

    # --- portfolio ----------------------------------------------------------------------------------

    @app.get("/portfolio/positions")
    async def positions(request: Request) -> Response:
        return success(sim.positions_json(reader(request)))

    @app.get("/portfolio/holdings")
    async def holdings(request: Request) -> Response:
        return success(sim.holdings_json(reader(request)))

    # --- market data --------------------------------------------------------------------------------

    def instrument_keys(request: Request, limit: int) -> list[str]:
        keys = request.query_params.getlist("i")
        if not keys:
            raise errors.input_error("No instruments given: pass `i=EXCHANGE:TRADINGSYMBOL`.")
        if len(keys) > limit:
            raise errors.input_error(f"Too many instruments: at most {limit} per request.")
        return keys

    @app.get("/quote")
    async def quote(request: Request) -> Response:
        sim.check_quote_limit(auth(request))
        keys = instrument_keys(request, QUOTE_LIMIT)
        now = sim.exchange_time()
        out = {}
        for key in keys:
            q = sim.book.quote_by_key(key)
            if q is not None:  # Kite leaves unknown instruments out
                out[key] = q.quote_dict(now, sim.format_epoch(q.last_trade_time))
        return success(out)

    @app.get("/quote/ltp")
    async def quote_ltp(request: Request) -> Response:
        sim.check_quote_limit(auth(request))
        out = {}
        for key in instrument_keys(request, LTP_LIMIT):
            q = sim.book.quote_by_key(key)
            if q is not None:
                out[key] = {"instrument_token": q.token, "last_price": q.last / 100}
        return success(out)

    @app.get("/quote/ohlc")
    async def quote_ohlc(request: Request) -> Response:
        sim.check_quote_limit(auth(request))
        out = {}
        for key in instrument_keys(request, LTP_LIMIT):
            q = sim.book.quote_by_key(key)
            if q is not None:
                out[key] = {"instrument_token": q.token, "last_price": q.last / 100, "ohlc": q.ohlc_dict()}
        return success(out)

    @app.get("/instruments")
    async def instruments() -> Response:
        return Response(sim.master.csv_bytes(), media_type="text/csv")

    @app.get("/instruments/{exchange}")
    async def instruments_exchange(exchange: str) -> Response:
        if exchange.upper() not in sim.master.exchanges():
            raise errors.input_error(f"Invalid exchange `{exchange}`.")
        return Response(sim.master.csv_bytes(exchange.upper()), media_type="text/csv")

    # --- ticker -------------------------------------------------------------------------------------

    @app.websocket("/ws")
    async def ticker(websocket: WebSocket) -> None:
        await hub.serve_connection(websocket)

    @app.websocket("/")
    async def ticker_root(websocket: WebSocket) -> None:
        await hub.serve_connection(websocket)

    # --- control API (/_sim/) -----------------------------------------------------------------------

    @app.post("/_sim/accounts")
    async def control_create_account(body: AccountIn) -> Response:
        credentials = sim.create_account(**body.model_dump())
        return _json(credentials.to_dict(), 201)

    @app.get("/_sim/accounts")
    async def control_accounts() -> Response:
        return _json(
            [
                {
                    "api_key": a.api_key,
                    "user_id": a.user_id,
                    "user_name": a.user_name,
                    "balance": a.cash / 100,
                }
                for a in sim.accounts.values()
            ]
        )

    @app.post("/_sim/accounts/{api_key}/request_token")
    async def control_request_token(api_key: str) -> Response:
        return _json({"request_token": sim.mint_request_token(api_key)})

    @app.post("/_sim/accounts/{api_key}/access_token")
    async def control_access_token(api_key: str) -> Response:
        return _json({"access_token": sim.mint_access_token(api_key)})

    @app.post("/_sim/accounts/{api_key}/expire_token")
    async def control_expire_token(api_key: str, request: Request) -> Response:
        sim.account(api_key)
        body = orjson.loads(await request.body() or b"{}")
        return _json({"expired": sim.expire_tokens(api_key, body.get("access_token"))})

    @app.put("/_sim/accounts/{api_key}/ip_whitelist")
    async def control_set_ip_whitelist(api_key: str, body: IpWhitelistIn) -> Response:
        ips = sim.set_ip_whitelist(api_key, body.ips, force=body.force)
        return _json({"api_key": api_key, "ips": list(ips)})

    @app.get("/_sim/accounts/{api_key}/ip_whitelist")
    async def control_ip_whitelist(api_key: str) -> Response:
        account = sim.account(api_key)
        changed = account.ip_whitelist_changed_at
        changed_at = changed.isoformat() if changed else None
        return _json({"api_key": api_key, "ips": list(account.ip_whitelist), "changed_at": changed_at})

    @app.get("/_sim/prices/{exchange}/{symbol}")
    async def control_get_price(exchange: str, symbol: str) -> Response:
        q = sim.book.quote_by_key(f"{exchange}:{symbol}")
        if q is None:
            raise errors.input_error(f"Unknown instrument {exchange}:{symbol}.")
        return _json(
            {
                "instrument": f"{exchange}:{symbol}",
                "instrument_token": q.token,
                "last_price": q.last / 100,
                "volume": q.volume,
                "pinned": q.pinned,
                "ohlc": q.ohlc_dict(),
            }
        )

    @app.post("/_sim/prices/{exchange}/{symbol}")
    async def control_set_price(exchange: str, symbol: str, body: PriceIn) -> Response:
        key = f"{exchange}:{symbol}"
        if sim.master.by_key(key) is None:
            raise errors.input_error(f"Unknown instrument {key}.")
        if body.unpin:
            sim.book.unpin(key)
        if body.price is not None:
            sim.set_price(key, body.price, body.quantity)
            sim.step()  # match resting orders at once rather than at the next engine tick
            hub.wake_all()
        if body.steps:
            # `at` is absolute; `after_seconds` is relative to now ("1450.00 at t+3s").
            sim.script_path(key, [(s.at or float(s.after_seconds or 0.0), s.price) for s in body.steps])
        return await control_get_price(exchange, symbol)

    @app.post("/_sim/replay")
    async def control_replay(body: ReplayIn) -> Response:
        if body.path:
            source = ReplaySource.from_file(body.path, body.speed)
        elif body.text:
            source = ReplaySource.from_text(body.text, jsonl=body.jsonl, speed=body.speed)
        else:
            sim.replay(None)
            return _json({"ticks": 0})
        sim.replay(source)
        return _json({"ticks": len(source.ticks)})

    @app.post("/_sim/faults")
    async def control_add_fault(body: FaultIn) -> Response:
        if body.kind in ACTIONS:
            return _json(run_action(body))
        try:
            kind = FaultKind(body.kind)
        except ValueError:
            raise errors.input_error(f"Unknown fault kind `{body.kind}`.") from None
        options = body.model_dump(exclude={"kind", "status"})
        status = body.status or errors.DEFAULT_STATUS.get(body.error_type, 500)
        fault = sim.inject_fault(kind, status=status, **options)
        return _json(fault.to_dict(), 201)

    def run_action(body: FaultIn) -> dict[str, Any]:
        if body.kind == "expire_token":
            if body.api_key is None:
                raise errors.input_error("expire_token needs `api_key`.")
            return {"expired": sim.expire_tokens(body.api_key)}
        if body.kind == "drop_ws":
            return {"dropped": sim.drop_connections(body.api_key)}
        sim.feed_paused = body.kind == "pause_feed"
        return {"feed_paused": sim.feed_paused}

    @app.get("/_sim/faults")
    async def control_faults() -> Response:
        return _json([f.to_dict() for f in sim.faults.list()])

    @app.delete("/_sim/faults")
    async def control_clear_faults() -> Response:
        sim.clear_faults()
        return _json({"cleared": True})

    @app.post("/_sim/faults/release")
    async def control_release() -> Response:
        sim.release_held()
        return _json({"released": True})

    @app.post("/_sim/ws/drop")
    async def control_drop(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        return _json({"dropped": sim.drop_connections(body.get("api_key"))})

    @app.post("/_sim/feed/pause")
    async def control_pause() -> Response:
        sim.feed_paused = True
        return _json({"feed_paused": True})

    @app.post("/_sim/feed/resume")
    async def control_resume() -> Response:
        sim.feed_paused = False
        hub.wake_all()
        return _json({"feed_paused": False})

    @app.get("/_sim/audit")
    async def control_audit(
        api_key: str | None = None, tag: str | None = None, since: datetime | None = None
    ) -> Response:
        return _json([r.to_dict() for r in sim.audit_records(api_key=api_key, tag=tag, since=since)])

    @app.delete("/_sim/audit")
    async def control_clear_audit() -> Response:
        sim.audit.clear()
        return _json({"cleared": True})

    @app.get("/_sim/config")
    async def control_config() -> Response:
        return _json({**sim.config.to_dict(), "walk": sim.book.walk, "move_probability": sim.book.move_probability})

    @app.post("/_sim/config")
    async def control_set_config(body: ConfigIn) -> Response:
        values = body.model_dump(exclude_none=True)
        if "walk" in values:
            sim.book.walk = values.pop("walk")
        if "move_probability" in values:
            sim.book.move_probability = values.pop("move_probability")
        for name, value in values.items():
            setattr(sim.config, name, value)
        return await control_config()

    @app.post("/_sim/reset")
    async def control_reset(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        sim.reset(keep_accounts=bool(body.get("keep_accounts", False)))
        return _json({"reset": True})

    @app.get("/_sim/health")
    async def control_health() -> Response:
        return _json({"status": "ok", "connections": len(hub.connections), "instruments": len(sim.master)})

    return app

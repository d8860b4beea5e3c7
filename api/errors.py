"""Error shapes and handlers: every failure is a 4xx with a message naming the field and rule, or a 5xx
without internals (logged with the request id). Inputs are never echoed: they may be secrets."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.login_throttle import Throttled
from api.passwords import HashingBusy
from connectors.broker import BrokerRejected, BrokerTokenExpired, BrokerUnavailable
from manager.strategy_manager import ManagerUnavailable, StrategyNotFound
from schemas.api import PASSWORD_RULE

log = logging.getLogger("api")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

JSON = "application/json"


class JsonResponse(Response):
    """orjson-rendered JSON (FastAPI's ORJSONResponse is deprecated; this is all it did)."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """A refusal the trader should read: status code, message, optional headers."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = dict(headers or {})


class FieldError(ApiError):
    """A business-rule validation failure on one field, shaped like the framework's validation errors."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(status_code, message)
        self.field = field


def not_found(what: str = "strategy") -> ApiError:
    # One message for "absent" and "someone else's": tenants cannot probe each other's ids.
    return ApiError(404, f"{what} not found")


def _body(detail: object) -> dict[str, object]:
    return {"detail": detail, "request_id": request_id_var.get()}


def error_response(status_code: int, detail: object, headers: Mapping[str, str] | None = None) -> JsonResponse:
    return JsonResponse(_body(detail), status_code=status_code, headers=dict(headers or {}))


def _field_name(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


_FRIENDLY = {
    "json_invalid": "malformed JSON",
    "missing": "field required",
    "model_attributes_type": "expected a JSON object",
    "dict_type": "expected a JSON object",
    "extra_forbidden": "unknown field (not allowed)",
}


def _named_field(message: str) -> str | None:
    name, sep, _ = message.partition(": ")
    return name if sep and name.isidentifier() else None


def validation_problems(errors: Sequence[Any]) -> list[dict[str, str | None]]:
    problems: list[dict[str, str | None]] = []
    for error in errors:
        kind = error.get("type", "")
        loc = error.get("loc", ())
        field = _field_name(loc)
        message = str(error.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        if kind in {"string_too_short", "string_too_long"} and field in {"password", "new_password"}:
            message = f"{field}: {PASSWORD_RULE}"  # the whole rule, not only the length it broke
        elif kind in _FRIENDLY and kind != "json_invalid":
            message = f"{field}: {_FRIENDLY[kind]}"
        elif kind == "json_invalid":
            field = "body"
            message = f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot parse')}"
        elif field == "body" and (named := _named_field(message)) is not None:
            # A rule over several fields (a model validator) still names the field to fix: "symbol: required".
            field = named
        elif field and not message.startswith(field.split(".")[-1]):
            message = f"{field}: {message}"
        problems.append({"field": field, "message": message})
    return problems


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for this type only
    return error_response(422, validation_problems(exc.errors()))


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, FieldError):
        return error_response(exc.status_code, [{"field": exc.field, "message": exc.message}])
    assert isinstance(exc, ApiError)  # noqa: S101
    return error_response(exc.status_code, exc.message, exc.headers)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body it cannot even decode (bad UTF-8, broken form): the same 422 shape
        # as any other malformed JSON, so the app has one error format to handle.
        return error_response(422, [{"field": "body", "message": "malformed JSON: body cannot be decoded"}])
    return error_response(exc.status_code, exc.detail, exc.headers)


async def _throttled_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Throttled)  # noqa: S101 - registered for this type only
    return error_response(429, exc.message, {"Retry-After": str(exc.retry_after)})


async def _hashing_busy_handler(request: Request, exc: Exception) -> Response:
    # Password checks are queued in a bounded pool (api.passwords); past its queue, come back shortly.
    return error_response(503, "too many logins being checked right now, try again shortly", {"Retry-After": "1"})


async def _not_found_handler(request: Request, exc: Exception) -> Response:
    return error_response(404, "strategy not found")


async def _broker_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, BrokerTokenExpired):
        return error_response(409, f"broker session expired or revoked; reconnect the broker ({exc.message})")
    if isinstance(exc, BrokerRejected):
        return error_response(400, f"broker refused: {exc.message}")
    assert isinstance(exc, BrokerUnavailable)  # noqa: S101
    return error_response(503, f"broker unavailable, try again shortly: {exc.message}", {"Retry-After": "5"})


async def _unavailable_handler(request: Request, exc: Exception) -> Response:
    log.warning("dependency unavailable on %s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, RedisError):
        message = "runtime store (Redis) unavailable, try again shortly"
    elif isinstance(exc, DBAPIError | OperationalError | OSError):
        message = "database unavailable, try again shortly"
    else:
        message = "event bus (Kafka) unavailable, try again shortly"
    return error_response(503, message, {"Retry-After": "5"})


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id_var.get())
    return error_response(500, "internal error; quote the request_id when reporting it")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(StrategyNotFound, _not_found_handler)
    app.add_exception_handler(HashingBusy, _hashing_busy_handler)
    app.add_exception_handler(Throttled, _throttled_handler)
    app.add_exception_handler(BrokerUnavailable, _broker_handler)
    app.add_exception_handler(BrokerRejected, _broker_handler)
    app.add_exception_handler(ManagerUnavailable, _unavailable_handler)
    app.add_exception_handler(RedisError, _unavailable_handler)
    app.add_exception_handler(OperationalError, _unavailable_handler)
    app.add_exception_handler(OSError, _unavailable_handler)
    app.add_exception_handler(Exception, _unexpected_handler)


class RequestIdMiddleware:
    """Pure ASGI (BaseHTTPMiddleware costs too much on the status hot path): tags every request and
    response with an id that also appears in the logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")[:64]
                if candidate.isascii() and candidate.replace("-", "").isalnum():
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        raw_id = request_id.encode()

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Handled here rather than by Starlette's outermost handler, which runs after the request id
            # is gone: the log line and the answer carry the same id.
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"),
                          request_id)  # fmt: skip
            if not started:
                response = error_response(500, "internal error; quote the request_id when reporting it")
                await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

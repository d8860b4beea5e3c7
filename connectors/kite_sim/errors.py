"""Kite's error envelope: every failure the simulator returns, with the HTTP status Kite uses for it."""

from __future__ import annotations

import orjson
from starlette.responses import Response

JSON_CONTENT_TYPE = "application/json"


class KiteError(Exception):
    """An error the simulator answers with `{"status":"error","message":...,"error_type":...}`."""

    def __init__(self, status_code: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message

    def body(self) -> bytes:
        return error_body(self.error_type, self.message)

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status_code, media_type=JSON_CONTENT_TYPE)


def error_body(error_type: str, message: str) -> bytes:
    # error_type is always present: without it the official client crashes with a TypeError.
    return orjson.dumps({"status": "error", "message": message, "data": None, "error_type": error_type})


def success_body(data: object) -> bytes:
    return orjson.dumps({"status": "success", "data": data})


def success(data: object) -> Response:
    return Response(success_body(data), media_type=JSON_CONTENT_TYPE)


# The exception classes of `kiteconnect.exceptions` and the HTTP status Kite pairs them with.
def input_error(message: str) -> KiteError:
    return KiteError(400, "InputException", message)


def token_error(message: str = "Incorrect `api_key` or `access_token`.") -> KiteError:
    return KiteError(403, "TokenException", message)


def permission_error(message: str) -> KiteError:
    return KiteError(403, "PermissionException", message)


def order_error(message: str) -> KiteError:
    return KiteError(500, "OrderException", message)


def general_error(message: str) -> KiteError:
    return KiteError(500, "GeneralException", message)


def rate_limit_error(message: str = "Too many requests") -> KiteError:
    return KiteError(429, "NetworkException", message)


# Default status for each error type when a fault names only the type.
DEFAULT_STATUS: dict[str, int] = {
    "InputException": 400,
    "TokenException": 403,
    "PermissionException": 403,
    "OrderException": 500,
    "GeneralException": 500,
    "DataException": 502,
    "NetworkException": 503,
}

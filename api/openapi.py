"""Documented error responses, so /docs shows what each endpoint can refuse and why."""

from __future__ import annotations

from typing import Any

from schemas.api import ErrorResponse, ValidationErrorResponse

_DESCRIPTIONS: dict[int, tuple[str, type[Any], str | None]] = {
    400: ("Refused by the broker, or a rule the request breaks", ErrorResponse, "broker refused: Invalid api_key"),
    401: ("Missing, malformed, tampered or expired token (see WWW-Authenticate)", ErrorResponse,
          "invalid token: log in again"),
    404: ("No such strategy for this user", ErrorResponse, "strategy not found"),
    403: ("The password given to confirm is wrong", ErrorResponse, "the password given is not this account's"),
    409: ("Conflicts with the current state", ErrorResponse,
          "broker not connected: POST /broker/connect first"),
    422: ("Malformed JSON, missing, wrong-type or out-of-range field", ValidationErrorResponse, None),
    429: ("Too many attempts from this address or for this email (see Retry-After)", ErrorResponse,
          "too many failed logins for this email from here; try again in 52 s"),
    503: ("A dependency (broker, Kafka, Redis, database) is unavailable, or the server is busy; retry", ErrorResponse,
          "broker unavailable, try again shortly: broker is unreachable (connection failed)"),
}  # fmt: skip


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    documented: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description, model, example = _DESCRIPTIONS[code]
        entry: dict[str, Any] = {"description": description, "model": model}
        if example is not None:
            entry["content"] = {"application/json": {"example": {"detail": example, "request_id": "5f0c2b1e9a0d4c7e"}}}
        documented[code] = entry
    return documented


AUTHENTICATED = (401, 422)

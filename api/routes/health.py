"""Liveness for anyone, readiness in detail for operators only.

`GET /health` says the process serves and nothing else: no dependency is probed and nothing about the
internals is named. `GET /health/ready` names every dependency, where it is and why it is down: that is for
the operator's token (`OPERATOR_TOKEN`) alone, and it answers from a check at most `HEALTH_CACHE_SECONDS` old.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SettingsDep
from api.errors import ApiError, JsonResponse
from api.openapi import responses
from api.services import Services
from core.health import all_up
from schemas.api import HealthResponse, LivenessResponse

router = APIRouter(tags=["health"])

operator_scheme = HTTPBearer(auto_error=False, scheme_name="OperatorToken", description="OPERATOR_TOKEN")


@router.get("/health", response_model=LivenessResponse, summary="Liveness: the API process answers")
async def health() -> Response:
    return JsonResponse({"status": "up"})


def _operator(settings: SettingsDep, credentials: HTTPAuthorizationCredentials | None) -> None:
    configured = settings.operator_token
    challenge = {"WWW-Authenticate": "Bearer"}
    if configured is None:
        raise ApiError(401, "readiness detail is for operators: set OPERATOR_TOKEN on the API", challenge)
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, configured.get_secret_value().encode()):
        raise ApiError(401, "readiness detail is for operators: send Authorization: Bearer <OPERATOR_TOKEN>", challenge)


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    summary="Readiness, for operators: Kafka, Redis, database and broker, each up or down and why",
    responses={
        **responses(401),
        503: {"model": HealthResponse, "description": "At least one dependency is down"},
    },
)
async def ready(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_scheme)],
) -> Response:
    _operator(settings, credentials)
    services: Services = request.app.state.services
    components = await services.readiness.components()
    healthy = all_up(components)
    body = {
        "status": "up" if healthy else "down",
        "components": {name: c.model_dump() for name, c in components.items()},
    }
    return JsonResponse(body, status_code=200 if healthy else 503)

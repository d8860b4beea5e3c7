"""Operator's view: each dependency up or down, and why. 200 when all are up, 503 otherwise."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import SettingsDep
from api.errors import JsonResponse
from core.health import all_up, check_dependencies
from schemas.api import HealthResponse

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Kafka, Redis, database and broker reachability",
    responses={503: {"model": HealthResponse, "description": "At least one dependency is down"}},
)
async def health(settings: SettingsDep) -> Response:
    components = await check_dependencies(settings)
    healthy = all_up(components)
    body = {
        "status": "up" if healthy else "down",
        "components": {name: c.model_dump() for name, c in components.items()},
    }
    return JsonResponse(body, status_code=200 if healthy else 503)

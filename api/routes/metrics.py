"""`GET /metrics`: the API's Prometheus series, for the operator's token only (they describe the book)."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SettingsDep
from api.errors import ApiError
from api.openapi import responses
from api.routes.health import operator_scheme
from core import metrics

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get(
    "/metrics",
    summary="Prometheus metrics, for operators: orders, positions, strategies (text exposition format)",
    responses={**responses(401), 200: {"content": {metrics.CONTENT_TYPE: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_scheme)],
) -> Response:
    configured = settings.operator_token
    challenge = {"WWW-Authenticate": "Bearer"}
    given = credentials.credentials.encode() if credentials is not None else b""
    if configured is None or not hmac.compare_digest(given, configured.get_secret_value().encode()):
        raise ApiError(401, "metrics are for operators: send Authorization: Bearer <OPERATOR_TOKEN>", challenge)
    try:
        await request.app.state.book_metrics.refresh()
    except (SQLAlchemyError, OSError) as exc:
        # The series keep their last values; `algo_up`-style staleness shows on the dashboard, not as a 500.
        log.warning("metrics: could not read the book from the database (%s)", exc)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

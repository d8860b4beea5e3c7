"""Property test over the OpenAPI spec (schemathesis): no generated input, valid or not, gets a 5xx, and
every answer is a documented status code with a body matching its documented schema.

Bounded: a few dozen examples per operation, so the whole run stays well under a minute.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from api.tokens import TokenService
from connectors.broker import token_expiry
from core.clock import get_clock
from core.crypto import SecretBox
from core.settings import Settings
from storage.models import BrokerAccount, Strategy, User
from tests.fixtures.api import SimulatorLike
from tests.fixtures.factories import api_key


@pytest.fixture
def api_schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
async def fuzz_headers(db_engine: AsyncEngine, api_settings: Settings, simulator: SimulatorLike) -> dict[str, str]:
    """A user with a connected broker and one strategy, so authenticated paths run past the auth check."""
    now = get_clock().now()
    creds = simulator.state.create_account(api_key=api_key())
    box = SecretBox(api_settings)
    async with db_engine.begin() as conn:
        user_id = (
            await conn.execute(
                User.__table__.insert()
                .values(email="fuzz@example.com", password_hash="$argon2id$unused", created_at=now)
                .returning(User.__table__.c.id)
            )
        ).scalar_one()
        await conn.execute(
            BrokerAccount.__table__.insert().values(
                user_id=user_id, api_key_encrypted=box.encrypt(creds.api_key),
                api_secret_encrypted=box.encrypt(creds.api_secret),
                access_token_encrypted=box.encrypt(creds.access_token), broker_user_id=creds.user_id,
                broker_user_name="Fuzz", token_issued_at=now, token_expires_at=token_expiry(now, api_settings),
                created_at=now, updated_at=now,
            )
        )  # fmt: skip
        await conn.execute(
            Strategy.__table__.insert().values(
                user_id=user_id, exchange="NSE", tradingsymbol="INFY", instrument_token=408065, quantity=1,
                buy_time=time(10, 30), sell_time=time(15, 0), stop_loss=Decimal("1400.05"), product="MIS",
                status="created", run=0, created_at=datetime.now(UTC), updated_at=datetime.now(UTC),
            )
        )  # fmt: skip
    token = TokenService(api_settings, get_clock()).issue(user_id, 0, "fuzz-session").token
    return {"Authorization": f"Bearer {token}"}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES_PER_OPERATION = 20


def test_no_input_produces_a_server_error(api_schema: Any, fuzz_headers: dict[str, str]) -> None:
    """Every operation, valid (positive) and invalid (negative) inputs.

    Driven by hand rather than by `schemathesis.pytest.from_fixture`, whose lazy loader reads a pytest
    attribute that pytest 9 no longer has (`Function._nodeid`).
    """
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # A logout revokes the fuzzing token: it goes last, so every other operation is fuzzed past authentication.
    operations.sort(key=lambda operation: operation.path == "/auth/logout")
    for operation in operations:
        if operation.path in ("/health", "/health/ready"):
            # Liveness takes no input to fuzz; readiness probes every dependency: slow, with a test of its own.
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                # Every case carries a valid token, so the handlers behind authentication are what gets
                # fuzzed (schemathesis would otherwise send made-up bearer tokens: a 401 every time).
                # Bad tokens have their own test (test_auth.py).
                own = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                case.headers = {**own, **fuzz_headers}
                case.call_and_validate(checks=CHECKS)

            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - report every failing operation
                failures.append(f"{operation.method.upper()} {operation.path} [{mode}]: {exc}")
    assert not failures, "\n\n".join(failures)

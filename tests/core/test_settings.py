"""Settings refuse the development secrets in production."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from core.settings import Environment, Settings

STRONG_SECRET = "a-production-secret-with-more-than-32-characters"


def test_production_refuses_the_default_jwt_secret() -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        Settings(environment=Environment.PRODUCTION)


def test_production_refuses_the_default_encryption_key() -> None:
    with pytest.raises(ValidationError, match="ENCRYPTION_KEYS"):
        Settings(environment=Environment.PRODUCTION, jwt_secret=STRONG_SECRET)


def test_production_accepts_its_own_secrets() -> None:
    key = Fernet.generate_key().decode()
    settings = Settings(environment=Environment.PRODUCTION, jwt_secret=STRONG_SECRET, encryption_keys=key)
    assert settings.environment is Environment.PRODUCTION


def test_development_keeps_working_with_the_defaults() -> None:
    assert Settings(environment=Environment.DEVELOPMENT).jwt_secret.get_secret_value()


@pytest.mark.parametrize(
    ("options", "required"),
    [
        ({}, True),
        ({"single_trader": True}, False),
        ({"require_egress": False}, False),
        ({"single_trader": True, "require_egress": True}, True),
        ({"broker_mode": "paper"}, False),
    ],
)
def test_production_requires_an_egress_unless_single_trader(options: dict[str, object], required: bool) -> None:
    secrets = {"jwt_secret": "x" * 40, "encryption_keys": Fernet.generate_key().decode()}
    settings = Settings(environment=Environment.PRODUCTION, **secrets, **options)  # type: ignore[arg-type]
    assert settings.egress_required is required


def test_development_requires_no_egress_unless_told() -> None:
    assert Settings().egress_required is False
    assert Settings(require_egress=True).egress_required is True

"""The environment that makes a child process build the same Settings and read the same clock."""

from __future__ import annotations

import os

from pydantic import SecretStr

from core.clock import ScaledClock
from core.settings import Settings

# Variables a parent may have that must not leak into the child's settings.
_OWN_PREFIXES = ("KAFKA_", "REDIS_", "DATABASE_", "CLOCK_")


def child_environment(settings: Settings, clock: ScaledClock | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[name.upper()] = value.isoformat() if hasattr(value, "isoformat") else str(value)
    if clock is not None:
        env["CLOCK_START"] = clock.start.isoformat()
        env["CLOCK_ANCHOR"] = repr(clock.anchor)
        env["CLOCK_SPEED"] = repr(clock.speed)
    return env

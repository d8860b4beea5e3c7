"""Running the real `algo` command in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Settings the developer's shell may carry; each test states the ones it needs.
SETTINGS_ENV_PREFIXES = ("KAFKA_", "REDIS_", "DATABASE_", "KITE_", "CLOCK_", "API_", "SIM_", "JWT_", "TOPIC_")
SETTINGS_ENV_NAMES = {"ENVIRONMENT", "ENCRYPTION_KEYS", "LOG_LEVEL", "WORKER_WEB_PORT"}

AlgoRunner = Callable[..., subprocess.CompletedProcess[str]]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(SETTINGS_ENV_PREFIXES) and name not in SETTINGS_ENV_NAMES
    }
    env.update(overrides)
    return env


@pytest.fixture
def algo(tmp_path: Path) -> AlgoRunner:
    """Run `algo ARGS` in a scratch directory (no .env, its own ./var) and capture its output."""

    def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=tmp_path,
            env=clean_env(COLUMNS="400", **env),  # tables wide enough not to wrap what tests look for
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run

"""A bad or missing setting ends a command with one line naming the setting, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from cli.entrypoints import module_present
from core.embedded import free_port
from core.kafka import ensure_topics
from tests.cli.conftest import AlgoRunner
from tests.fixtures.services import build_settings


def assert_one_line_error(result: object, *expected: str) -> None:
    code, stdout, stderr = result.returncode, result.stdout, result.stderr  # type: ignore[attr-defined]
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], lines[0]


def test_production_with_default_secrets_is_refused(algo: AlgoRunner) -> None:
    assert_one_line_error(algo("settings", ENVIRONMENT="production"), "JWT_SECRET", "production")


def test_production_with_default_encryption_key_is_refused(algo: AlgoRunner) -> None:
    result = algo("health", ENVIRONMENT="production", JWT_SECRET="x" * 40)
    assert_one_line_error(result, "ENCRYPTION_KEYS", "Fernet")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("API_PORT", "eighty", "API_PORT: Input should be a valid integer"),
        ("CLOCK_SPEED", "-3", "CLOCK_SPEED: Input should be greater than 0"),
        ("ENVIRONMENT", "staging", "ENVIRONMENT:"),
        ("JWT_SECRET", "short", "JWT_SECRET: must be at least 32 characters"),
    ],
)
def test_invalid_setting_names_itself(algo: AlgoRunner, name: str, value: str, expected: str) -> None:
    assert_one_line_error(algo("settings", **{name: value}), expected)


def test_secret_values_are_not_echoed(algo: AlgoRunner) -> None:
    result = algo("settings", JWT_SECRET="tiny-secret-value")
    assert_one_line_error(result, "JWT_SECRET")
    assert "tiny-secret-value" not in result.stderr


def test_unparseable_database_url(algo: AlgoRunner) -> None:
    assert_one_line_error(algo("migrate", DATABASE_URL="not a url"), "DATABASE_URL", "cannot parse")


def test_unreachable_database(algo: AlgoRunner) -> None:
    url = f"postgresql+asyncpg://algo@127.0.0.1:{free_port()}/algo"
    assert_one_line_error(algo("migrate", DATABASE_URL=url), "DATABASE_URL", "check the database is up")


def test_unreachable_redis_stops_a_service_before_it_starts(
    algo: AlgoRunner, kafka_bootstrap: str, database_url: str
) -> None:
    result = algo(
        "worker",
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        DATABASE_URL=database_url,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    # Kafka is up but its topics are not created in this test: that is named as well, in the same line.
    assert_one_line_error(result, "redis is down", "REDIS_URL")


def test_unreachable_kafka_for_topics(algo: AlgoRunner) -> None:
    result = algo("topics", "create", KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, "KAFKA_BOOTSTRAP", "no Kafka broker answers")


def test_missing_service_is_not_available_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import entrypoints

    monkeypatch.setitem(entrypoints.SERVICES, "ticker", "connectors.no_such_module:run")
    assert not entrypoints.module_present("ticker")
    with pytest.raises(entrypoints.NotAvailable, match="`algo ticker` is not available yet"):
        entrypoints.resolve("ticker")
    monkeypatch.setitem(entrypoints.SERVICES, "ticker", "core.settings:no_such_function")
    with pytest.raises(entrypoints.NotAvailable, match="core.settings:no_such_function"):
        entrypoints.resolve("ticker")


async def test_missing_service_through_the_cli(
    algo: AlgoRunner, kafka_bootstrap: str, database_url: str, redis_url: str, topic_prefix: str
) -> None:
    if module_present("ticker"):
        pytest.skip("connectors.ticker exists now")
    await ensure_topics(build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix))
    env = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "TOPIC_PREFIX": topic_prefix}
    result = algo("ticker", DATABASE_URL=database_url, REDIS_URL=redis_url, **env)
    assert_one_line_error(result, "`algo ticker` is not available yet")


def test_up_refuses_a_bad_setting_before_starting_anything(algo: AlgoRunner) -> None:
    result = algo("up", "--for", "1", "--no-health-table", ENVIRONMENT="production")
    assert_one_line_error(result, "JWT_SECRET")
    assert "kafka |" not in result.stdout  # no broker was started

"""The operator commands against real services: topics, health, settings, schemas, migrate."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from typer.main import get_command

from cli.main import app
from core.embedded import free_port
from core.kafka import ensure_topics
from schemas.events import EVENT_MODELS
from streams.topics import topic_specs
from tests.cli.conftest import AlgoRunner
from tests.fixtures.services import build_settings


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def broker_root() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_topics_create_makes_every_topic_with_its_partitions(
    algo: AlgoRunner, kafka_bootstrap: str, topic_prefix: str
) -> None:
    env = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "TOPIC_PREFIX": topic_prefix, "ORDERS_PARTITIONS": "3"}
    result = algo("topics", "create", **env)
    assert result.returncode == 0, result.stderr

    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, orders_partitions=3)
    expected = {spec.name: spec.partitions for spec in topic_specs(settings)}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(expected))
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == expected
    assert expected[f"{topic_prefix}orders"] == 3

    # Idempotent: a second run (another job, a restart) changes nothing and succeeds.
    assert algo("topics", "create", **env).returncode == 0
    listed = algo("topics", "list", **env)
    assert listed.returncode == 0
    assert f"{topic_prefix}strategy-lifecycle" in listed.stdout
    assert "missing" not in listed.stdout


async def test_health_exit_code_zero_when_all_up(
    algo: AlgoRunner, kafka_bootstrap: str, redis_url: str, database_url: str, broker_root: str, topic_prefix: str
) -> None:
    await ensure_topics(build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix))
    result = algo(
        "health",
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        TOPIC_PREFIX=topic_prefix,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        KITE_API_ROOT=broker_root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" up ") >= 4


def test_health_exit_code_one_with_the_reasons(algo: AlgoRunner, tmp_path: Path) -> None:
    port = free_port()
    result = algo(
        "health",
        KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
        KITE_API_ROOT=f"http://127.0.0.1:{port}",
    )
    assert result.returncode == 1
    flat = " ".join(result.stdout.split())  # the table wraps long reasons
    for needed in ("KAFKA_BOOTSTRAP", "REDIS_URL", "algo migrate", "KITE_API_ROOT"):
        assert needed in flat
    assert "Traceback" not in result.stderr


def test_settings_masks_secrets_and_passwords(algo: AlgoRunner) -> None:
    result = algo(
        "settings",
        JWT_SECRET="a-very-secret-jwt-signing-key-0123456789",
        DATABASE_URL="postgresql+asyncpg://algo:db-password@db:5432/algo",
    )
    assert result.returncode == 0, result.stderr
    assert "a-very-secret" not in result.stdout
    assert "db-password" not in result.stdout
    assert "JWT_SECRET" in result.stdout and "**********" in result.stdout
    assert "KAFKA_BOOTSTRAP" in result.stdout


def test_schemas_export_writes_every_event_model(algo: AlgoRunner, tmp_path: Path) -> None:
    result = algo("schemas", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for name in EVENT_MODELS:
        schema = json.loads((tmp_path / "out" / "events" / f"{name}.json").read_text())
        assert schema["title"] == name
    api_dir = tmp_path / "out" / "api"
    if Path("schemas/api.py").exists() or api_dir.exists():
        assert (api_dir / "RegisterRequest.json").exists()


def test_migrate_brings_a_fresh_sqlite_database_to_head(algo: AlgoRunner, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    result = algo("migrate", DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    assert "newest schema" in result.stdout


def test_every_service_has_a_command() -> None:
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    expected = {"up", "api", "worker", "scheduler", "ticker", "sim", "replay", "migrate", "topics", "schemas"}
    assert expected | {"health", "settings"} <= commands

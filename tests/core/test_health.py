"""Dependency health against real services, and "down, because ..." against closed or silent ports."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.embedded import free_port
from core.health import check_dependencies, mask_url
from core.kafka import ensure_topics
from storage.db import create_engine
from tests.fixtures.services import build_settings


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_root() -> Iterator[str]:
    """A web server that answers every request with 404: any HTTP answer means the broker is reachable."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_every_dependency_up(
    kafka_bootstrap: str, redis_url: str, database_url: str, http_root: str, topic_prefix: str
) -> None:
    settings = build_settings(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        database_url=database_url,
        kite_api_root=http_root,
        topic_prefix=topic_prefix,
    )
    await ensure_topics(settings)
    results = await check_dependencies(settings)
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(
        ("kafka", "redis", "database", "broker"), "up"
    ), results
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in results.values())
    assert "HTTP 404" in results["broker"].detail
    assert "migrations at head" in results["database"].detail


async def test_every_dependency_down_on_closed_ports() -> None:
    port = free_port()  # nothing listens there
    settings = build_settings(
        kafka_bootstrap=f"127.0.0.1:{port}",
        redis_url=f"redis://127.0.0.1:{port}/0",
        database_url=f"postgresql+asyncpg://nobody:secret-pw@127.0.0.1:{port}/none",
        kite_api_root=f"http://127.0.0.1:{port}",
    )
    results = await check_dependencies(settings, per_call_seconds=1.0)
    assert {r.status for r in results.values()} == {"down"}
    assert "KAFKA_BOOTSTRAP" in results["kafka"].detail
    assert "REDIS_URL" in results["redis"].detail
    assert "DATABASE_URL" in results["database"].detail
    assert "KITE_API_ROOT" in results["broker"].detail
    assert all(r.latency_ms is None for r in results.values())
    # Passwords never reach the operator's screen or the API's /health.
    assert "secret-pw" not in results["database"].detail


async def test_broker_that_never_answers_is_down_with_the_timeout(silent_port: int) -> None:
    settings = build_settings(kite_api_root=f"http://127.0.0.1:{silent_port}")
    results = await check_dependencies(settings, per_call_seconds=0.3, only=["broker"])
    assert list(results) == ["broker"]
    assert results["broker"].status == "down"
    assert "did not answer within 0.3s" in results["broker"].detail


async def test_kafka_without_topics_says_to_create_them(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    result = (await check_dependencies(settings, only=["kafka"]))["kafka"]
    assert result.status == "down"
    assert f"{topic_prefix}ticks" in result.detail
    assert "algo topics create" in result.detail


async def test_kafka_with_wrong_partition_counts_is_down(kafka_bootstrap: str, topic_prefix: str) -> None:
    await ensure_topics(build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix))
    expecting_more = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, orders_partitions=12)
    result = (await check_dependencies(expecting_more, only=["kafka"]))["kafka"]
    assert result.status == "down"
    assert f"{topic_prefix}orders has 8 (settings say 12)" in result.detail


async def test_unmigrated_database_says_to_migrate(tmp_path: object) -> None:
    settings = build_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    result = (await check_dependencies(settings, only=["database"]))["database"]
    assert result.status == "down"
    assert "algo migrate" in result.detail


async def test_database_behind_head_says_to_migrate(tmp_path: object) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    async with engine.begin() as connection:
        from sqlalchemy import text

        await connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        await connection.execute(text("INSERT INTO alembic_version VALUES ('0000_older')"))
    await engine.dispose()
    result = (await check_dependencies(build_settings(database_url=url), only=["database"]))["database"]
    assert result.status == "down"
    assert "at revision 0000_older" in result.detail


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql+asyncpg://algo:hunter2@db:5432/algo") == "postgresql+asyncpg://algo:***@db:5432/algo"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

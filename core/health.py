"""Dependency health: is each thing the stack leans on reachable, and if not, what should an operator do?

Used by the API's `GET /health`, by `algo health` and by the `algo up` health table. Every check runs
concurrently with a short timeout, so a dead dependency costs seconds, not a hung probe; a "down" always
carries a sentence naming the setting to fix or the command to run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from core.kafka import kafka_reachable
from core.settings import Settings
from streams.topics import topic_specs

DEFAULT_TIMEOUT_SECONDS = 3.0


class ComponentHealth(BaseModel):
    status: Literal["up", "down"]
    detail: str
    latency_ms: float | None


class _Down(Exception):
    """A check's verdict that the component is down; the message is what the operator reads."""


def mask_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and health output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _reason(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


async def kafka_unreachable_reason(bootstrap: str, per_call_seconds: float = 3.0) -> str | None:
    """None if a broker answers at `bootstrap`, else why not (aiokafka's own log lines are muted: the
    caller reports the reason once)."""
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        reason = await kafka_reachable(bootstrap, per_call_seconds)
    finally:
        aiokafka_log.setLevel(level)
    if reason is None:
        return None
    name = reason.split(":", 1)[0]
    return reason.replace(f"{name}: {name}: ", f"{name}: ")  # aiokafka repeats its class name


async def _kafka(settings: Settings, per_call_seconds: float) -> str:
    bootstrap = settings.kafka_bootstrap
    if (reason := await kafka_unreachable_reason(bootstrap, per_call_seconds)) is not None:
        raise _Down(f"no Kafka broker answers at {bootstrap} ({reason}); start Kafka or set KAFKA_BOOTSTRAP")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(per_call_seconds * 1000))
    try:
        await admin.start()
        specs = topic_specs(settings)
        existing = set(await admin.list_topics())
        missing = [spec.name for spec in specs if spec.name not in existing]
        if missing:
            raise _Down(f"topics missing: {', '.join(missing)}; run `algo topics create`")
        described = await admin.describe_topics([spec.name for spec in specs])
    finally:
        await admin.close()
    counts = {d["topic"]: len(d["partitions"]) for d in described}
    # Mismatched partition counts break the co-partitioned stop-loss join, so they count as down.
    wrong = [
        f"{spec.name} has {counts.get(spec.name)} (settings say {spec.partitions})"
        for spec in specs
        if counts.get(spec.name) != spec.partitions
    ]
    if wrong:
        raise _Down(f"partition counts differ: {'; '.join(wrong)}; recreate the topics or fix *_PARTITIONS")
    return f"{bootstrap}: {len(specs)} topics present"


async def _redis(settings: Settings, per_call_seconds: float) -> str:
    where = mask_url(settings.redis_url)
    try:
        client = Redis.from_url(
            settings.redis_url, socket_connect_timeout=per_call_seconds, socket_timeout=per_call_seconds
        )
    except ValueError as exc:
        raise _Down(f"REDIS_URL is not a valid redis:// URL ({exc})") from exc
    try:
        await client.ping()
    except AuthenticationError as exc:
        raise _Down(f"Redis at {where} refused the credentials; fix the password in REDIS_URL") from exc
    except (RedisError, OSError) as exc:
        raise _Down(f"no Redis answers at {where} ({_reason(exc)}); start Redis or set REDIS_URL") from exc
    finally:
        await client.aclose()
    return f"{where}: PING ok"


class _QuietMigrationContext(logging.Filter):
    """Drops the two INFO lines alembic logs whenever it opens a migration context: polled every second
    by `algo up`, they would bury the API's own log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


logging.getLogger("alembic.runtime.migration").addFilter(_QuietMigrationContext())


def _migration_state(connection: Connection) -> tuple[set[str], set[str]]:
    # Imported here: alembic pulls in a lot, and only this check (not every importer of core) needs it.
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.migrate import alembic_config

    current = set(MigrationContext.configure(connection).get_current_heads())
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    return current, heads


async def _database(settings: Settings, per_call_seconds: float) -> str:
    from storage.db import create_engine

    try:
        url = make_url(settings.database_url)
        engine = create_engine(settings.database_url)
    except (ArgumentError, ValueError) as exc:
        raise _Down(f"DATABASE_URL cannot be used ({_reason(exc)}); fix DATABASE_URL") from exc
    except ImportError as exc:
        raise _Down(f"DATABASE_URL names a driver that is not installed ({exc.name})") from exc
    where = url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            current, heads = await connection.run_sync(_migration_state)
    except (SQLAlchemyError, OSError) as exc:
        raise _Down(f"cannot use the database at {where} ({_reason(exc)}); fix DATABASE_URL") from exc
    finally:
        await engine.dispose()
    if current != heads:
        at = f"at revision {', '.join(sorted(current))}" if current else "not migrated"
        raise _Down(f"{where} is {at}, code expects {', '.join(sorted(heads))}; run `algo migrate`")
    return f"{where}: migrations at head"


async def _broker(settings: Settings, per_call_seconds: float) -> str:
    root = settings.kite_api_root
    try:
        async with httpx.AsyncClient(timeout=per_call_seconds) as client:
            response = await client.get(root)
    except httpx.TimeoutException as exc:
        raise _Down(f"broker API at {root} did not answer within {per_call_seconds:g}s; check KITE_API_ROOT") from exc
    except (httpx.HTTPError, OSError) as exc:
        raise _Down(
            f"cannot reach the broker API at {root} ({_reason(exc)}); "
            "start the simulator (`algo sim`) or set KITE_API_ROOT"
        ) from exc
    # Any HTTP answer means the broker is reachable: the root path itself is not an API endpoint.
    return f"{root}: HTTP {response.status_code}"


async def _timed(check: Callable[[], Awaitable[str]], per_call_seconds: float) -> ComponentHealth:
    started = time.perf_counter()
    try:
        # Twice the per-call timeout: a check may make two round trips (connect, then query).
        detail = await asyncio.wait_for(check(), per_call_seconds * 2)
    except _Down as exc:
        return ComponentHealth(status="down", detail=str(exc), latency_ms=None)
    except TimeoutError:
        return ComponentHealth(status="down", detail=f"no answer within {per_call_seconds * 2:g}s", latency_ms=None)
    return ComponentHealth(status="up", detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 1))


COMPONENTS = ("kafka", "redis", "database", "broker")


async def check_dependencies(
    settings: Settings, per_call_seconds: float = DEFAULT_TIMEOUT_SECONDS, only: Iterable[str] | None = None
) -> dict[str, ComponentHealth]:
    """Check kafka, redis, database and broker (or `only` those) concurrently; never raises for a
    dependency's failure."""
    every: dict[str, Callable[[], Awaitable[str]]] = {
        "kafka": lambda: _kafka(settings, per_call_seconds),
        "redis": lambda: _redis(settings, per_call_seconds),
        "database": lambda: _database(settings, per_call_seconds),
        "broker": lambda: _broker(settings, per_call_seconds),
    }
    wanted = set(COMPONENTS if only is None else only)
    checks = {name: check for name, check in every.items() if name in wanted}
    results = await asyncio.gather(*(_timed(check, per_call_seconds) for check in checks.values()))
    return dict(zip(checks, results, strict=True))


def all_up(components: dict[str, ComponentHealth]) -> bool:
    return all(component.status == "up" for component in components.values())

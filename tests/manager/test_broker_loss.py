"""The lost-broker detector on the real broker of the run (Apache Kafka; Tansu in `make pytest-tansu`).

Regression for a detector that read Apache Kafka's metadata as "no lifecycle topic" and re-ran recovery every
2 s on a healthy broker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import time
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy.ext.asyncio import AsyncEngine

from core.apache_kafka import TEST_CONFIG
from core.embedded import EmbeddedKafka
from core.kafka import ensure_topics
from manager.broker_loss import LifecycleWatch
from manager.strategy_manager import LIFECYCLE_TOPIC
from storage.db import session_factory
from tests.fixtures.services import build_settings
from tests.manager.test_recovery import running_strategy

pytestmark = [pytest.mark.tansu, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


@pytest_asyncio.fixture
async def watched(db_engine: AsyncEngine, kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[LifecycleWatch]:
    """The lifecycle topic created, a strategy holding a position, and the detector watching."""
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    await ensure_topics(settings)
    await running_strategy(db_engine, sell_time=time(15, 0), bought=True)
    watch = LifecycleWatch(settings, session_factory(db_engine), LIFECYCLE_TOPIC)
    try:
        yield watch
    finally:
        await watch.close()


async def publish(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        # Spread over keys (instruments) so every partition moves, in batches of one and of many.
        await asyncio.gather(*[await producer.send(topic, b"{}", key=f"NSE:S{i % 13}".encode()) for i in range(count)])
        await producer.send_and_wait(topic, b"{}", key=b"NSE:INFY")
    finally:
        await producer.stop()


async def test_a_healthy_broker_is_never_taken_for_a_lost_one(watched: LifecycleWatch, kafka_bootstrap: str) -> None:
    await publish(kafka_bootstrap, watched.topic, 1)
    for round_ in range(20):
        assert await watched.lost() is None, f"round {round_}"
        await publish(kafka_bootstrap, watched.topic, round_ * 7)
    ends = await watched.end_offsets()
    assert len(ends) == watched.settings.ticks_partitions and sum(ends.values()) > 0


async def test_a_recreated_topic_is_a_lost_broker(watched: LifecycleWatch, kafka_bootstrap: str) -> None:
    await publish(kafka_bootstrap, watched.topic, 60)
    assert await watched.lost() is None
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([watched.topic])
    finally:
        await admin.close()
    # Apache Kafka: no such topic; Tansu still lists its partitions, with nothing in them.
    assert await watched.lost() is not None
    # Recreated and written to again (new strategies started), but less than it held: still lost.
    for _ in range(50):
        try:
            await ensure_topics(watched.settings)
            break
        except Exception:  # noqa: BLE001 - the deletion completes asynchronously on the broker
            await asyncio.sleep(0.2)
    await publish(kafka_bootstrap, watched.topic, 5)
    reason = await watched.lost()
    assert reason is not None and "went back" in reason
    # Recovery republishes and rebases: healthy again.
    await watched.rebase()
    assert await watched.lost() is None


async def test_an_empty_topic_matters_only_while_strategies_run(
    db_engine: AsyncEngine, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    watch = LifecycleWatch(settings, session_factory(db_engine), LIFECYCLE_TOPIC)
    try:
        assert await watch.lost() is None  # no topic, nothing running: a fresh system
        await ensure_topics(settings)
        assert await watch.lost() is None
        await running_strategy(db_engine, sell_time=time(15, 0), bought=False)
        reason = await watch.lost()
        assert reason is not None and "empty while strategies run" in reason
    finally:
        await watch.close()


async def test_a_broker_restarted_empty_is_a_lost_broker(db_engine: AsyncEngine, tmp_path: Path) -> None:
    broker = EmbeddedKafka(tmp_path / "kafka", engine=os.environ.get("TEST_KAFKA", "auto"), config=TEST_CONFIG)
    await asyncio.to_thread(broker.start)
    settings = build_settings(kafka_bootstrap=broker.bootstrap)
    await running_strategy(db_engine, sell_time=time(15, 0), bought=True)
    watch = LifecycleWatch(settings, session_factory(db_engine), LIFECYCLE_TOPIC)
    try:
        await ensure_topics(settings)
        await publish(broker.bootstrap, settings.topic(LIFECYCLE_TOPIC), 40)
        assert await watch.lost() is None
        await watch.close()  # its connections die with the broker
        broker.kill()
        await asyncio.to_thread(broker.start)  # the same port, empty
        await ensure_topics(settings)  # as `algo worker` does when it starts
        await publish(broker.bootstrap, settings.topic(LIFECYCLE_TOPIC), 3)
        reason = await watch.lost()
        assert reason is not None and "went back" in reason
    finally:
        await watch.close()
        broker.stop()

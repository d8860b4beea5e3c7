"""EventProducer asks for an idempotent producer: Apache Kafka grants it, Tansu refuses it (see
docs/delivery-guarantees.md)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from core.embedded import EmbeddedKafka, EmbeddedUnavailable, kafka_engine
from core.kafka import EventProducer, ensure_topics
from schemas.events import TimeEvent
from tests.fixtures.services import build_settings


def _event() -> TimeEvent:
    return TimeEvent.model_validate(
        {"strategy_id": 7, "user_id": 1, "run": 1, "action": "BUY", "instrument": "NSE:INFY", "quantity": 1,
         "trading_day": "2025-01-15", "due_at": "2025-01-15T09:30:00+05:30", "fired_at": "2025-01-15T09:29:50+05:30"}
    )  # fmt: skip


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        broker = EmbeddedKafka(tmp_path_factory.mktemp("tansu"), engine="tansu")
        broker.start(timeout=60.0)
    except EmbeddedUnavailable as exc:
        pytest.skip(f"no Tansu here: {exc}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


async def _published_once(bootstrap: str, prefix: str, mode: str) -> EventProducer:
    settings = build_settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, kafka_idempotent_producer=mode)
    await ensure_topics(settings)
    producer = EventProducer(settings)
    await producer.start()
    try:
        await producer.publish("time-events", 7, _event())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(settings.topic("time-events"), bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    try:
        records: list[bytes] = []
        async with asyncio.timeout(20):
            while not records:
                batches = await consumer.getmany(timeout_ms=500)
                records.extend(r.value or b"" for rs in batches.values() for r in rs)
        assert len(records) == 1 and TimeEvent.model_validate_json(records[0]).strategy_id == 7
    finally:
        await consumer.stop()
    return producer


async def test_the_producer_is_idempotent_on_apache_kafka(kafka_bootstrap: str, topic_prefix: str) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP") or kafka_engine(os.environ.get("TEST_KAFKA", "auto"))[0] != "apache":
        pytest.skip("the session's broker is not the embedded Apache Kafka")
    producer = await _published_once(kafka_bootstrap, topic_prefix, "on")
    assert producer.idempotent


async def test_auto_falls_back_to_a_plain_producer_where_the_broker_refuses(tansu: str, topic_prefix: str) -> None:
    producer = await _published_once(tansu, topic_prefix, "auto")
    assert not producer.idempotent


async def test_on_refuses_to_start_where_the_broker_refuses(tansu: str, topic_prefix: str) -> None:
    producer = EventProducer(build_settings(kafka_bootstrap=tansu, topic_prefix=topic_prefix,
                                            kafka_idempotent_producer="on"))  # fmt: skip
    with pytest.raises(KafkaError):
        await producer.start()
    assert not producer.idempotent

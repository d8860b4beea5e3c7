"""The worker's start order: intents flow before the Faust app has joined its group and recovered its tables
(about 3 s after a restart), so a stop crossed while the worker was down is not held up by Faust."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from core.kafka import ensure_topics
from manager.recovery import MARKER_KEY, Recovery, RecoveryReport
from schemas.events import Action, OrderIntent, TimeEvent, intent_id_for
from streams.worker import worker_process
from tests.fixtures.services import build_settings

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def test_the_service_started_before_the_app_turns_time_events_into_intents_on_its_own(
    kafka_bootstrap: str, redis_url: str, database_url: str, topic_prefix: str
) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, database_url=database_url,
                              topic_prefix=topic_prefix, kafka_session_timeout_seconds=3)  # fmt: skip
    await ensure_topics(settings)
    worker = worker_process(settings)
    first, *rest = list(worker.on_init_dependencies())
    assert rest == [worker.app], "the Faust app must start last, after the worker's own service"

    orders = AIOKafkaConsumer(
        settings.topic("orders"), bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=None
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await orders.start()
    await producer.start()
    await first.start()  # the app itself is never started in this test
    try:
        now = datetime.now(UTC)
        due = TimeEvent(strategy_id=7, user_id=3, run=1, action=Action.BUY, instrument="NSE:INFY", quantity=2,
                        trading_day=date(2026, 11, 24), due_at=now, fired_at=now)  # fmt: skip
        await producer.send_and_wait(settings.topic("time-events"), due.model_dump_json().encode(), key=b"7")
        async with asyncio.timeout(30):
            record = await orders.getone()
        intent = OrderIntent.model_validate_json(record.value or b"")
        assert intent.intent_id == intent_id_for(7, date(2026, 11, 24), 1, Action.BUY)
        assert not worker.app.started
    finally:
        await first.stop()
        await producer.stop()
        await orders.stop()


async def test_a_failed_recovery_at_start_is_retried_before_the_app_is_up(
    kafka_bootstrap: str, redis: Redis, redis_url: str, database_url: str, topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Regression for crash-matrix seed 25: the first recovery of a worker restarted with the Kafka broker
    failed on the new broker, and the next try waited for the app's timer, which only runs once Faust is
    ready: 5.5 s with the Redis keys missing, and a stop crossed meanwhile exited late."""
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, database_url=database_url,
                              topic_prefix=topic_prefix, kafka_session_timeout_seconds=3)  # fmt: skip
    await ensure_topics(settings)
    real_ensure = Recovery.ensure
    tries = 0
    recovered = asyncio.Event()

    async def failing_once(self: Recovery) -> RecoveryReport | None:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise KafkaError("what the restarted broker answered first")
        report = await real_ensure(self)
        recovered.set()
        return report

    monkeypatch.setattr(Recovery, "ensure", failing_once)
    worker = worker_process(settings)
    first, *_ = list(worker.on_init_dependencies())
    await first.start()  # the app, and so its timer, never starts in this test
    try:
        async with asyncio.timeout(30):
            await recovered.wait()
        assert tries == 2
        assert await redis.exists(MARKER_KEY)  # Redis rebuilt: recovery ran to its end on the second try
        assert not worker.app.started
    finally:
        await first.stop()

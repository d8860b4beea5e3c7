"""The tick feed says when it reads late: a stop is checked no earlier than its tick is read."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from core.kafka import ensure_topics
from streams import tick_feed
from streams.tick_feed import Lateness, TickFeed
from tests.fixtures.services import build_settings


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "behind" in r.getMessage()]


def test_a_late_batch_is_warned_about_at_most_once_per_period_with_the_worst_since(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.tick_feed")
    lateness = Lateness(late_after_ms=1000, every_seconds=30)

    lateness.observe(oldest_created_ms=10_000, now_ms=10_900, now=0.0)  # 900 ms: in time
    assert _warnings(caplog) == []

    lateness.observe(oldest_created_ms=10_000, now_ms=11_500, now=1.0)
    lateness.observe(oldest_created_ms=10_000, now_ms=14_000, now=2.0)  # 4 s, but warned a second ago
    lateness.observe(oldest_created_ms=20_000, now_ms=21_200, now=31.5)
    warned = _warnings(caplog)
    assert len(warned) == 2 and lateness.warnings == 2
    assert "1500 ms behind" in warned[0]
    assert "1200 ms behind" in warned[1] and "worst since the last warning: 4000 ms" in warned[1]


def test_the_backlog_read_after_a_start_is_not_warned_about_until_the_feed_has_caught_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.tick_feed")
    lateness = Lateness(late_after_ms=1000, every_seconds=30, catch_up_seconds=20)

    lateness.observe(oldest_created_ms=0, now_ms=2_500, now=100.0)  # the backlog published while it started
    lateness.observe(oldest_created_ms=0, now_ms=1_800, now=101.0)
    assert _warnings(caplog) == [] and not lateness.caught_up
    lateness.observe(oldest_created_ms=0, now_ms=50, now=102.0)  # caught up: lateness is news from now on
    lateness.observe(oldest_created_ms=0, now_ms=1_300, now=103.0)
    assert lateness.warnings == 1 and "1300 ms behind" in _warnings(caplog)[0]


def test_a_feed_that_never_catches_up_is_warned_about_once_its_catch_up_time_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.tick_feed")
    lateness = Lateness(late_after_ms=1000, every_seconds=30, catch_up_seconds=20)

    lateness.observe(oldest_created_ms=0, now_ms=3_000, now=0.0)
    lateness.observe(oldest_created_ms=0, now_ms=3_000, now=19.0)
    assert lateness.warnings == 0
    lateness.observe(oldest_created_ms=0, now_ms=3_000, now=20.0)
    assert lateness.warnings == 1


@pytest.mark.tansu
async def test_the_feed_warns_of_a_tick_read_long_after_it_was_published(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.tick_feed")
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, ticks_partitions=1)
    await ensure_topics(settings)
    read: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            read.put_nowait(record.value)  # type: ignore[arg-type]

    feed = TickFeed(settings, handle)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await feed.start()
    await producer.start()
    try:
        feed.follow({0})
        await producer.send_and_wait(settings.topic("ticks"), b'{"fresh": 1}', key=b"NSE:INFY")
        async with asyncio.timeout(20):
            assert await read.get() == b'{"fresh": 1}'
        assert feed.lateness.warnings == 0  # in time, or late as a start-up backlog is (not warned about)
        feed.lateness.caught_up = True  # past the start-up grace (tested above on its own), on a loaded machine too

        published_at_ms = int(time.time() * 1000) - 5_000  # as if the feed were five seconds behind
        await producer.send_and_wait(
            settings.topic("ticks"), b'{"late": 1}', key=b"NSE:INFY", timestamp_ms=published_at_ms
        )
        async with asyncio.timeout(20):
            assert await read.get() == b'{"late": 1}'
        assert feed.lateness.warnings == 1
        assert any("stop-losses are checked that late" in message for message in _warnings(caplog))
    finally:
        await producer.stop()
        await feed.stop()


@pytest.mark.tansu
async def test_a_released_partition_is_taken_over_where_its_checks_ended(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebalance awaits `release`: the ticks checked so far are committed by then, so the next owner
    checks none of them again (no periodic commit helps here: its period is set beyond the test)."""
    monkeypatch.setattr(tick_feed, "COMMIT_SECONDS", 3600.0)
    caplog.set_level(logging.INFO, logger="streams.tick_feed")
    settings = build_settings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, ticks_partitions=1, tick_feed_audit=True
    )
    await ensure_topics(settings)
    first: asyncio.Queue[bytes] = asyncio.Queue()
    second: asyncio.Queue[bytes] = asyncio.Queue()

    async def check_first(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            first.put_nowait(record.value)  # type: ignore[arg-type]

    async def check_second(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            second.put_nowait(record.value)  # type: ignore[arg-type]

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    old_owner, new_owner = TickFeed(settings, check_first), TickFeed(settings, check_second)
    await producer.start()
    await old_owner.start()
    await new_owner.start()
    try:
        old_owner.follow({0})
        for n in range(5):
            await producer.send_and_wait(settings.topic("ticks"), b'{"n": %d}' % n, key=b"NSE:INFY")
        async with asyncio.timeout(20):
            for _ in range(5):
                await first.get()
        await old_owner.release()
        assert old_owner.partitions == set()
        new_owner.follow({0})
        await producer.send_and_wait(settings.topic("ticks"), b'{"n": 5}', key=b"NSE:INFY")
        async with asyncio.timeout(20):
            taken_over = await second.get()
        assert taken_over == b'{"n": 5}', "the new owner checked again ticks the old one had checked"
        audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith(tick_feed.AUDIT_LINE)]
        assert audit and all("partition 0 offsets" in line for line in audit)
    finally:
        await producer.stop()
        await old_owner.stop()
        await new_owner.stop()

"""The consumer of `time-events` and `orders`: offsets never pass an unfinished intent (real Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer

from core.kafka import ensure_topics
from core.settings import Settings
from streams.intent_feed import IntentFeed, PartitionProgress
from tests.fixtures.services import build_settings


def test_progress_commits_only_up_to_the_oldest_unfinished_record() -> None:
    progress = PartitionProgress()
    for offset in (10, 11, 12, 13):
        progress.started(offset)
    progress.finished(12)
    progress.finished(13)
    assert progress.safe is None  # 10 and 11 are still in flight: a restart must re-read them
    progress.finished(10)
    assert progress.safe == 11
    progress.finished(11)
    assert (progress.safe, progress.in_flight) == (14, 0)


def feed_settings(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, orders_partitions=1,
                          kafka_session_timeout_seconds=3)  # fmt: skip


class Recorder:
    """Holds every intent it is given; the test decides which ones are done."""

    def __init__(self) -> None:
        self.intents: dict[bytes, Callable[[], None]] = {}
        self.time_events: list[bytes] = []
        self.changed = asyncio.Event()

    async def on_intent(self, value: bytes, done: Callable[[], None]) -> None:
        self.intents[value] = done
        self.changed.set()

    async def on_time_events(self, values: list[bytes]) -> None:
        self.time_events.extend(values)
        self.changed.set()

    async def until(self, condition: Callable[[], bool], within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.tansu
async def test_a_takeover_rereads_the_intent_still_in_flight_and_nothing_finished(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Intents finish out of order (one lane per strategy). A worker that dies with intent 0 in flight and
    intents 1-4 finished must leave intent 0, and only what follows it, for the next worker: committing
    past it (as Faust does with out-of-order acknowledgements) would lose it, a missed exit."""
    settings = feed_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for n in range(5):
            await producer.send_and_wait(settings.topic("orders"), f"intent-{n}".encode(), key=b"7")
        await producer.send_and_wait(settings.topic("time-events"), b"buy-7", key=b"7")
    finally:
        await producer.stop()

    first = Recorder()
    feed = IntentFeed(settings, first.on_time_events, first.on_intent)
    await feed.start()
    try:
        await first.until(lambda: len(first.intents) == 5 and first.time_events == [b"buy-7"])
        for n in range(1, 5):
            first.intents[f"intent-{n}".encode()]()
        await feed.commit()
    finally:
        await feed.stop()  # dies with intent-0 unfinished

    second = Recorder()
    takeover = IntentFeed(settings, second.on_time_events, second.on_intent)
    await takeover.start()
    try:
        await second.until(lambda: len(second.intents) == 5)
        # From intent-0 on: nothing before it was skipped; the time event, finished, is not read again.
        assert sorted(second.intents) == [f"intent-{n}".encode() for n in range(5)]
        assert second.time_events == []
        for done in second.intents.values():
            done()
        await takeover.commit()
    finally:
        await takeover.stop()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("orders"), b"marker", key=b"7")
    finally:
        await producer.stop()
    third = Recorder()
    after_all = IntentFeed(settings, third.on_time_events, third.on_intent)
    await after_all.start()
    try:
        await third.until(lambda: b"marker" in third.intents)
        assert list(third.intents) == [b"marker"]  # everything finished before it stays finished
    finally:
        await after_all.stop()

"""Kafka plumbing shared by every service: topic creation and a JSON event producer (aiokafka)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from core.settings import Settings
from schemas.events import Event
from streams.topics import faust_internal_topics, topic_specs

log = logging.getLogger(__name__)

CONSUMER_STOP_SECONDS = 3.0


async def stop_consumer(
    consumer: AIOKafkaConsumer | None,
    loops: Iterable[asyncio.Task[None]],
    final_commit: Callable[[], Awaitable[None]] | None,
) -> None:
    """Stop a consumer's loops, commit what they finished and leave the group, within a bound: a service
    that stops because its launcher died must not outlive it (a commit to a broker that is gone as well
    waits out the client's request timeout). An offset not committed here is read again: at least once."""
    loops = list(loops)
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    try:
        async with asyncio.timeout(CONSUMER_STOP_SECONDS):
            if final_commit is not None:
                await final_commit()
            if consumer is not None:
                await consumer.stop()
    except TimeoutError:
        log.warning("Kafka consumer not stopped within %.0fs (is the broker gone?): leaving", CONSUMER_STOP_SECONDS)


async def ensure_topics(settings: Settings, wait_seconds: float = 30.0) -> dict[str, int]:
    """Create every topic with its partition count; returns name -> partitions as the broker reports."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(wait_seconds * 1000))
    await admin.start()
    try:
        specs = topic_specs(settings)
        existing = set(await admin.list_topics())
        missing = [NewTopic(s.name, s.partitions, 1) for s in specs if s.name not in existing]
        missing += [
            NewTopic(name, partitions, 1, topic_configs=config)
            for name, (partitions, config) in faust_internal_topics(settings).items()
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another service created them first
        # Created is not yet known to every metadata request: wait (bounded) until each topic has partitions, so
        # whatever starts next (a health check, a Faust app) finds them all.
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            described = await admin.describe_topics([s.name for s in specs])
            counts = {d["topic"]: len(d["partitions"]) for d in described if not d["error_code"]}
            if all(counts.get(s.name) for s in specs) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        for spec in specs:
            if counts.get(spec.name) != spec.partitions:
                log.warning(
                    "topic %s has %s partitions, settings say %s",
                    spec.name,
                    counts.get(spec.name),
                    spec.partitions,
                )
        return counts
    finally:
        await admin.close()


async def kafka_reachable(bootstrap: str, wait_seconds: float = 3.0) -> str | None:
    """None if a broker answers metadata requests, else the reason."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(wait_seconds * 1000))
    try:
        await asyncio.wait_for(admin.start(), wait_seconds)
        await asyncio.wait_for(admin.list_topics(), wait_seconds)
        return None
    except (TimeoutError, KafkaConnectionError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        await admin.close()


class EventProducer:
    """Publishes schema'd events as JSON. acks=all: an acknowledged event survives a broker failover."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: AIOKafkaProducer | None = None

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._client is None:
            raise RuntimeError("EventProducer used before start()")
        return self._client

    async def start(self) -> None:
        # Built here, not in __init__: aiokafka binds to the running loop (nothing at import or build time).
        self._client = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            linger_ms=2,
            # Tansu refuses idempotent producers; at-least-once plus idempotent consumers instead.
            enable_idempotence=False,
        )
        await self._client.start()

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.stop()
            self._client = None

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(self, topic: str, key: str | int, event: Event) -> None:
        """Send and wait for the broker's acknowledgement."""
        await self._producer.send_and_wait(
            self.settings.topic(topic), value=event.model_dump_json().encode(), key=str(key).encode()
        )

    async def publish_nowait(self, topic: str, key: str | int, event: Event) -> asyncio.Future[object]:
        """Queue for sending; await the returned future to know it was acknowledged."""
        return await self._producer.send(
            self.settings.topic(topic), value=event.model_dump_json().encode(), key=str(key).encode()
        )

"""stop_consumer: a stopping service does not wait on a broker that is gone."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer

from core import kafka
from core.kafka import stop_consumer


class BrokerGone:
    """Stands in for an AIOKafkaConsumer whose broker died with the launcher: committing and leaving the
    group wait out the client's request timeout (40 s by default), which a test should not sit through."""

    def __init__(self) -> None:
        self.stop_called = False

    async def stop(self) -> None:
        self.stop_called = True
        await asyncio.Event().wait()


async def test_a_consumer_whose_broker_is_gone_is_left_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "CONSUMER_STOP_SECONDS", 0.5)
    consumer = BrokerGone()
    committed: list[str] = []

    async def commit_to_nobody() -> None:
        committed.append("tried")
        await asyncio.Event().wait()

    async def consume_for_ever() -> None:
        await asyncio.Event().wait()

    loop_task = asyncio.create_task(consume_for_ever())
    began = time.monotonic()
    await stop_consumer(cast(AIOKafkaConsumer, consumer), [loop_task], commit_to_nobody)
    assert time.monotonic() - began < 2.0
    assert loop_task.cancelled()
    assert committed == ["tried"]  # the final commit is attempted; only the wait on it is bounded

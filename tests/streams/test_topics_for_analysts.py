"""The topics as an analyst reads them: `kcat` and a `confluent-kafka` consumer group (librdkafka, not the
project's own client) on the suite's Apache Kafka, after a real trade, every value validated against the
JSON Schemas that `algo schemas export` ships."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from cli.main import app
from core.clock import ScaledClock
from schemas.events import Tick
from streams.topics import topic_specs
from tests.fixtures.pipeline import Pipeline
from tests.streams.test_pipeline_e2e import bought_strategy, eventually, placements

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def exported_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["schemas", "export", str(folder)])
    assert result.exit_code == 0, result.output
    return {path.stem: json.loads(path.read_text()) for path in (folder / "events").glob("*.json")}


def kcat_binary() -> str:
    found = shutil.which("kcat")
    if found is None:
        if os.environ.get("TEST_REQUIRE_KCAT") == "1":
            pytest.fail("kcat is required (TEST_REQUIRE_KCAT=1): run scripts/install-services")
        pytest.skip("no kcat: run scripts/install-services (Debian's kcat)")
    return found


async def trade(client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any,
                pipeline: Pipeline, clock: ScaledClock) -> None:  # fmt: skip
    """One strategy bought on its time event and sold by its stop: every topic gets real events."""
    user, _ = await bought_strategy(client, make_user, make_strategy, simulator, pipeline, clock,
                                    symbol="NSE:SBIN", price=800.0, stop=790)  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
    await producer.start()
    try:
        for price in (795.0, 789.5):
            simulator.state.set_price("NSE:SBIN", price)
            tick = Tick(instrument="NSE:SBIN", token=779521, last_price=price, volume=1, received_at=clock.now())
            await producer.send_and_wait(pipeline.settings.topic("ticks"), tick.model_dump_json().encode(),
                                         key=b"NSE:SBIN")  # fmt: skip
    finally:
        await producer.stop()
    await eventually(lambda: len(placements(simulator, user.broker.api_key)) >= 2, 15, "STOPLOSS exit", pipeline)

    async def notified() -> bool:
        listed = (await client.get("/notifications", headers=user.headers)).json()
        items = listed["notifications"] if isinstance(listed, dict) else listed
        return len(items) >= 2

    await eventually(notified, 10, "the trader's notifications", pipeline)


async def test_kcat_and_a_confluent_consumer_group_read_every_topic_and_each_value_fits_its_schema(
    client: httpx.AsyncClient, make_user: Any, make_strategy: Any, simulator: Any, pipeline: Pipeline,
    pinned_clock: ScaledClock, tmp_path: Path,
) -> None:  # fmt: skip
    from confluent_kafka import Consumer

    kcat = kcat_binary()
    schemas = exported_schemas(tmp_path / "schemas")
    specs = {spec.name: spec for spec in topic_specs(pipeline.settings)}
    await trade(client, make_user, make_strategy, simulator, pipeline, pinned_clock)
    bootstrap = pipeline.settings.kafka_bootstrap

    # kcat: each topic from the beginning to its end, as an analyst's shell one-liner would (-J: an envelope
    # with the key and the value per line).
    read_by_kcat: dict[str, int] = {}
    for name, spec in specs.items():
        done = await asyncio.to_thread(
            subprocess.run, [kcat, "-b", bootstrap, "-C", "-t", name, "-o", "beginning", "-e", "-J", "-q"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        envelopes = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        for envelope in envelopes:
            jsonschema.validate(json.loads(envelope["payload"]), schemas[spec.value.__name__])
            assert envelope["key"], f"{name}: every record is keyed ({spec.key})"
        read_by_kcat[name] = len(envelopes)
    assert all(read_by_kcat.values()), f"every topic has events after a trade: {read_by_kcat}"

    # A consumer group, subscribed to every topic: the group join and the assignment are the broker's.
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"analyst-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }  # fmt: skip
    )
    read_by_group = dict.fromkeys(specs, 0)

    def poll_all() -> None:
        consumer.subscribe(list(specs))
        deadline = time.monotonic() + 60
        while read_by_group != read_by_kcat and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            spec = specs[message.topic()]
            jsonschema.validate(orjson.loads(message.value()), schemas[spec.value.__name__])
            read_by_group[message.topic()] += 1

    try:
        await asyncio.to_thread(poll_all)
    finally:
        consumer.close()
    assert read_by_group == read_by_kcat

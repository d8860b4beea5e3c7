from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from connectors.replay import ReplayFileError, read_ticks, replay
from core.kafka import ensure_topics
from tests.fixtures.services import build_settings


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("timestamp,instrument,last_price,volume\n" + "\n".join(rows) + "\n")
    return path


async def test_replay_publishes_every_tick_keyed_by_instrument(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, ticks_partitions=2)
    await ensure_topics(settings)
    rows = [
        f"2025-01-15T10:00:{i % 60:02d},NSE:{'INFY' if i % 2 else 'TCS'},{1500 + i / 20:.2f},{i}" for i in range(500)
    ]
    count, rate = await replay(settings, write_csv(tmp_path / "ticks.csv", rows), None, show_progress=False)
    assert count == 500 and rate > 0

    consumer = AIOKafkaConsumer(
        settings.topic("ticks"), bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: list[tuple[bytes, dict[str, object]]] = []
    try:
        while len(seen) < 500:
            batches = await consumer.getmany(timeout_ms=2000)
            assert batches, f"only {len(seen)} ticks arrived"
            for batch in batches.values():
                seen.extend((r.key, orjson.loads(r.value)) for r in batch)
    finally:
        await consumer.stop()
    assert {key for key, _ in seen} == {b"NSE:INFY", b"NSE:TCS"}
    assert all(value["instrument"] == key.decode() for key, value in seen)
    infy = [value["last_price"] for key, value in seen if key == b"NSE:INFY"]
    assert infy == sorted(infy)  # one instrument's ticks keep their order (one partition)


def test_jsonl_and_errors_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "t.jsonl"
    good.write_text('{"timestamp": 1736915400, "instrument": "NSE:INFY", "last_price": 1500.5}\n')
    assert [t.last_price for t in read_ticks(good)] == [1500.5]
    bad = write_csv(tmp_path / "bad.csv", ["2025-01-15T10:00:00,INFY,1500"])
    with pytest.raises(ReplayFileError, match="bad.csv line 2: instrument 'INFY' must be EXCHANGE:SYMBOL"):
        list(read_ticks(bad))
    missing = tmp_path / "missing.csv"
    missing.write_text("timestamp,instrument\n2025-01-15T10:00:00,NSE:INFY\n")
    with pytest.raises(ReplayFileError, match="missing column 'last_price'"):
        list(read_ticks(missing))

"""The Faust tables' changelogs exist, with their source topic's partitions, before any Faust service starts."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient

from core.kafka import ensure_topics
from streams.topics import changelog_topics
from tests.fixtures.services import build_settings


async def test_ensure_topics_creates_every_changelog_with_its_source_partitions(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, ticks_partitions=3)
    await ensure_topics(settings)
    await ensure_topics(settings)  # a second service starting finds them there
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(changelog_topics(settings)))
    finally:
        await admin.close()
    counts = {d["topic"]: len(d["partitions"]) for d in described}
    assert counts == {
        f"{topic_prefix}algo-worker-armed-stops-changelog": 3,
        f"{topic_prefix}algo-scheduler-scheduled-jobs-changelog": 3,
    }

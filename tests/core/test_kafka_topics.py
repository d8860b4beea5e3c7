"""`ensure_topics` creates the Faust apps' own topics too, before any Faust app starts.

Left to Faust, a table's changelog is created at start and, under load, the first lifecycle event can arrive
before the producer knows its partitions: the agent crashed with PartitionsMismatch and the strategy's START
was lost (its BUY never fired)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from core.kafka import ensure_topics
from streams.topics import faust_internal_topics
from tests.fixtures.services import build_settings


async def test_the_faust_changelogs_exist_with_their_tables_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, ticks_partitions=3)
    await ensure_topics(settings)
    wanted = faust_internal_topics(settings)
    assert f"{topic_prefix}algo-scheduler-scheduled-jobs-changelog" in wanted
    assert f"{topic_prefix}algo-worker-armed-stops-changelog" in wanted
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(wanted))
        assert {d["topic"]: len(d["partitions"]) for d in described} == {n: p for n, (p, _) in wanted.items()}
        changelog = f"{topic_prefix}algo-worker-armed-stops-changelog"
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, changelog)])
        entries = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        assert entries["cleanup.policy"] == "compact"
    finally:
        await admin.close()

"""Faust apps are built explicitly from Settings; nothing touches the event loop at import time."""

from __future__ import annotations

import faust

from core.settings import Settings
from streams.transport import register as register_transport


def build_faust_app(settings: Settings, name: str) -> faust.App:
    scheme = register_transport(settings.kafka_lifecycle_fetch_max_wait_ms)
    brokers = ";".join(f"{scheme}://{host}" for host in settings.kafka_bootstrap.split(","))
    session_timeout = settings.kafka_session_timeout_seconds
    return faust.App(
        settings.topic(name),
        broker=brokers,
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.ticks_partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,  # Faust declares its own changelog topics; ours exist already
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=max(session_timeout / 6, 0.5),
        broker_rebalance_timeout=session_timeout,
        broker_commit_interval=0.5,
        stream_wait_empty=False,
    )


def raw_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    """Our topics carry JSON bytes that the agents decode with the pydantic models themselves."""
    return app.topic(name, key_type=bytes, value_type=bytes, partitions=partitions, value_serializer="raw",
                     key_serializer="raw")  # fmt: skip

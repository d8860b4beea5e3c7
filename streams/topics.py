"""Topic names, keys and partition counts: the analysts' contract (DESIGN.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings
from schemas.events import (
    Event,
    OrderIntent,
    OrderResult,
    StrategyLifecycle,
    Tick,
    TimeEvent,
    UserNotification,
)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: type[Event]
    partitions: int


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """All topics, created up front: Faust fails on partition mismatches, so counts are fixed here.

    `ticks` and `strategy-lifecycle` share a key (instrument) and a partition count: the stop-loss
    join reads both co-partitioned.
    """
    t = settings.topic
    return [
        TopicSpec(t("ticks"), "instrument", Tick, settings.ticks_partitions),
        TopicSpec(t("strategy-lifecycle"), "instrument", StrategyLifecycle, settings.ticks_partitions),
        TopicSpec(t("time-events"), "strategy id", TimeEvent, settings.orders_partitions),
        TopicSpec(t("orders"), "strategy id", OrderIntent, settings.orders_partitions),
        TopicSpec(t("order-results"), "strategy id", OrderResult, settings.orders_partitions),
        TopicSpec(t("notifications"), "user id", UserNotification, settings.events_partitions),
    ]


# The Faust apps' own topics (their tables' changelogs and the assignor's leader topic). Faust creates them itself
# when it starts, but under load its producer may not yet know the new changelog's partitions when the first
# lifecycle event arrives: the agent then crashes with PartitionsMismatch and that event (a strategy's START)
# is lost. Created up front with the rest, they exist before Faust looks for them.
FAUST_TABLES = {"algo-worker": "armed-stops", "algo-scheduler": "scheduled-jobs"}


def faust_internal_topics(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    """name -> (partitions, topic config) of the Faust apps' changelog and assignor topics."""
    topics: dict[str, tuple[int, dict[str, str]]] = {}
    for app, table in FAUST_TABLES.items():
        app_id = settings.topic(app)
        topics[f"{app_id}-{table}-changelog"] = (settings.ticks_partitions, {"cleanup.policy": "compact"})
        topics[f"{app_id}-__assignor-__leader"] = (1, {})
    return topics

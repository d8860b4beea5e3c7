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


def changelog_topics(settings: Settings) -> dict[str, int]:
    """The Faust tables' changelog topics (name -> partitions), created up front beside ours.

    Faust declares them itself when a service starts, but checks a table's changelog against its source topic
    in the consumer's metadata snapshot of the group join. A changelog created in that same moment can be in
    the snapshot with 0 partitions (no leader elected yet); the agent then crashes on PartitionsMismatch at
    every restart until the next rebalance (the crash matrix saw a scheduler register no job for 20 s so, on
    a loaded machine, and miss every BUY of the day). Created with the topics, they exist well before that.
    """
    return {
        f"{settings.topic('algo-worker')}-armed-stops-changelog": settings.ticks_partitions,
        f"{settings.topic('algo-scheduler')}-scheduled-jobs-changelog": settings.ticks_partitions,
    }

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

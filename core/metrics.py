"""Every Prometheus series the services export, in one place, and how each service serves them.

Names follow Prometheus conventions (`algo_` prefix, base units, `_total` for counters, `_seconds` for
durations). No label ever carries a user id, a strategy id, an order id or a secret: labels are small closed
sets (an action, an outcome, a broker call's name, a consumer group), so the series count stays bounded.

A service that runs several processes behind one endpoint (e.g. the API under a process manager) sets
PROMETHEUS_MULTIPROC_DIR, as prometheus_client documents; the exposition then merges every process's values.
Each worker, the scheduler and the tick connector is one process serving its own port (`*_METRICS_PORT`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latencies on the order path span a few ms (a broker call to the simulator) to seconds (a timeout, a retry).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How late something happens after it was due: mostly below a second, and what matters is whether it is.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# --- orders (workers) -----------------------------------------------------------------------------------
ORDERS = Counter("algo_orders", "Order intents carried out, by action and final outcome.", ["action", "outcome"])
BROKER_CALL_SECONDS = Histogram(
    "algo_broker_call_seconds",
    "Duration of one broker (Kite Connect) call, by client method and outcome (ok or the error class).",
    ["call", "outcome"],
    buckets=LATENCY_BUCKETS,
)
ORDER_RETRIES = Counter("algo_order_retries", "Broker attempts after an order's first, by action.", ["action"])
AUTO_STOPS = Counter(
    "algo_strategy_auto_stops", "Strategies stopped by the engine after an order failed, by action.", ["action"]
)
INTENT_LAG_SECONDS = Histogram(
    "algo_intent_lag_seconds",
    "From an intent's due time to its order leaving for the broker, by action.",
    ["action"],
    buckets=LAG_BUCKETS,
)
RATE_LIMIT_WAIT_SECONDS = Histogram(
    "algo_rate_limit_wait_seconds",
    "Time an order waited for its trader's broker rate-limit grant, by action.",
    ["action"],
    buckets=LAG_BUCKETS,
)
LANES_BUSY = Gauge("algo_execution_lanes_busy", "Intents executing now in this worker (holding a slot).")
LANES_OPEN = Gauge("algo_execution_lanes", "Strategy lanes with queued or running intents in this worker.")
EXITS_PENDING = Gauge("algo_exits_pending", "Exit intents (SELL, STOPLOSS, EXIT) queued or running in this worker.")
EXIT_OLDEST_PENDING_SECONDS = Gauge(
    "algo_exit_oldest_pending_seconds",
    "How long past its due time the oldest unfinished exit intent in this worker is (0 when none).",
)

# --- stops and ticks (workers) --------------------------------------------------------------------------
STOPS_ARMED = Gauge("algo_stops_armed", "Stop-losses armed in this worker's index (positions it watches).")
TICK_FEED_LATENESS_SECONDS = Histogram(
    "algo_tick_feed_lateness_seconds",
    "How far behind the ticks' publishers the tick feed reads: a batch's oldest tick, publish to read.",
    buckets=LAG_BUCKETS,
)
TICKS_READ = Counter("algo_ticks_read", "Ticks read by this worker's tick feed.")
STOPLOSS_TRIGGERED = Counter("algo_stoploss_triggered", "STOPLOSS intents emitted by the stop-loss join.")

# --- Kafka consumers (every service with a plain consumer) --------------------------------------------
CONSUMER_LAG = Gauge(
    "algo_consumer_lag_messages",
    "Records not yet read on the partitions this process's consumer is assigned, by group and topic.",
    ["group", "topic"],
)

# --- scheduler ------------------------------------------------------------------------------------------
TIME_EVENTS = Counter("algo_time_events", "BUY/SELL time events the scheduler published, by action.", ["action"])
SCHEDULED_JOBS = Gauge("algo_scheduled_jobs", "Jobs (BUY/SELL times) waiting in this scheduler.")

# --- tick connector -------------------------------------------------------------------------------------
TICKS_PUBLISHED = Counter("algo_ticks_published", "Ticks the connector published to Kafka.")
TICKER_CONNECTED = Gauge("algo_ticker_connected", "1 while the connector's KiteTicker websocket is connected.")
TICKER_SUBSCRIPTIONS = Gauge("algo_ticker_subscribed_instruments", "Instruments the tick connector subscribes.")
TICKER_CONNECTIONS = Counter("algo_ticker_connections", "KiteTicker connections opened (more than one: reconnects).")

# --- the trading book (the API, read from the database on scrape) -----------------------------------
# A process manager may run several API processes: each reports the same book, so the merge keeps the max.
STRATEGIES = Gauge(
    "algo_strategies", "Strategies by status (running, stopped, ...).", ["status"], multiprocess_mode="max"
)
OPEN_POSITIONS = Gauge(
    "algo_open_positions",
    "Strategy runs holding shares, by the strategy's status.",
    ["status"],
    multiprocess_mode="max",
)
POSITIONS_WITHOUT_LIVE_STOP = Gauge(
    "algo_positions_without_live_stop",
    "Positions no stop-loss watches: held by a strategy that is no longer running (its stop is disarmed) and "
    "without a protective stop at the broker.",
    multiprocess_mode="max",
)


def exposition_registry() -> CollectorRegistry:
    """The registry to expose: every process's values when PROMETHEUS_MULTIPROC_DIR is set, else this one's."""
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> bytes:
    """The text exposition format, for an HTTP handler."""
    return generate_latest(exposition_registry())


def serve(port: int, host: str, service: str) -> None:
    """Serve /metrics on `port` in a background thread (a worker, the scheduler, the tick connector); 0: off.

    A port already taken is logged, not fatal: metrics must never keep a service that trades from starting."""
    if port == 0:
        return
    try:
        start_http_server(port, addr=host, registry=exposition_registry())
    except OSError as exc:
        log.error("%s: metrics not served on %s:%d (%s)", service, host, port, exc)
        return
    log.debug("%s: metrics on http://%s:%d/metrics", service, host, port)


class PendingExits:
    """Exit intents a worker holds (queued in a lane or running), by due time: the alert "an exit not filled
    within N seconds" reads the oldest one's age, so an exit stuck anywhere in the worker shows, not only a
    slow broker call."""

    def __init__(self, seconds_past: Callable[[datetime], float]) -> None:
        self.seconds_past = seconds_past  # real seconds since the project clock read this instant
        self._due: dict[str, datetime] = {}  # intent id -> due time
        EXIT_OLDEST_PENDING_SECONDS.set_function(self.oldest_seconds)

    def add(self, intent_id: str, due_at: datetime) -> None:
        self._due[intent_id] = due_at
        EXITS_PENDING.set(len(self._due))

    def discard(self, intent_id: str) -> None:
        self._due.pop(intent_id, None)
        EXITS_PENDING.set(len(self._due))

    def oldest_seconds(self) -> float:
        if not self._due:
            return 0.0
        return max(self.seconds_past(min(self._due.values())), 0.0)


class _Consumer(Protocol):
    def assignment(self) -> set[Any]: ...
    def highwater(self, partition: Any) -> int | None: ...
    async def position(self, partition: Any) -> int: ...


async def record_consumer_lag(consumer: _Consumer, group: str) -> None:
    """Records behind the head of each assigned partition, summed per topic (the group is the label: a
    partition is read by one member, so summing the members' series gives the group's lag)."""
    lag: dict[str, int] = {}
    for partition in consumer.assignment():
        head = consumer.highwater(partition)
        if head is None:  # not fetched yet: unknown, not zero
            continue
        try:
            position = await consumer.position(partition)
        except KafkaError:  # revoked meanwhile (IllegalStateError): the next sample has the new assignment
            lag.setdefault(partition.topic, 0)
            continue
        lag[partition.topic] = lag.get(partition.topic, 0) + max(head - position, 0)
    for topic, behind in lag.items():
        CONSUMER_LAG.labels(group, topic).set(behind)

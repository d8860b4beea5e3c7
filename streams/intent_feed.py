"""The `time-events` and `orders` topics, read by a plain consumer group beside the Faust agents.

Why not Faust agents, as the design first had them:

* Offsets. The execution engine finishes intents out of order (one lane per strategy, lanes concurrent).
  Faust commits the highest acknowledged offset of a partition even when an older event of it is still
  in flight (faust-streaming issue #606): a worker killed then loses that intent for good, which for a
  STOPLOSS or a SELL is a missed exit. Here a partition's committed offset never passes its oldest
  unfinished record (`PartitionProgress`), so the worker that takes the partition over re-reads it.
* Completeness. The crash matrix (seed 9) saw a Faust worker that restarted just after a broker restart
  receive only part of a backlog of time events; a plain aiokafka consumer read the same backlog whole.
* Cost. Faust spends about 250 µs of Python on each event it delivers, and runs its consumer in a thread
  of its own that contends for the GIL with the event loop that executes orders.

Both topics are keyed by strategy; one consumer group (`{prefix}algo-worker-intents`) spreads their
partitions over the workers and moves them on a rebalance. A record read twice (a rebalance, a takeover)
is harmless: time events become intents with deterministic ids, and execution drops an intent that
already has a result.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from core.kafka import process_client_id, stop_consumer
from core.settings import Settings

log = logging.getLogger(__name__)

BATCH_RECORDS = 1000
IDLE_POLL_MS = 100
COMMIT_SECONDS = 0.5
RETRY_SECONDS = 0.2

Done = Callable[[], None]


class PartitionProgress:
    """The records of one partition handed out and not yet finished, and the offset safe to commit."""

    def __init__(self) -> None:
        self._open: deque[int] = deque()
        self._finished: set[int] = set()
        self.safe: int | None = None  # next offset to read after a restart; None: nothing finished yet

    def started(self, offset: int) -> None:
        self._open.append(offset)

    def finished(self, offset: int) -> None:
        self._finished.add(offset)
        while self._open and self._open[0] in self._finished:
            done = self._open.popleft()
            self._finished.discard(done)
            self.safe = done + 1

    @property
    def in_flight(self) -> int:
        return len(self._open)


class IntentFeed:
    """Time events go to `on_time_events` a batch at a time (finished when it returns); each order intent
    goes to `on_intent` with a callback the executor calls once the intent is carried out."""

    def __init__(
        self,
        settings: Settings,
        on_time_events: Callable[[list[bytes]], Awaitable[None]],
        on_intent: Callable[[bytes, Done], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.time_events_topic = settings.topic("time-events")
        self.orders_topic = settings.topic("orders")
        self.on_time_events = on_time_events
        self.on_intent = on_intent
        self.progress: dict[TopicPartition, PartitionProgress] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.consumer: AIOKafkaConsumer

    async def start(self) -> None:
        session_ms = int(self.settings.kafka_session_timeout_seconds * 1000)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.topic("algo-worker-intents"),
            client_id=process_client_id("algo-worker-intents"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a broker that restarted empty: everything published since
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 6, 500),
            rebalance_timeout_ms=session_ms,
        )
        await self.consumer.start()
        self.consumer.subscribe([self.time_events_topic, self.orders_topic], listener=_CommitOnRevoke(self))
        self._tasks = [
            asyncio.create_task(self._run(), name="intent-feed"),
            asyncio.create_task(self._commit_every_while(), name="intent-feed-commits"),
        ]

    async def stop(self) -> None:
        started = hasattr(self, "consumer")
        await stop_consumer(self.consumer if started else None, self._tasks, self.commit if self._tasks else None)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=BATCH_RECORDS)
            except Exception as exc:  # noqa: BLE001 - this loop must not die: nothing would read the intents
                # The broker restarting (the consumer reconnects by itself), or a state error mid-rebalance.
                log.warning("intent feed: %r; retrying", exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for tp, records in batches.items():
                progress = self.progress.setdefault(tp, PartitionProgress())
                if tp.topic == self.time_events_topic:
                    await self._time_events(
                        tp, progress, [r.offset for r in records], [r.value or b"" for r in records]
                    )
                else:
                    for record in records:
                        progress.started(record.offset)
                        await self.on_intent(record.value or b"", partial(progress.finished, record.offset))

    async def _time_events(self, tp: TopicPartition, progress: PartitionProgress, offsets: list[int],
                           values: list[bytes]) -> None:  # fmt: skip
        try:
            await self.on_time_events(values)
        except Exception:
            # Kafka briefly gone while their intents were published: read them again rather than lose a SELL.
            log.exception("intent feed: %d time events failed; re-reading them", len(values))
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offsets[0])
            await asyncio.sleep(RETRY_SECONDS)
            return
        for offset in offsets:
            progress.started(offset)
            progress.finished(offset)

    async def _commit_every_while(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_SECONDS)
            await self.commit()

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        """Commit each partition up to its oldest unfinished record (all assigned ones, or `partitions`)."""
        ours = self.consumer.assignment() if partitions is None else partitions
        offsets = {tp: p.safe for tp, p in self.progress.items() if tp in ours and p.safe is not None}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: the next round commits again; a takeover meanwhile re-reads a little more.
            log.warning("intent feed: commit failed (%s)", exc)


class _CommitOnRevoke(ConsumerRebalanceListener):
    def __init__(self, feed: IntentFeed) -> None:
        self.feed = feed

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # What this worker finished, before another one takes the partitions over. Their records still in
        # flight finish here all the same; the new owner re-reads them and finds them done (or waits on
        # the strategy's lock while they run).
        await self.feed.commit(set(revoked))
        for tp in revoked:
            self.feed.progress.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("intent feed reads %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned) or "nothing")

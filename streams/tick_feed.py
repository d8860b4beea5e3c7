"""The `ticks` partitions a worker owns, read in batches by a plain consumer beside the Faust agents.

Why not a Faust agent: Faust spends about 250 µs of Python on every event it delivers (message, event,
ack bookkeeping), which caps one worker near 4,000 ticks/s however little the agent does; the stop-loss
check itself costs a few µs (a JSON decode and a bisect). Ticks are the one stream where that matters, so
they bypass the per-event machinery while keeping what Faust gives the join:

* Co-partitioning. `ticks` and `strategy-lifecycle` are keyed by instrument with the same partition
  count, and the `armed-stops` table is changelogged to the lifecycle event's partition. When Faust's
  rebalance (and table recovery) completes, this feed is assigned exactly the `ticks` partitions whose
  lifecycle partitions Faust gave this worker, so a tick meets the stops of its instrument here and
  nowhere else. During a rebalance it reads nothing.
* At-least-once. Offsets are committed (consumer group `{prefix}algo-worker-ticks`, manual assignment)
  only after every STOPLOSS a batch produced is acknowledged by Kafka, so the worker that takes over a
  partition re-reads what its dead owner had not finished; a crossing during the handover still exits.
  A re-read tick can only re-emit a STOPLOSS whose intent id is the same, which execution ignores.
* Handover. When Faust revokes the lifecycle partitions, the feed stops reading and commits what it has
  checked before the rebalance goes on (`release`, awaited by the revocation): the worker that takes a
  partition over starts where this one stopped. Not awaited, the new owner read from the last periodic
  commit and checked again up to COMMIT_SECONDS of ticks that this one had checked already (counted by the
  crash matrix with several workers, `Settings.tick_feed_audit`).

How late it reads is watched: a stop is checked no earlier than its tick is read, so a feed falling behind
its publishers (a saturated worker, a slow broker: Tansu's fetches slow down as its log grows) is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from core.kafka import process_client_id, stop_consumer
from core.metrics import TICK_FEED_LATENESS_SECONDS, TICKS_READ
from core.settings import Settings

log = logging.getLogger(__name__)

BATCH_RECORDS = 5000  # one batch is decoded and checked in a few ms
IDLE_POLL_MS = 100
COMMIT_SECONDS = 0.2  # offsets are committed beside the loop, not between two fetches (a broker round trip)
LATE_AFTER_MS = 1000.0  # a stop checked a second after its tick is an exit a second late
LATE_REPORT_SECONDS = 30.0  # at most one warning per this long, with the worst seen meanwhile
SUMMARY_SECONDS = 60.0  # how far behind the feed read, summarised in one INFO line per this long
# A revocation waits this long at most for the batch under way: beyond it the rebalance goes on, and the new
# owner re-reads from the last commit (the rebalance must not wait on a broker that is gone).
RELEASE_SECONDS = 2.0
AUDIT_LINE = "tick audit"
# After a start the feed first reads the backlog published meanwhile: no warning until it has read in time once,
# or for this long, whichever comes first (a feed that never catches up is still warned about).
CATCH_UP_SECONDS = 30.0


class Lateness:
    """How far behind the ticks' publishers the feed reads (by the records' CreateTime), warned about when a
    batch's oldest tick is LATE_AFTER_MS old; at most once per LATE_REPORT_SECONDS, with the worst since.
    Once per SUMMARY_SECONDS an INFO line gives the batches' lateness (p50, p99, max) and the ticks read."""

    def __init__(
        self,
        late_after_ms: float = LATE_AFTER_MS,
        every_seconds: float = LATE_REPORT_SECONDS,
        summary_seconds: float = SUMMARY_SECONDS,
        catch_up_seconds: float = CATCH_UP_SECONDS,
    ) -> None:
        self.late_after_ms = late_after_ms
        self.every_seconds = every_seconds
        self.summary_seconds = summary_seconds
        self.samples: list[float] = []  # each batch's oldest tick, ms behind, since the last summary
        self.ticks = 0
        self.summary_at: float | None = None  # time.monotonic() of the window's start
        self.worst_ms = 0.0  # since the last warning
        self.recent_ms = 0.0  # since the last `take_recent`: what the trader's status shows
        self.warned_at: float | None = None  # time.monotonic()
        self.warnings = 0
        self.catch_up_seconds = catch_up_seconds
        self.first_batch_at: float | None = None  # time.monotonic()
        self.caught_up = False

    def take_recent(self) -> float:
        """The worst lateness since the last call (ms)."""
        recent, self.recent_ms = self.recent_ms, 0.0
        return recent

    def observe(self, oldest_created_ms: float, now_ms: float, now: float, ticks: int = 0) -> None:
        behind = now_ms - oldest_created_ms
        TICK_FEED_LATENESS_SECONDS.observe(max(behind, 0.0) / 1000)
        TICKS_READ.inc(ticks)
        self.worst_ms = max(self.worst_ms, behind)
        self.recent_ms = max(self.recent_ms, behind)
        self._summarise(behind, now, ticks)
        if not self.caught_up:
            # Until the feed reads in time once (or has had CATCH_UP_SECONDS), lateness is the backlog a start
            # begins with, and a warning would only say the feed is doing its job; from then on, it is news.
            self.first_batch_at = now if self.first_batch_at is None else self.first_batch_at
            self.caught_up = behind < self.late_after_ms or now - self.first_batch_at >= self.catch_up_seconds
            if not self.caught_up:
                self.worst_ms = 0.0
                return
        if behind < self.late_after_ms or (self.warned_at is not None and now - self.warned_at < self.every_seconds):
            return
        log.warning(
            "tick feed reads %.0f ms behind the ticks' publishers (worst since the last warning: %.0f ms); stop-losses "
            "are checked that late. Catching up after a restart, or the worker or the Kafka broker saturated",
            behind, self.worst_ms,
        )  # fmt: skip
        self.warned_at, self.worst_ms = now, 0.0
        self.warnings += 1

    def _summarise(self, behind: float, now: float, ticks: int) -> None:
        if self.summary_at is None:
            self.summary_at = now
        self.samples.append(behind)
        self.ticks += ticks
        if now - self.summary_at < self.summary_seconds:
            return
        ordered = sorted(self.samples)
        log.info(
            "tick feed: %d ticks in %d batches in the last %.0f s, read p50 %.0f / p99 %.0f / max %.0f ms behind "
            "their publishers",
            self.ticks, len(ordered), now - self.summary_at, ordered[len(ordered) // 2],
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], ordered[-1],
        )  # fmt: skip
        self.samples, self.ticks, self.summary_at = [], 0, now


class TickFeed:
    def __init__(
        self, settings: Settings, handle: Callable[[list[ConsumerRecord[bytes, bytes]]], Awaitable[None]]
    ) -> None:
        self.settings = settings
        self.topic = settings.topic("ticks")
        self.handle = handle
        self._wanted: set[int] | None = None  # partitions to switch to between two batches
        self._changed = asyncio.Event()
        self._applied = asyncio.Event()  # the last `follow` is in effect
        self._applied.set()
        self._task: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._done: dict[TopicPartition, int] = {}  # processed and acknowledged, not yet committed
        self.lateness = Lateness()
        self.consumer: AIOKafkaConsumer

    @property
    def partitions(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def follow(self, partitions: set[int]) -> None:
        """Read these partitions from the next batch on (empty: read nothing, e.g. while rebalancing)."""
        self._wanted = set(partitions)
        self._applied.clear()
        self._changed.set()

    async def release(self, within: float = RELEASE_SECONDS) -> None:
        """Stop reading every partition and commit what was checked; returns once done (or after `within`)."""
        self.follow(set())
        if self._task is None or self._task.done():
            return
        try:
            async with asyncio.timeout(within):
                await self._applied.wait()
        except TimeoutError:
            log.warning("tick feed: partitions not released within %.1fs; their new owner re-reads from the last "
                        "commit", within)  # fmt: skip

    async def start(self) -> None:
        # Built here, not in __init__: the worker is assembled before its event loop exists.
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.topic("algo-worker-ticks"),
            client_id=process_client_id("algo-worker-ticks"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a partition nobody committed yet: from its first tick
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="tick-feed")
        self._committer = asyncio.create_task(self._commit_every_while(), name="tick-feed-commits")

    async def stop(self) -> None:
        loops = [task for task in (self._task, self._committer) if task is not None]
        started = hasattr(self, "consumer")
        await stop_consumer(self.consumer if started else None, loops, self._commit if self._task else None)

    async def _apply_assignment(self) -> None:
        wanted, self._wanted = self._wanted, None
        self._changed.clear()
        if wanted is not None and wanted != self.partitions:
            await self._commit()  # what this worker finished, before another one takes the partitions over
            self.consumer.assign([TopicPartition(self.topic, partition) for partition in sorted(wanted)])
            log.info("tick feed reads partitions %s of %s", sorted(wanted) or "none", self.topic)
        if self._wanted is None:  # no newer `follow` came meanwhile
            self._applied.set()

    async def _run(self) -> None:
        while True:
            if self._wanted is not None:
                await self._apply_assignment()
            if not self.consumer.assignment():
                await self._changed.wait()
                continue
            try:
                batches = await self.consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=BATCH_RECORDS)
            except KafkaError as exc:  # the broker restarting: the consumer reconnects by itself
                log.warning("tick feed: %s; retrying", exc)
                await asyncio.sleep(0.2)
                continue
            if not batches:
                continue
            oldest = min((rs[0].timestamp for rs in batches.values() if rs[0].timestamp > 0), default=None)
            if oldest is not None:  # a record without CreateTime (-1) says nothing about lateness
                ticks = sum(len(records) for records in batches.values())
                self.lateness.observe(oldest, time.time() * 1000, time.monotonic(), ticks)
            read: list[ConsumerRecord[bytes, bytes]] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                read.extend(record for record in records if record.value is not None)
                offsets[tp] = records[-1].offset + 1
            try:
                await self.handle(read)
            except Exception:
                # Kafka or Redis briefly gone mid-batch: read the batch again rather than lose a crossing.
                log.exception("tick feed: a batch failed; re-reading it")
                for tp, records in batches.items():
                    if tp in self.consumer.assignment():
                        self.consumer.seek(tp, records[0].offset)
                await asyncio.sleep(0.2)
                continue
            self._done.update(offsets)
            if self.settings.tick_feed_audit:
                at = time.time()
                for tp, records in batches.items():
                    # The first record's CreateTime: how long its tick waited to be checked (a handover's gap).
                    log.info("%s: partition %d offsets %d-%d created %.3f checked %.3f", AUDIT_LINE, tp.partition,
                             records[0].offset, records[-1].offset, records[0].timestamp / 1000, at)  # fmt: skip

    async def _commit_every_while(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_SECONDS)
            await self._commit()

    async def _commit(self) -> None:
        ours = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in self._done.items() if tp in ours}
        self._done.clear()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: kept for the next round unless a later batch supersedes it; a takeover meanwhile
            # re-reads a little more.
            log.warning("tick feed: commit failed (%s)", exc)
            for tp, offset in offsets.items():
                self._done.setdefault(tp, offset)

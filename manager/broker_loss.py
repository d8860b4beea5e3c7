"""Did the Kafka broker lose the lifecycle topic's data? The evidence recovery acts on.

Offsets only grow in a living topic: a partition whose end offset is below the highest end ever seen of it
was recreated, or its broker restarted empty. The marks are kept in the database (`TopicMark`), so a Redis
lost together with the broker does not take the evidence with it; a lifecycle topic that is missing, or
empty while strategies run, is lost too (a first start on a fresh broker with a database that outlived it).

Read the same way on Apache Kafka and on Tansu: the partitions from the topic's metadata (asked for by name:
a metadata request for no topics lists none on Apache Kafka and all of them on Tansu), then each partition's
latest offset. Tansu answers the latter with the last batch's base offset + 1, not the record count; that
too only grows while the topic lives, which is all the comparison needs.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from storage.models import Strategy, StrategyStatus, TopicMark


class LifecycleWatch:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], topic: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.topic = settings.topic(topic)
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None

    async def lost(self) -> str | None:
        """Why the topic's data is gone, or None; raises the marks to what the broker holds now."""
        ends = await self.end_offsets()
        try:
            return await self._compare(ends)
        except IntegrityError:
            return None  # another process wrote the same mark at the same moment: the next check compares

    async def _compare(self, ends: dict[int, int]) -> str | None:
        async with self.sessions() as session, session.begin():
            marks = await self._marks(session)
            if not ends:
                return f"the lifecycle topic {self.topic} does not exist" if await _running(session) else None
            behind = {p: (marks[p], end) for p, end in ends.items() if end < marks.get(p, 0)}
            if behind:
                partition, (mark, end) = min(behind.items())
                return (
                    f"the lifecycle topic went back in {len(behind)} partition(s) (partition {partition}: from offset "
                    f"{mark} to {end}): the Kafka broker lost its data or the topic was recreated"
                )
            if not any(ends.values()) and await _running(session):
                return "the lifecycle topic is empty while strategies run: the Kafka broker lost its data"
            for partition, end in ends.items():
                if end > marks.get(partition, -1):
                    await session.merge(TopicMark(topic=self.topic, partition=partition, end_offset=end))
        return None

    async def rebase(self) -> None:
        """After recovery republished the topic: what it holds now is the new baseline."""
        ends = await self.end_offsets()
        async with self.sessions() as session, session.begin():
            await session.execute(delete(TopicMark).where(TopicMark.topic == self.topic))
            session.add_all(TopicMark(topic=self.topic, partition=p, end_offset=end) for p, end in ends.items())

    async def end_offsets(self) -> dict[int, int]:
        """partition -> latest offset; empty when the topic does not exist."""
        if self._admin is None or self._offsets is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
            await self._admin.start()
            self._offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
            await self._offsets.start()
        (described,) = await self._admin.describe_topics([self.topic])
        partitions = [TopicPartition(self.topic, p["partition"]) for p in described["partitions"]]
        if not partitions:
            return {}
        ends = await self._offsets.end_offsets(partitions)
        return {tp.partition: int(end) for tp, end in ends.items()}

    async def _marks(self, session: AsyncSession) -> dict[int, int]:
        rows = await session.execute(
            select(TopicMark.partition, TopicMark.end_offset).where(TopicMark.topic == self.topic)
        )
        return dict(rows.tuples().all())

    async def close(self) -> None:
        if self._offsets is not None:
            await self._offsets.stop()
            self._offsets = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


async def _running(session: AsyncSession) -> bool:
    found = await session.execute(select(Strategy.id).where(Strategy.status == StrategyStatus.RUNNING.value).limit(1))
    return found.first() is not None

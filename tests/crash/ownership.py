"""Which live worker owns which partition, as Kafka and the workers say: the crash matrix with several workers.

- `orders` and `time-events`: the intent feeds' consumer group, described through the Kafka admin API.
- `strategy-lifecycle`: the workers' Faust group, described the same way (Faust's assignment decodes as the
  standard consumer protocol's). The `armed-stops` table follows it.
- `ticks`: the tick feed assigns itself the partitions of its lifecycle ones (manual assignment, no group
  membership to describe), so its owner is what each worker last logged ("tick feed reads partitions ...").

Members are told apart by their client id, which names the process (`core.kafka.process_client_id`).
A sample is `settled` when every partition of the three is owned by exactly one live worker, every live
worker is a member of both groups, and each worker's tick partitions are its lifecycle partitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from core.settings import Settings

STABLE = "Stable"


def pid_of(client_id: str) -> int | None:
    """The process id at the end of a client id `{role}-{host}-{pid}`; None for another client's id."""
    tail = client_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass
class Group:
    state: str = ""
    members: set[int] = field(default_factory=set)  # pids
    owners: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (topic, partition) -> pids


@dataclass
class Sample:
    at: float  # time.monotonic()
    problems: list[str]

    @property
    def settled(self) -> bool:
        return not self.problems


async def describe_group(admin: AIOKafkaAdminClient, group_id: str) -> Group:
    # One group per request: aiokafka fails to decode a response describing several groups of this broker.
    response = await admin.describe_consumer_groups([group_id])
    _error, _group, state, _kind, _protocol, members = response[0].groups[0][:6]
    described = Group(state=state)
    for member in members:
        client_id, assignment = member[1], member[4]
        pid = pid_of(client_id)
        if pid is None:
            continue
        described.members.add(pid)
        if not assignment:
            continue
        for topic, partitions in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
            for partition in partitions:
                described.owners.setdefault((topic, partition), []).append(pid)
    return described


class OwnershipProbe:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin: AIOKafkaAdminClient | None = None

    async def close(self) -> None:
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close()
            self.admin = None

    async def problems(self, live: set[int], ticks_followed: Mapping[int, set[int] | None]) -> list[str]:
        """What is wrong with the ownership now (empty: settled). `live`: the pids of the live workers;
        `ticks_followed`: pid -> the tick partitions that worker last said it reads (None: not said yet)."""
        try:
            if self.admin is None:
                self.admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                                 request_timeout_ms=2000)  # fmt: skip
                await self.admin.start()
            intents = await describe_group(self.admin, self.settings.topic("algo-worker-intents"))
            faust = await describe_group(self.admin, self.settings.topic("algo-worker"))
        except Exception as exc:  # noqa: BLE001 - the broker restarting: not settled, asked again
            await self.close()
            return [f"groups not described: {type(exc).__name__}"]
        found: list[str] = []
        for name, group in (("intents", intents), ("faust", faust)):
            if group.state != STABLE:
                found.append(f"{name} group {group.state or 'unknown'}")
            if group.members != live:
                found.append(f"{name} group members {sorted(group.members)} != live workers {sorted(live)}")
        s = self.settings
        expected = [(s.topic("orders"), s.orders_partitions, intents), (s.topic("time-events"), s.events_partitions,
                    intents), (s.topic("strategy-lifecycle"), s.ticks_partitions, faust)]  # fmt: skip
        for topic, count, group in expected:
            for partition in range(count):
                owners = group.owners.get((topic, partition), [])
                if len(owners) != 1 or owners[0] not in live:
                    found.append(f"{topic}[{partition}] owned by {owners or 'nobody'}")
        lifecycle = s.topic("strategy-lifecycle")
        for partition in range(s.ticks_partitions):
            readers = [pid for pid in live if partition in (ticks_followed.get(pid) or set())]
            owner = faust.owners.get((lifecycle, partition), [])
            if len(readers) != 1 or readers != owner:
                found.append(f"ticks[{partition}] read by {readers or 'nobody'}, its stops on {owner or 'nobody'}")
        return found

"""How long a stop goes unchecked while its tick partition moves: `python -m benchmarks.rebalance`.

One run per consumer-session setting (`--sessions 3 6 10`, seconds; heartbeat a sixth of it, as the services
set it), each on a stack of its own (Kafka broker: `--kafka apache|tansu`, redis-server, SQLite) with
`--workers` workers reading `ticks` (6 partitions) while this process publishes a steady tick flow
(`--rate` ticks/s over 24 instruments, every partition carrying some). Then, one after another:

- remove: a worker stopped cleanly (SIGTERM): it leaves the group at once;
- add: a worker started: the group rebalances when it joins;
- kill: a worker killed (SIGKILL): nobody notices until its session times out.

Each worker logs every batch it checks (`Settings.tick_feed_audit`: partition, offsets, the first tick's
CreateTime, when checked). A tick's wait is its check time minus its publication: a stop crossed by it went
unchecked that long. Per move: the worst wait of a tick published from 1 s before the move until the
partitions have owners again, and the same over the quiet second before it (the steady state).

Also printed: each worker's CPU (its process, all threads, from /proc) over the steady flow, per 1,000 ticks/s.

Aiokafka and Faust rebalance eagerly (every member gives up every partition, then receives its share); neither
implements the incremental cooperative protocol, so that choice is not open here (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from benchmarks._support import Service, Stack, settings_env
from core.apache_kafka import TEST_CONFIG
from core.clock import ScaledClock
from core.kafka import ensure_topics
from core.settings import Settings
from streams.tick_feed import AUDIT_LINE

PARTITIONS = 6
INSTRUMENTS = [f"NSE:RB{n:03d}" for n in range(24)]
AUDIT = re.compile(AUDIT_LINE + r": partition (\d+) offsets (\d+)-(\d+) created ([\d.]+) checked ([\d.]+)")
FOLLOWS = "tick feed reads partitions"


@dataclass
class Move:
    kind: str
    at: float  # time.time() of the move
    settled: float  # time.time() when every live worker logged its new tick partitions
    worst_wait: float
    quiet_wait: float


def _waits(services: list[Service], since: float, until: float) -> float:
    """The worst wait (s) of a batch's first tick published in [since, until], over every worker's log."""
    worst = 0.0
    for service in services:
        for line in list(service.lines):
            if AUDIT_LINE not in line:
                continue
            match = AUDIT.search(line)
            if match is None:
                continue
            created, checked = float(match[4]), float(match[5])
            if since <= created <= until:
                worst = max(worst, checked - created)
    return worst


def _cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


async def _publish(bootstrap: str, topic: str, rate: int, stop: asyncio.Event) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
    await producer.start()
    try:
        interval = 0.01
        per_round = max(1, round(rate * interval))
        sent = 0
        began = time.monotonic()
        while not stop.is_set():
            for _ in range(per_round):
                instrument = INSTRUMENTS[sent % len(INSTRUMENTS)]
                value = orjson.dumps({"instrument": instrument, "last_price": 100.0 + (sent % 7) * 0.05,
                                      "received_at": ""})  # fmt: skip
                await producer.send(topic, value, key=instrument.encode())
                sent += 1
            wait = began + sent / rate - time.monotonic()
            await asyncio.sleep(max(wait, 0.0))
    finally:
        await producer.stop()


async def _settled(workers: list[Service], since: float, within: float = 60.0) -> float:
    """When every live worker has logged the tick partitions of the new assignment, and together they cover all."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        covered: list[int] = []
        latest = 0.0
        for worker in workers:
            lines = [line for line in list(worker.lines) if FOLLOWS in line]
            if not lines:
                break
            last = lines[-1]
            stamp = _log_time(last)
            if stamp < since:
                covered = []
                break
            latest = max(latest, stamp)
            covered.extend(int(p) for p in re.findall(r"\d+", last.split(FOLLOWS, 1)[1].split(" of ")[0]))
        if sorted(covered) == list(range(PARTITIONS)):
            return latest
        await asyncio.sleep(0.1)
    raise RuntimeError("the tick partitions were not all owned again in time")


def _log_time(line: str) -> float:
    # Faust's log lines begin "[YYYY-mm-dd HH:MM:SS,mmm]" in local time.
    stamp = line[1:24]
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000


async def one_setting(args: argparse.Namespace, session: float) -> list[Move]:
    # Apache Kafka refuses sessions under 6 s by default (group.min.session.timeout.ms); the test broker's
    # setting lowers that bound, as a production broker would have to for a 3 s session.
    async with Stack(kafka=args.kafka, kafka_config=TEST_CONFIG) as stack:
        settings: Settings = stack.settings(
            f"rb{uuid.uuid4().hex[:6]}-",
            ticks_partitions=PARTITIONS,
            orders_partitions=PARTITIONS,
            events_partitions=PARTITIONS,
            tick_feed_audit=True,
            kafka_session_timeout_seconds=session,
        )
        await ensure_topics(settings)
        env = settings_env(settings, ScaledClock(start=datetime.now(UTC)))
        workers = [stack.start_service("worker", env) for _ in range(args.workers)]
        await asyncio.gather(*(w.wait_ready() for w in workers))
        stop = asyncio.Event()
        publisher = asyncio.create_task(_publish(settings.kafka_bootstrap, settings.topic("ticks"), args.rate, stop))
        moves: list[Move] = []
        try:
            await asyncio.sleep(args.quiet)  # the steady state, and the CPU it costs
            cpu_began = {w.process.pid: _cpu_seconds(w.process.pid) for w in workers}
            await asyncio.sleep(args.quiet)
            for worker in workers:
                used = _cpu_seconds(worker.process.pid) - cpu_began[worker.process.pid]
                print(f"  worker pid {worker.process.pid}: {used / args.quiet:.0%} of a core at {args.rate:,} ticks/s "
                      f"({used / args.quiet / (args.rate / 1000):.1%} per 1,000 ticks/s)", flush=True)  # fmt: skip
            for kind in ("remove", "add", "kill"):
                at = time.time()
                if kind == "remove":
                    gone = workers.pop()
                    await asyncio.to_thread(gone.stop)
                elif kind == "add":
                    added = stack.start_service("worker", env)
                    workers.append(added)
                    await added.wait_ready()
                else:
                    gone = workers.pop(0)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(gone.process.pid, signal.SIGKILL)
                settled = await _settled(workers, at)
                await asyncio.sleep(2.0)  # the ticks published up to the settling are checked by now
                everyone = list(stack.services)
                worst, quiet = _waits(everyone, at - 1.0, settled), _waits(everyone, at - 2.0, at - 1.0)
                move = Move(kind, at, settled, worst, quiet)
                moves.append(move)
                print(f"  {kind}: partitions owned again {settled - at:.1f}s after the move; worst tick wait "
                      f"{move.worst_wait:.2f}s (quiet second before: {move.quiet_wait:.2f}s)", flush=True)  # fmt: skip
                await asyncio.sleep(args.quiet)
        finally:
            stop.set()
            await asyncio.gather(publisher, return_exceptions=True)
        return moves


async def run(args: argparse.Namespace) -> int:
    results: dict[float, list[Move]] = {}
    for session in args.sessions:
        print(f"session {session:g}s (heartbeat {max(session / 6, 0.5):.2g}s), {args.workers} workers, "
              f"{args.rate:,} ticks/s, {args.kafka}:", flush=True)  # fmt: skip
        results[session] = await one_setting(args, session)
    print("\n| session | move | partitions owned again after | worst tick wait (unchecked stop) |")
    print("| --- | --- | --- | --- |")
    for session, moves in results.items():
        for move in moves:
            print(f"| {session:g} s | {move.kind} | {move.settled - move.at:.1f} s | {move.worst_wait:.2f} s |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rebalance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sessions", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=int, default=1000, help="ticks/s published")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds of steady flow around each move")
    parser.add_argument("--kafka", choices=["auto", "apache", "tansu"], default="auto")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

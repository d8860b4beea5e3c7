"""Benchmark of a login flood (issue #23, finding 2): does it slow a real login and the status poll?

    python -m benchmarks.login_flood [--flooders 8] [--rate 4] [--seconds 20] [--pollers 4] [--poll-interval 0.01]

Starts its own redis-server and a SQLite database and runs the API in a subprocess (uvicorn, one worker, uvloop +
httptools, ENVIRONMENT=development: argon2id at production cost, `api.passwords.password_hasher`). Seeds traders
with running strategies straight into the database and Redis (what START writes; no Kafka is needed to read a
status) and one owner whose password is hashed at full cost. Then, from this process on raw asyncio streams:

1. idle: the owner logs in (from 127.0.0.1, an address the account knows) while the status poll runs alone;
2. flood: `--flooders` clients, each from its own loopback address (127.0.1.N), send logins with random unknown
   emails at `--rate` per second each, while the owner logs in again and the status poll runs.

Prints the owner's login time (median and max), the poll's p50/p99 in each phase and what the flood got back.
Targets: a login under the flood under 3 times its idle time, the poll's p99 under 50 ms."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path

import orjson

OWNER_EMAIL = "owner@example.com"
OWNER_PASSWORD = "Owner-long-passphrase-42"  # noqa: S105 - the benchmark's own account
TARGET_LOGIN_RATIO = 3.0
TARGET_POLL_P99_MS = 50.0


@dataclass
class Phase:
    logins_s: list[float] = field(default_factory=list)
    polls_ms: list[float] = field(default_factory=list)
    poll_errors: int = 0
    flood: Counter[int] = field(default_factory=Counter)

    def poll(self, q: float) -> float:
        ordered = sorted(self.polls_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its status and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, local_address: str | None = None) -> Connection:
        local = (local_address, 0) if local_address else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return int(head[9:12]), body

    def close(self) -> None:
        self.writer.close()


def login_request(email: str, password: str) -> bytes:
    body = orjson.dumps({"email": email, "password": password})
    return (
        b"POST /auth/login HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def owner_logins(port: int, count: int, interval: float, phase: Phase) -> None:
    connection = await Connection.open(port)
    try:
        for _ in range(count):
            started = time.perf_counter()
            status, body = await connection.request(login_request(OWNER_EMAIL, OWNER_PASSWORD))
            if status != 200:
                raise RuntimeError(f"the owner's login answered {status}: {body[:200]!r}")
            phase.logins_s.append(time.perf_counter() - started)
            await asyncio.sleep(interval)
    finally:
        connection.close()


async def poll(port: int, targets: list[tuple[int, str]], interval: float, until: float, phase: Phase) -> None:
    connection = await Connection.open(port)
    rng = random.Random()  # noqa: S311 - spreading polls over strategies
    requests = [
        f"GET /strategy/status/{sid} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        for sid, token in targets
    ]
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            status, _ = await connection.request(rng.choice(requests))
            phase.polls_ms.append((time.perf_counter() - started) * 1000)
            phase.poll_errors += status != 200
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))
    finally:
        connection.close()


async def flood(port: int, address: str, rate: float, until: float, phase: Phase) -> None:
    """Logins with random unknown emails at `rate` per second from one address, whatever the answers."""
    connection = await Connection.open(port, local_address=address)
    try:
        while (now := time.perf_counter()) < until:
            status, _ = await connection.request(login_request(f"{uuid.uuid4().hex[:12]}@example.com", "Guess-12345"))
            phase.flood[status] += 1
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - now)))
    finally:
        connection.close()


async def run_phase(port: int, targets: list[tuple[int, str]], args: argparse.Namespace, flooders: int) -> Phase:
    phase = Phase()
    until = time.perf_counter() + args.seconds
    tasks = [poll(port, targets, args.poll_interval, until, phase) for _ in range(args.pollers)]
    tasks += [flood(port, f"127.0.1.{n + 1}", args.rate, until, phase) for n in range(flooders)]

    async def owner() -> None:
        await asyncio.sleep(2.0)  # the flood under way first
        await owner_logins(port, args.logins, (args.seconds - 4.0) / args.logins, phase)

    await asyncio.gather(owner(), *tasks)
    return phase


async def seed(database_url: str, redis_url: str, traders: int) -> list[tuple[int, str]]:
    """The owner (full-cost hash) and traders with a running strategy each, in the database and Redis."""
    from argon2 import PasswordHasher
    from redis.asyncio import Redis
    from sqlalchemy import insert, select

    from api.passwords import password_hasher
    from api.tokens import TokenService
    from core.clock import get_clock
    from core.settings import Settings
    from manager.run_specs import initial_runtime, spec_for
    from storage.db import create_engine, session_factory
    from storage.models import Strategy, User
    from storage.runtime import RuntimeStore

    engine = create_engine(database_url)
    tokens = TokenService(Settings(), get_clock())
    now = datetime.now(UTC)
    owner_hash = password_hasher(Settings()).hash(OWNER_PASSWORD)  # what registration would have stored
    unusable = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(uuid.uuid4().hex)
    targets: list[tuple[int, str]] = []
    async with engine.begin() as conn:
        await conn.execute(insert(User).values(email=OWNER_EMAIL, password_hash=owner_hash, created_at=now))
        for n in range(traders):
            user_id = (
                await conn.execute(
                    insert(User)
                    .values(email=f"trader{n}@example.com", password_hash=unusable, created_at=now)
                    .returning(User.id)
                )
            ).scalar_one()
            strategy_id = (
                await conn.execute(
                    insert(Strategy)
                    .values(
                        user_id=user_id, exchange="NSE", tradingsymbol="INFY", instrument_token=408065, quantity=10,
                        buy_time=clock_time(9, 30), sell_time=clock_time(15, 15), stop_loss=Decimal("100.05"),
                        product="MIS", status="running", run=1, trading_day=now.date(), created_at=now,
                        updated_at=now,
                    )
                    .returning(Strategy.id)
                )
            ).scalar_one()  # fmt: skip
            targets.append((strategy_id, tokens.issue(user_id, 0, f"bench-{n}").token))
    redis = Redis.from_url(redis_url, decode_responses=True)
    runtime = RuntimeStore(redis)
    async with session_factory(engine)() as session:
        for strategy in (await session.scalars(select(Strategy))).all():
            await runtime.load(spec_for(strategy), 1, now.date(), initial_runtime(1, now.date(), now))
    await runtime.set_last_prices({"NSE:INFY": 1502.5})
    await redis.aclose()
    await engine.dispose()
    return targets


def report(name: str, phase: Phase) -> None:
    logins = phase.logins_s
    flood = ", ".join(f"{count} x {status}" for status, count in sorted(phase.flood.items())) or "none"
    print(
        f"{name:>6}: owner login median {statistics.median(logins):.3f} s, max {max(logins):.3f} s "
        f"({len(logins)} logins); status poll p50 {phase.poll(0.5):.2f} ms, p99 {phase.poll(0.99):.2f} ms, "
        f"max {max(phase.polls_ms):.2f} ms ({len(phase.polls_ms)} polls, {phase.poll_errors} not 200); "
        f"flood answers: {flood}",
        flush=True,
    )


def orchestrate(args: argparse.Namespace) -> int:
    from benchmarks._support import start_api
    from core.embedded import free_port, redis_command, start_process, stop_process
    from storage.migrate import upgrade

    workdir = Path(tempfile.mkdtemp(prefix="login-flood-bench-"))
    redis_port, api_port = free_port(), free_port()
    database_url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(start_process(redis_command(redis_port), redis_port))
        upgrade(database_url)
        env = {
            **os.environ,
            "ENVIRONMENT": "development",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # none: a status read needs no Kafka
            "KITE_API_ROOT": "http://127.0.0.1:9",
            "LOG_LEVEL": "WARNING",
        }
        targets = asyncio.run(seed(database_url, redis_url, args.traders))
        api = start_api(env, api_port, workdir / "api.log")
        processes.append(api)
        time.sleep(12.0)  # the lifespan's wait for a Kafka that is not there, then warm-up
        print(
            f"API on 127.0.0.1:{api_port} (1 worker, argon2id at production cost); {args.traders} traders polled by "
            f"{args.pollers} connections every {args.poll_interval * 1000:.0f} ms; flood {args.flooders} x "
            f"{args.rate:g} logins/s; {args.seconds:g} s per phase",
            flush=True,
        )
        idle = asyncio.run(run_phase(api_port, targets, args, flooders=0))
        report("idle", idle)
        flooded = asyncio.run(run_phase(api_port, targets, args, flooders=args.flooders))
        report("flood", flooded)
        ratio = statistics.median(flooded.logins_s) / statistics.median(idle.logins_s)
        met = ratio < TARGET_LOGIN_RATIO and flooded.poll(0.99) < TARGET_POLL_P99_MS
        print(
            f"login under flood / idle: {ratio:.2f} (target < {TARGET_LOGIN_RATIO:g}); poll p99 under flood "
            f"{flooded.poll(0.99):.2f} ms (target < {TARGET_POLL_P99_MS:g}): {'PASS' if met else 'BELOW TARGET'}"
        )
        return 0 if met else 1
    finally:
        for process in reversed(processes):
            stop_process(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flooders", type=int, default=8, help="flooding clients, one loopback address each")
    parser.add_argument("--rate", type=float, default=4.0, help="logins per second per flooding client")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--logins", type=int, default=8, help="the owner's logins per phase")
    parser.add_argument("--traders", type=int, default=50, help="traders whose strategies are polled")
    parser.add_argument("--pollers", type=int, default=4, help="status-poll connections")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="seconds between one connection's polls")
    return orchestrate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

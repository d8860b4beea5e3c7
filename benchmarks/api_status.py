"""Benchmark of the status poll (sequence 12): `GET /strategy/status/{id}` on ONE uvicorn worker.

    python -m benchmarks.api_status [--users 50] [--connections 32] [--seconds 8] [--runs 3]

Starts its own redis-server and Kafka broker (Apache Kafka, or Tansu without a JDK) and a SQLite database,
runs the API in a subprocess (uvicorn, one worker, uvloop + httptools), seeds users with connected brokers and
strategies, starts every strategy through the API (so Redis holds exactly what START writes), then runs the
load generator in a SECOND process: a small keep-alive HTTP/1.1 client on raw asyncio streams (an HTTP library
would cost more CPU per request than the server under test). Prints requests/s and p50/p99 latency of each run
and the median of the runs. Target: >= 3,000 req/s with p99 < 20 ms."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path

TARGET_RPS = 3000.0
TARGET_P99_MS = 20.0


# ------------------------------------------------------------------------------------------ load process


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _connection_loop(
    host: str, port: int, requests: list[bytes], deadline: float, measure_from: float, result: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random()  # noqa: S311 - spreading load over strategies, not security
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    try:
        while (now := clock()) < deadline:
            writer.write(rng.choice(requests))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = clock()
            if now >= measure_from:
                result.requests += 1
                result.latencies_ms.append((done - now) * 1000)
                if not head.startswith(b"HTTP/1.1 200"):
                    result.errors += 1
    finally:
        writer.close()


async def generate_load(
    url_host: str, port: int, targets: list[tuple[int, str]], connections: int, seconds: float, warmup: float
) -> LoadResult:
    requests = [
        (
            f"GET /strategy/status/{sid} HTTP/1.1\r\nHost: {url_host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
        ).encode()
        for sid, token in targets
    ]
    start = time.perf_counter()
    result = LoadResult(0, 0, seconds, [])
    await asyncio.gather(
        *(
            _connection_loop(url_host, port, requests, start + warmup + seconds, start + warmup, result)
            for _ in range(connections)
        )
    )
    return result


def load_main(args: argparse.Namespace) -> None:
    """The load generator process: reads targets on stdin, prints one JSON result line."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass
    targets = [(int(sid), token) for sid, token in json.load(sys.stdin)]
    result = asyncio.run(generate_load(args.host, args.port, targets, args.connections, args.seconds, args.warmup))
    print(
        json.dumps(
            {
                "requests": result.requests,
                "errors": result.errors,
                "rps": result.rps,
                "p50_ms": result.percentile(0.50),
                "p99_ms": result.percentile(0.99),
            }
        )
    )


# ------------------------------------------------------------------------------------------ orchestrator


async def seed(base_url: str, database_url: str, users: int) -> list[tuple[int, str]]:
    """Users via the API (real hashing and tokens), broker rows and strategies in the database (the
    benchmark has no broker to validate against), then START through the API."""
    import httpx
    from sqlalchemy import insert

    from core.crypto import SecretBox
    from core.settings import Settings
    from storage.db import create_engine
    from storage.models import BrokerAccount, Strategy

    box = SecretBox(Settings())
    engine = create_engine(database_url)
    targets: list[tuple[int, str]] = []
    symbols = ["INFY", "TCS", "SBIN", "RELIANCE"]
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for n in range(users):
            email = f"bench{n}@example.com"
            body = {"email": email, "password": "Bench-passw0rd"}
            registered = await client.post("/auth/register", json=body)
            registered.raise_for_status()
            token = registered.json()["access_token"]
            user_id = registered.json()["user_id"]
            now = datetime.now(UTC)
            async with engine.begin() as conn:
                await conn.execute(
                    insert(BrokerAccount).values(
                        user_id=user_id, api_key_encrypted=box.encrypt("benchkey"),
                        api_secret_encrypted=box.encrypt("benchsecret"),
                        access_token_encrypted=box.encrypt("benchtoken"), broker_user_id=f"BN{n:04d}",
                        broker_user_name=None, token_issued_at=now,
                        token_expires_at=datetime(2100, 1, 1, tzinfo=UTC), created_at=now, updated_at=now,
                    )
                )  # fmt: skip
                strategy_id = (
                    await conn.execute(
                        insert(Strategy)
                        .values(
                            user_id=user_id, exchange="NSE", tradingsymbol=symbols[n % len(symbols)],
                            instrument_token=1000 + n % len(symbols), quantity=10, buy_time=clock_time(9, 30),
                            sell_time=clock_time(15, 15), stop_loss=Decimal("100.05"), product="MIS",
                            status="created", run=0, created_at=now, updated_at=now,
                        )
                        .returning(Strategy.id)
                    )
                ).scalar_one()  # fmt: skip
            started = await client.post(f"/strategy/{strategy_id}/start", headers={"Authorization": f"Bearer {token}"})
            started.raise_for_status()
            targets.append((strategy_id, token))
    await engine.dispose()
    return targets


async def make_positions(redis_url: str, targets: list[tuple[int, str]]) -> None:
    """Half the strategies hold a position and every instrument has a price: the full answer is built."""
    from redis.asyncio import Redis

    from storage.runtime import RuntimeStore, runtime_key

    redis = Redis.from_url(redis_url, decode_responses=True)
    await RuntimeStore(redis).set_last_prices({"NSE:INFY": 1502.5, "NSE:TCS": 3401.0, "NSE:SBIN": 801.2,
                                               "NSE:RELIANCE": 1399.9})  # fmt: skip
    for sid, _ in targets[::2]:
        await redis.hset(
            runtime_key(sid),
            mapping={"state": "bought", "position": "bought", "last_action": "BUY", "entry_price": "1498.10",
                     "entry_at": datetime.now(UTC).isoformat()},
        )  # fmt: skip
    await redis.aclose()


def run_load_process(
    host: str, port: int, targets: list[tuple[int, str]], args: argparse.Namespace
) -> dict[str, float]:
    command = [
        sys.executable, "-m", "benchmarks.api_status", "--load", "--host", host, "--port", str(port),
        "--connections", str(args.connections), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
    ]  # fmt: skip
    completed = subprocess.run(
        command, input=json.dumps(targets), capture_output=True, text=True, check=True,
        timeout=args.seconds + args.warmup + 60,
    )  # fmt: skip
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def orchestrate(args: argparse.Namespace) -> int:
    from benchmarks._support import start_api
    from core.embedded import EmbeddedKafka, free_port, redis_command, start_process, stop_process
    from storage.migrate import upgrade

    workdir = Path(tempfile.mkdtemp(prefix="api-status-bench-"))
    redis_port, api_port = free_port(), free_port()
    kafka = EmbeddedKafka(workdir / "kafka")
    database_url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(start_process(redis_command(redis_port), redis_port))
        kafka.start()
        upgrade(database_url)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP": kafka.bootstrap,
            "KITE_API_ROOT": "http://127.0.0.1:9",  # never called on the measured path
            "LOG_LEVEL": "WARNING",
            # Every user is registered through the API from this one address.
            "REGISTER_RATE_PER_ADDRESS": "100000/hour",
        }
        os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP")})
        api = start_api(env, api_port, workdir / "api.log")
        processes.append(api)
        base_url = f"http://127.0.0.1:{api_port}"
        print(f"API on {base_url} (1 worker), seeding {args.users} users and strategies ...", flush=True)
        targets = asyncio.run(seed(base_url, database_url, args.users))
        asyncio.run(make_positions(redis_url, targets))
        print(f"load: {args.connections} connections, {args.seconds:g}s per run after {args.warmup:g}s warm-up")
        runs = []
        for n in range(args.runs):
            run = run_load_process("127.0.0.1", api_port, targets, args)
            runs.append(run)
            print(
                f"  run {n + 1}: {run['rps']:8.0f} req/s   p50 {run['p50_ms']:6.2f} ms   p99 {run['p99_ms']:6.2f} ms"
                f"   errors {int(run['errors'])}",
                flush=True,
            )
        rps = statistics.median(r["rps"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        errors = sum(int(r["errors"]) for r in runs)
        verdict = "PASS" if rps >= TARGET_RPS and p99 < TARGET_P99_MS and errors == 0 else "BELOW TARGET"
        print(f"median of {len(runs)}: {rps:.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {errors}")
        print(f"target >= {TARGET_RPS:.0f} req/s and p99 < {TARGET_P99_MS:.0f} ms: {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        for process in reversed(processes):
            stop_process(process)
        kafka.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50, help="users, one running strategy each")
    parser.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # the load-process role
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load_main(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

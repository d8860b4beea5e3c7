"""Load the Kite simulator: `python -m benchmarks.simulator orders|ticks`.

Each run starts the simulator in a separate process (uvicorn, one worker, 127.0.0.1) and loads it from
this one, then prints the median of a few runs.

* orders - many api_keys placing MARKET orders concurrently over keep-alive HTTP/1.1 connections.
  The load generator is aiohttp, not httpx: on the benchmark machine httpx's AsyncClient topped out at
  ~200 requests/s on one connection and ~50/s at 64 (its pool, not the server), so it measured itself.
  Kite allows 10 orders/s per api_key; rather than pretend, the benchmark switches the simulator's rate
  limit off through its control API (`rate_limit_enabled=false`) and says so in the output.
  Target: >= 3,000 placements/s.
* ticks - one websocket client subscribed to every tradable instrument in quote (or full) mode, the
  engine stepping as fast as it can with every instrument moving on every step; counts decoded packets.
  Target: >= 100,000 ticks/s to one client.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import websockets

from connectors.kite_sim import ticker_codec as codec

ORDER_TARGET = 3_000
TICK_TARGET = 100_000
_TOKEN_AND_PRICE = struct.Struct(">II")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator_process() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.simulator", "serve", "--port", str(port)])
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{root}/_sim/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.1)
        yield root
    finally:
        proc.terminate()
        proc.wait(10)


def serve(port: int) -> None:
    from connectors.kite_sim.server import serve as serve_simulator

    asyncio.run(serve_simulator("127.0.0.1", port, log_level="error"))


# --- orders -------------------------------------------------------------------------------------------


async def _orders_run(root: str, accounts: list[tuple[str, str]], concurrency: int, seconds: float) -> float:
    body = (
        b"exchange=NSE&tradingsymbol=INFY&transaction_type=BUY&quantity=1&product=MIS&order_type=MARKET"
        b"&market_protection=-1"  # Kite refuses a MARKET order without it
    )
    headers = [
        {
            "X-Kite-Version": "3",
            "Authorization": f"token {api_key}:{token}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        for api_key, token in accounts
    ]
    placed = 0
    failed = 0
    connector = aiohttp.TCPConnector(limit=concurrency)  # keep-alive pool, one connection per worker
    async with aiohttp.ClientSession(root, connector=connector) as client:
        stop_at = time.monotonic() + seconds

        async def worker(index: int) -> None:
            nonlocal placed, failed
            n = index
            while time.monotonic() < stop_at:
                async with client.post("/orders/regular", data=body, headers=headers[n % len(headers)]) as response:
                    await response.read()
                    if response.status == 200:
                        placed += 1
                    else:
                        failed += 1
                n += concurrency

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    if failed:
        print(f"  ({failed} requests failed)")
    return placed / elapsed


def bench_orders(runs: int, seconds: float, accounts: int, concurrency: int) -> None:
    with simulator_process() as root:
        control = f"{root}/_sim"
        httpx.post(f"{control}/config", json={"rate_limit_enabled": False, "walk": False})
        keys = []
        for i in range(accounts):
            created = httpx.post(
                f"{control}/accounts", json={"api_key": f"bench{i}", "balance": 1e12, "api_secret": "s"}
            ).json()
            keys.append((created["api_key"], created["access_token"]))
        print(f"orders: {accounts} api_keys, {concurrency} concurrent keep-alive connections, rate limit OFF")
        rates = []
        for run in range(runs):
            rate = asyncio.run(_orders_run(root, keys, concurrency, seconds))
            rates.append(rate)
            print(f"  run {run + 1}: {rate:,.0f} placements/s")
        median = statistics.median(rates)
        verdict = "meets" if median >= ORDER_TARGET else "MISSES"
        print(f"orders median: {median:,.0f} placements/s ({verdict} the {ORDER_TARGET:,}/s target)")


# --- ticks --------------------------------------------------------------------------------------------


async def _ticks_run(ws_root: str, api_key: str, token: str, tokens: list[int], mode: str, seconds: float) -> float:
    url = f"{ws_root}?api_key={api_key}&access_token={token}"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(f'{{"a":"subscribe","v":{tokens}}}')
        await ws.send(f'{{"a":"mode","v":["{mode}",{tokens}]}}')
        # Let the subscription settle, then count.
        warmup_until = time.monotonic() + 0.5
        while time.monotonic() < warmup_until:
            await ws.recv()
        decoded = 0
        checksum = 0
        started = time.monotonic()
        stop_at = started + seconds
        unpack = _TOKEN_AND_PRICE.unpack_from
        while time.monotonic() < stop_at:
            frame = await ws.recv()
            if not isinstance(frame, bytes) or len(frame) < 2:
                continue
            offset = 2
            for _ in range(codec.packet_count(frame)):
                length = (frame[offset] << 8) | frame[offset + 1]
                instrument_token, last_price = unpack(frame, offset + 2)
                checksum ^= instrument_token ^ last_price
                offset += 2 + length
                decoded += 1
        return decoded / (time.monotonic() - started)


def bench_ticks(runs: int, seconds: float, mode: str) -> None:
    with simulator_process() as root:
        control = f"{root}/_sim"
        httpx.post(f"{control}/config", json={"tick_interval": 0, "walk": True, "move_probability": 1.0})
        created = httpx.post(f"{control}/accounts", json={"api_key": "tickbench", "api_secret": "s"}).json()
        csv_rows = httpx.get(f"{root}/instruments").text.splitlines()[1:]
        tokens = [int(row.split(",", 1)[0]) for row in csv_rows if row.endswith(("NSE,NSE", "BSE,BSE"))]
        ws_root = root.replace("http://", "ws://") + "/ws"
        print(f"ticks: one client, {len(tokens)} instruments (every tradable one) in {mode} mode, fastest emission")
        rates = []
        for run in range(runs):
            rate = asyncio.run(_ticks_run(ws_root, "tickbench", created["access_token"], tokens, mode, seconds))
            rates.append(rate)
            print(f"  run {run + 1}: {rate:,.0f} ticks/s")
        median = statistics.median(rates)
        verdict = "meets" if median >= TICK_TARGET else "MISSES"
        print(f"ticks median: {median:,.0f} ticks/s ({verdict} the {TICK_TARGET:,}/s target)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    orders = sub.add_parser("orders")
    orders.add_argument("--runs", type=int, default=3)
    orders.add_argument("--seconds", type=float, default=4.0)
    orders.add_argument("--accounts", type=int, default=500)
    orders.add_argument("--concurrency", type=int, default=64)
    ticks = sub.add_parser("ticks")
    ticks.add_argument("--runs", type=int, default=3)
    ticks.add_argument("--seconds", type=float, default=4.0)
    ticks.add_argument("--mode", choices=("quote", "full", "ltp"), default="quote")
    serve_cmd = sub.add_parser("serve", help="(internal) run the simulator for the benchmark")
    serve_cmd.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.command == "orders":
        bench_orders(args.runs, args.seconds, args.accounts, args.concurrency)
    elif args.command == "ticks":
        bench_ticks(args.runs, args.seconds, args.mode)
    else:
        serve(args.port)


if __name__ == "__main__":
    main()

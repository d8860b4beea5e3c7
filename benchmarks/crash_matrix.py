"""The crash matrix over many seeds: `python -m benchmarks.crash_matrix --seeds 20 [--first 1] [--strategies 200]`.

`--workers 3 --schedulers 2` runs several workers and schedulers: a worker killed in a BUY burst, one added while
stops are crossing and one removed while BUYs are due, a scheduler killed; judged as well on every partition of
ticks, orders and time-events having exactly one live owner soon after each move, and on no tick lost or
checked twice across a handover (tests/crash/ownership.py, tests/crash/tick_ledger.py).

A third of the strategies (`--exit-kinds`, 0 for none) trade a target, a trailing stop, a stop moved to cost,
re-entries or a loss limit, and one user has a daily loss limit (`--daily-loss-limit`, 0 for none); each entry and
exit cycle is judged on its own (tests/crash/exit_kinds.py).

`--egress`: every user's order calls through its own real proxy (tinyproxy) on its own loopback address, the
simulator checking each call's source address, and one user's proxy killed and restarted among the faults.

Each seed runs `tests.crash.harness.run_matrix` on a stack of its own (Apache Kafka, or Tansu with
`--kafka tansu` or without a JDK; redis-server, SQLite, the
simulator, `algo api|worker|scheduler|ticker`), killing and restarting every part at moments drawn from the
seed. One line per seed, then a summary; every violation of a failing seed is printed under its line, with
where its services' logs are kept (a passing seed's are removed, unless `--workdir` asks to keep every seed's).
Exit code 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.crash.harness import KILLS, MULTI_KILLS, MatrixConfig, MatrixResult, run_matrix


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds (consecutive from --first)")
    parser.add_argument("--first", type=int, default=1, help="the first seed")
    parser.add_argument("--seed", type=int, action="append", default=[], help="run exactly this seed (repeatable)")
    parser.add_argument("--strategies", type=int, default=200)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--speed", type=float, default=30.0)
    parser.add_argument("--day-seconds", type=float, default=45.0)
    parser.add_argument("--fault-rate", type=float, default=0.02)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep each seed's logs under this directory (by default only a failed or late seed's are kept)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-incident progress lines")
    parser.add_argument(
        "--kafka",
        choices=["auto", "apache", "tansu"],
        default="auto",
        help="the broker each seed runs (auto: Apache Kafka where a JDK is present)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="workers at the start (more than 1: one added mid-day, one removed)"
    )
    parser.add_argument("--schedulers", type=int, default=1)
    parser.add_argument(
        "--egress",
        action="store_true",
        help="each user's orders through its own tinyproxy on its own loopback address; one proxy is killed",
    )
    parser.add_argument("--show-late", type=int, default=5, help="late stop exits listed per seed")
    parser.add_argument(
        "--exit-kinds",
        type=float,
        default=0.3,
        help="share of strategies with a target, trailing stop, move to cost, re-entry or loss limit (0: fixed stops)",
    )
    parser.add_argument(
        "--daily-loss-limit", type=float, default=800.0, help="one user's daily loss limit in rupees (0: none)"
    )
    return parser.parse_args(argv)


async def run_seeds(args: argparse.Namespace) -> list[MatrixResult]:
    seeds = args.seed or list(range(args.first, args.first + args.seeds))
    results: list[MatrixResult] = []
    # SIGTERM and Ctrl-C cancel the run, so the seed under way still stops every process it started.
    task = asyncio.current_task()
    if task is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    for seed in seeds:
        config = MatrixConfig(
            seed=seed,
            strategies=args.strategies,
            users=args.users,
            speed=args.speed,
            day_seconds=args.day_seconds,
            fault_rate=args.fault_rate,
            kills=MULTI_KILLS if args.workers > 1 else KILLS,
            workers=args.workers,
            schedulers=args.schedulers,
            workdir=args.workdir / f"seed-{seed}" if args.workdir else None,
            verbose=not args.quiet,
            kafka=args.kafka,
            egress=args.egress,
            exit_kinds=args.exit_kinds,
            daily_loss_limit=args.daily_loss_limit,
        )
        try:
            result = await run_matrix(config)
        except Exception as exc:  # a harness error is a failed seed, and the run goes on
            result = MatrixResult(seed, violations=[f"harness error: {type(exc).__name__}: {exc}"])
        results.append(result)
        print(result.line(), flush=True)
        if args.workdir is None and result.workdir:
            if result.passed and not result.late_exits:
                shutil.rmtree(result.workdir, ignore_errors=True)  # a few MB a seed, of a seed with nothing to see
            else:
                print(f"    logs kept in {result.workdir}", flush=True)
        for violation in result.violations:
            print(f"    {violation}", flush=True)
        for late in result.late_exits[: args.show_late]:
            print(f"    late: {late}", flush=True)
        if args.workers > 1:
            for line in result.handover_lines():
                print(f"    {line}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.monotonic()
    try:
        results = asyncio.run(run_seeds(args))
    except asyncio.CancelledError:
        print("stopped: the seed under way was torn down", flush=True)
        return 130
    failed = [r.seed for r in results if not r.passed]
    late = [r.seed for r in results if r.late_exits]
    delays = [d for r in results for d in r.stop_exit_delays]
    excess = [e for r in results for e in r.stop_exit_excess]
    print(
        f"summary: {len(results) - len(failed)}/{len(results)} seeds passed"
        f"{' (failed: ' + ', '.join(map(str, failed)) + ')' if failed else ''}; "
        f"{sum(r.strategies for r in results)} strategies, {sum(r.bought for r in results)} bought, "
        f"{sum(r.broker_orders for r in results)} broker orders, {sum(r.faulted_requests for r in results)} "
        f"faulted requests, {sum(len(r.incidents) for r in results)} incidents; worst stop exit after the "
        f"system was up: {max(delays, default=0.0):.2f}s; {time.monotonic() - began:.0f}s",
        flush=True,
    )
    # The latency judgement is made here, over many seeds on a quiet machine, not in CI's single seed: a timing
    # bound asserted on a shared runner fails on the runner's stalls as much as on the system's.
    print(
        f"stop exits past the bound (5 s after the system is up, plus the user's rate limit and fault retries): "
        f"{sum(len(r.late_exits) for r in results)} in {len(late)} seed(s)"
        f"{' (' + ', '.join(map(str, late)) + ')' if late else ''}; worst {max(excess, default=0.0):+.2f}s",
        flush=True,
    )
    return 1 if failed or late else 0


if __name__ == "__main__":
    sys.exit(main())

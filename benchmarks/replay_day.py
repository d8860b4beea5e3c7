"""A trading day replayed through the whole product: `python -m benchmarks.replay_day [--kafka apache|tansu|both]
[--speed 60] [--quick]`.

For each broker, one run: Kafka, redis-server, SQLite, the simulator in this process (following the replayed
prices), and `algo api`, `algo worker`, `algo scheduler` as child processes on a project clock that runs
`--speed` times faster than real time, reaching 09:15 of the next trading day 90 s after the start. Ten
traders register, connect their simulator accounts and create and START 312 strategies through the REST API,
spread over three instruments and the day; then the day's ticks go out through `connectors.replay.replay`
(what `algo replay` runs) at `--speed` times their recorded pace.

The day: no recorded NSE data can be fetched here, so it is generated, seeded and shaped like the session the
issue replayed (59,562 ticks of NIFTY futures on 2022-01-03 mapped onto three NSE equities): exponential gaps
averaging the session's 0.38 s, a random walk of 1.1 % daily volatility per instrument with a few sharp
drops. The stops are placed on that path, so which strategies must exit by their stop, and on which tick,
is known before the run: about 96 % cross (away from their BUY and SELL times by 15 s of exchange time).

Reported: the tick feed's lateness minute by minute (the worker's own one-line summaries); each stop exit's
delay from its crossing tick's publication to the simulator receiving the SELL; and the checks of issue 26:
recovery runs at most once, one ARMED event per bought strategy, no exit intent twice on `orders`, and every
strategy's `GET /strategy/status/{id}` agreeing with the simulator's order book (last action, exit price).
Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import random
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from benchmarks._support import Stack, TopicWatcher, percentile, settings_env
from connectors.kite_sim import RunningSimulator, SimConfig
from connectors.replay import RecordedTick, replay
from core.clock import ScaledClock
from core.embedded import free_port, wait_for_port
from core.market import MarketCalendar
from core.settings import Settings
from schemas.events import Action, LifecycleKind, broker_tag_for, intent_id_for

IST = ZoneInfo("Asia/Kolkata")
INSTRUMENTS = {"NSE:INFY": 1500.0, "NSE:TCS": 4000.0, "NSE:RELIANCE": 2500.0}
DAY_TICKS = 59_562
OPEN, CLOSE = clock_time(9, 15), clock_time(15, 30)
MARGIN = timedelta(seconds=15)  # exchange time kept clear of a crossing around each BUY and SELL time
PASSWORD = "Repl4y-the-day-passw0rd"  # noqa: S105 - a benchmark's throwaway accounts on loopback


@dataclass
class Planned:
    index: int
    trader: int
    instrument: str
    buy: datetime
    sell: datetime
    stop: float
    crossing: RecordedTick | None  # the first tick at or under the stop between BUY and SELL, if any
    strategy_id: int = 0


@dataclass
class Trader:
    email: str
    headers: dict[str, str] = field(default_factory=dict)
    api_key: str = ""


def recorded_day(day: date, ticks: int, seed: int) -> list[RecordedTick]:
    """The generated session (see the module's docstring), in time order."""
    rng = random.Random(seed)
    start = datetime.combine(day, OPEN, IST)
    seconds = (datetime.combine(day, CLOSE, IST) - start).total_seconds()
    price = dict(INSTRUMENTS)
    sigma_per_tick = 0.011 / math.sqrt(ticks / len(INSTRUMENTS))
    out: list[RecordedTick] = []
    at = 0.0
    mean_gap = seconds / ticks
    names = list(INSTRUMENTS)
    for _ in range(ticks):
        at = min(at + rng.expovariate(1 / mean_gap), seconds - 0.001)
        name = names[rng.randrange(len(names))]
        move = rng.gauss(0, sigma_per_tick)
        if rng.random() < 0.0004:
            move -= 0.004  # a sharp drop: several stops cross on one tick
        price[name] = round(max(price[name] * (1 + move), 1.0) * 20) / 20  # NSE tick size 0.05
        out.append(RecordedTick(start + timedelta(seconds=at), name, price[name], 1, 0))
    return out


def key(tick: RecordedTick) -> tuple[datetime, str]:
    return tick.at, tick.instrument


def write_day(path: Path, ticks: list[RecordedTick]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "instrument", "last_price", "volume"])
        for tick in ticks:
            writer.writerow([tick.at.isoformat(), tick.instrument, f"{tick.last_price:.2f}", tick.volume])


def plan_strategies(day_ticks: list[RecordedTick], count: int, traders: int, seed: int) -> list[Planned]:
    rng = random.Random(seed + 1)
    by_instrument: dict[str, list[RecordedTick]] = {}
    for tick in day_ticks:
        by_instrument.setdefault(tick.instrument, []).append(tick)
    day = day_ticks[0].at.date()
    first, last = day_ticks[0].at, day_ticks[-1].at
    plans: list[Planned] = []
    while len(plans) < count:
        instrument = list(INSTRUMENTS)[len(plans) % len(INSTRUMENTS)]
        span = (last - first).total_seconds()
        buy = first + timedelta(seconds=int(rng.uniform(0.02, 0.7) * span))
        latest_sell = min(last - timedelta(minutes=1), datetime.combine(day, clock_time(15, 15), IST))
        sell = min(buy + timedelta(minutes=rng.uniform(20, 80)), latest_sell)
        if sell - buy < 4 * MARGIN:
            continue
        buy, sell = buy.replace(microsecond=0), sell.replace(microsecond=0)
        series = by_instrument[instrument]
        near_buy = [t.last_price for t in series if buy < t.at <= buy + MARGIN]
        between = [t for t in series if buy + MARGIN < t.at <= sell - MARGIN]
        near_sell = [t.last_price for t in series if sell - MARGIN < t.at <= sell]
        before = [t.last_price for t in series if t.at <= buy]
        if not near_buy or not between or not before:
            continue
        floor_near_buy = min(near_buy + before[-1:])
        low = min(t.last_price for t in between)
        hit = len(plans) % 25 != 0 and low < floor_near_buy - 0.2  # about 96 % must exit by their stop
        if hit:
            stop = round((low + 0.35 * (floor_near_buy - low)) * 20) / 20
            if stop >= floor_near_buy:
                continue
            crossing = next(t for t in between if t.last_price <= stop)
        else:
            stop = round(min([low, floor_near_buy, *near_sell]) * 0.99 * 20) / 20
            crossing = None
        plans.append(Planned(len(plans), len(plans) % traders, instrument, buy, sell, stop, crossing))
    return plans


def expect(response: httpx.Response, *codes: int) -> None:
    if response.status_code not in codes:
        raise RuntimeError(f"{response.request.url.path}: {response.status_code} {response.text[:300]}")


async def register(client: httpx.AsyncClient, sim: RunningSimulator, index: int, tag: str) -> Trader:
    trader = Trader(email=f"replay-{tag}-{index}@example.com")
    body = {"email": trader.email, "password": PASSWORD}
    expect(await client.post("/auth/register", json=body), 201)
    login = await client.post("/auth/login", json=body)
    trader.headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    creds = sim.state.create_account(api_key=f"rp{tag}{index}", user_name=trader.email, balance=1e12)
    connect = {"api_key": creds.api_key, "api_secret": creds.api_secret, "access_token": creds.access_token}
    response = await client.post("/broker/connect", json=connect, headers=trader.headers)
    expect(response, 200, 201)
    trader.api_key = creds.api_key
    return trader


async def create_and_start(client: httpx.AsyncClient, traders: list[Trader], plans: list[Planned]) -> None:
    gate = asyncio.Semaphore(8)

    async def one(plan: Planned) -> None:
        async with gate:
            headers = traders[plan.trader].headers
            body = {"symbol": plan.instrument, "quantity": 1, "buy_time": plan.buy.strftime("%H:%M:%S"),
                    "sell_time": plan.sell.strftime("%H:%M:%S"), "stop_loss": plan.stop, "product": "MIS"}  # fmt: skip
            created = await client.post("/strategy/create", json=body, headers=headers)
            expect(created, 201)
            plan.strategy_id = created.json()["strategy_id"]
            started = await client.post("/strategy/start", json={"strategy_id": plan.strategy_id}, headers=headers)
            expect(started, 200)

    await asyncio.gather(*(one(plan) for plan in plans))


@dataclass
class Outcome:
    engine: str
    lateness_lines: list[str]
    exit_delays_ms: list[float]
    recoveries: int
    armed: Counter[int]
    exit_intents: dict[tuple[int, str], list[str]]  # (strategy id, intent id) -> each publication's trigger
    mismatches: list[str]
    missing_exits: list[str]
    replay_rate: float
    seconds: float

    @property
    def armed_twice(self) -> list[int]:
        return [strategy_id for strategy_id, n in self.armed.items() if n > 1]

    @property
    def doubled_intents(self) -> list[tuple[int, str]]:
        return [key for key, triggers in self.exit_intents.items() if len(triggers) > 1]

    def problems(self) -> list[str]:
        """What broke issue 26's rules in this run: empty when everything held."""
        found = [*self.missing_exits, *self.mismatches]
        if self.recoveries > 1:
            found.append(f"recovery ran {self.recoveries} times")
        found += [f"strategy {sid} armed more than once" for sid in self.armed_twice]
        found += [
            f"exit intent {intent} published more than once (triggers {', '.join(self.exit_intents[(sid, intent)])})"
            for sid, intent in self.doubled_intents
        ]
        return found


@dataclass(frozen=True)
class DayRun:
    """What one run replays: the whole day or its first `minutes`, with how many strategies and traders."""

    speed: float = 60.0
    minutes: float | None = None
    strategies: int = 312
    traders: int = 10
    seed: int = 20220103


QUICK = DayRun(minutes=60, strategies=60)


async def run_one(engine: str, run: DayRun, settings_overrides: dict[str, str] | None = None) -> Outcome:
    """One broker's run (see the module's docstring); the outcome says what held."""
    speed, seed = run.speed, run.seed
    began = time.monotonic()
    calendar = MarketCalendar(Settings())
    day = calendar.next_trading_day(datetime.now(IST).date() + timedelta(days=1))
    ticks = recorded_day(day, DAY_TICKS, seed)
    if run.minutes is not None:  # the day's first minutes only
        ticks = [t for t in ticks if t.at < datetime.combine(day, OPEN, IST) + timedelta(minutes=run.minutes)]
    plans = plan_strategies(ticks, run.strategies, run.traders, seed)
    async with Stack(settings=settings_overrides, kafka=engine) as stack:
        # Setup (services, traders, strategies) takes 20 to 40 s of real time, an hour and more of exchange time
        # at 60x: the clock starts early enough that the day's first tick is still ahead when it is done.
        clock = ScaledClock(start=datetime.combine(day, OPEN, IST) - timedelta(seconds=90 * speed), speed=speed)
        api_port = free_port()
        prefix = f"rd{uuid.uuid4().hex[:6]}-"
        day_file = stack.workdir / "day.csv"
        write_day(day_file, ticks)
        async with RunningSimulator(clock=clock, config=SimConfig(tick_interval=1.0), walk=False) as sim:
            for instrument, price in INSTRUMENTS.items():
                sim.state.set_price(instrument, price)
            # The safety nets' delays are exchange seconds, which pass `speed` times faster here: a SELL not done
            # 10 exchange seconds (0.17 s at 60x) after its time would be sent again by the overdue-SELL net.
            settings = stack.settings(prefix, api_host="127.0.0.1", api_port=api_port, kite_api_root=sim.rest_root,
                                      missed_buy_grace_seconds=120.0, sell_overdue_seconds=10.0 * speed)  # fmt: skip
            env = settings_env(settings, clock)
            from core.kafka import ensure_topics

            await ensure_topics(settings)
            api = stack.start_service("api", env)
            worker = stack.start_service("worker", env)
            scheduler = stack.start_service("scheduler", env)
            await asyncio.to_thread(wait_for_port, "127.0.0.1", api_port, 60.0)
            await asyncio.gather(worker.wait_ready(), scheduler.wait_ready())
            watcher = await TopicWatcher(
                stack.kafka_bootstrap, [settings.topic("strategy-lifecycle"), settings.topic("orders")]
            ).start()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
                traders = [await register(client, sim, n, prefix.rstrip("-")) for n in range(run.traders)]
                await create_and_start(client, traders, plans)
                print(f"[{engine}] {len(plans)} strategies of {len(traders)} traders started; replaying "
                      f"{len(ticks):,} ticks at {speed:g}x", flush=True)  # fmt: skip
                published: dict[tuple[datetime, str], float] = {}  # crossing tick -> time.monotonic() published
                crossings = {key(p.crossing) for p in plans if p.crossing is not None}

                def follow(tick: RecordedTick) -> None:
                    sim.state.set_price(tick.instrument, tick.last_price)
                    if key(tick) in crossings:
                        published[key(tick)] = time.monotonic()

                # The day starts when the clock reads its first tick.
                if (ahead := clock.seconds_until(ticks[0].at)) <= 0:
                    raise RuntimeError(f"setup ended {-ahead:.1f} s after the first tick: start the clock earlier")
                await asyncio.sleep(ahead)
                _, replay_rate = await replay(settings, day_file, speed, False, clock, follow)
                await settle(sim, traders, plans, within=60.0)
                statuses = {
                    p.strategy_id: (
                        await client.get(f"/strategy/status/{p.strategy_id}", headers=traders[p.trader].headers)
                    ).json()
                    for p in plans
                }
            await watcher.stop()
            outcome = judge(engine, plans, traders, sim, statuses, watcher.records, published, settings, day)
            outcome.lateness_lines = [line for line in worker.lines if "tick feed:" in line and "behind" in line]
            outcome.recoveries = worker.count("recovery needed")
            outcome.replay_rate = replay_rate
            stack.keep_logs = bool(outcome.problems())
            for service in (api, worker, scheduler):
                service.stop()
    outcome.seconds = time.monotonic() - began
    return outcome


async def settle(sim: RunningSimulator, traders: list[Trader], plans: list[Planned], within: float) -> None:
    """Until every bought strategy has its exit at the broker (or `within` seconds pass)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sells = sum(
            1 for t in traders for r in sim.state.audit_records(api_key=t.api_key)
            if r.action == "place" and r.params.get("transaction_type") == "SELL"
        )  # fmt: skip
        if sells >= len(plans):
            return
        await asyncio.sleep(0.5)


def judge(
    engine: str, plans: list[Planned], traders: list[Trader], sim: RunningSimulator, statuses: dict[int, Any],
    records: list[Any], published: dict[tuple[datetime, str], float], settings: Settings, day: date,
) -> Outcome:  # fmt: skip
    armed: Counter[int] = Counter()
    exit_intents: dict[tuple[int, str], list[str]] = {}
    for record in records:
        value = orjson.loads(record.value)
        if record.topic == settings.topic("strategy-lifecycle") and value.get("kind") == LifecycleKind.ARMED.value:
            armed[value["spec"]["strategy_id"]] += 1
        elif record.topic == settings.topic("orders") and value.get("action") in ("SELL", "STOPLOSS", "EXIT"):
            exit_intents.setdefault((value["strategy_id"], value["intent_id"]), []).append(str(value.get("trigger")))
    mismatches: list[str] = []
    missing: list[str] = []
    delays: list[float] = []
    for plan in plans:
        api_key = traders[plan.trader].api_key
        status = statuses[plan.strategy_id]
        exits = {
            action: orders
            for action in (Action.STOPLOSS, Action.SELL, Action.EXIT)
            if (orders := sim.state.find_orders(api_key, broker_tag_for(intent_id_for(plan.strategy_id, day, 1,
                                                                                       action))))
        }  # fmt: skip
        filled = [(a, o) for a, orders in exits.items() for o in orders if o.status == "COMPLETE"]
        expected = Action.STOPLOSS if plan.crossing is not None else Action.SELL
        if len(filled) != 1:
            missing.append(f"#{plan.index} strategy {plan.strategy_id}: {len(filled)} filled exits at the broker")
            continue
        action, order = filled[0]
        if action is not expected:
            crossing = f"crossing {plan.crossing.last_price} at {plan.crossing.at:%H:%M:%S.%f}" if plan.crossing else ""
            missing.append(f"#{plan.index} strategy {plan.strategy_id}: exited by {action.value}, the path says "
                           f"{expected.value} (BUY {plan.buy:%H:%M:%S}, SELL {plan.sell:%H:%M:%S}, stop {plan.stop}, "
                           f"{crossing})")  # fmt: skip
        broker_price = order.average_price / 100
        if (
            status.get("last_action") != action.value
            or status.get("exit_price") != broker_price
            or status.get("position") in ("bought", "selling")
        ):
            mismatches.append(
                f"strategy {plan.strategy_id}: status {status.get('position')}/{status.get('last_action')}/"
                f"{status.get('exit_price')} vs the broker's {action.value} at {broker_price}"
            )
        if plan.crossing is not None and key(plan.crossing) in published and action is Action.STOPLOSS:
            audit = [r for r in sim.state.audit_records(api_key=api_key) if r.tag == broker_tag_for(
                intent_id_for(plan.strategy_id, day, 1, Action.STOPLOSS))]  # fmt: skip
            if audit:
                delays.append((audit[0].received_monotonic - published[key(plan.crossing)]) * 1000)
    return Outcome(engine, [], delays, 0, armed, exit_intents, mismatches, missing, 0.0, 0.0)


def report(outcome: Outcome, plans: int) -> bool:
    print(f"\n== {outcome.engine}: {outcome.seconds:.0f} s; replay published {outcome.replay_rate:,.0f} ticks/s")
    print("tick feed lateness, minute by minute (the worker's own summaries):")
    pattern = re.compile(r"tick feed: (\d+) ticks .* read p50 (\d+) / p99 (\d+) / max (\d+) ms")
    worst = 0
    for minute, line in enumerate(outcome.lateness_lines, 1):
        if found := pattern.search(line):
            n, p50, p99, top = found.groups()
            worst = max(worst, int(top))
            print(f"  minute {minute}: {int(n):,} ticks, p50 {p50} ms, p99 {p99} ms, max {top} ms")
    delays = outcome.exit_delays_ms
    if delays:
        p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
        figures = f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(delays):.0f} ms"
        print(f"stop exits, crossing tick published -> SELL at the simulator (n={len(delays)}): {figures}")
    armed_twice, doubled = outcome.armed_twice, outcome.doubled_intents
    print(f"recovery runs: {outcome.recoveries}; ARMED events {sum(outcome.armed.values())} for "
          f"{len(outcome.armed)} strategies ({len(armed_twice)} armed more than once); exit intents "
          f"{sum(map(len, outcome.exit_intents.values()))}, {len(doubled)} published more than once")  # fmt: skip
    print(
        f"status vs the simulator's book: {plans - len(outcome.mismatches) - len(outcome.missing_exits)}/{plans} "
        f"agree; {len(outcome.missing_exits)} exits not as the path says; {len(outcome.mismatches)} mismatches"
    )
    for line in (outcome.missing_exits + outcome.mismatches)[:10]:
        print(f"    {line}")
    return not outcome.problems()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kafka", choices=("apache", "tansu", "both"), default="both")
    parser.add_argument("--speed", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="the first hour, 60 strategies")
    parser.add_argument("--seed", type=int, default=20220103)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a Settings field for every service of the run (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.setting)
    engines = ["apache", "tansu"] if args.kafka == "both" else [args.kafka]
    passed = True
    for engine in engines:
        run = DayRun(speed=args.speed, seed=args.seed)
        if args.quick:
            run = QUICK
        outcome = asyncio.run(run_one(engine, run, overrides))
        passed &= report(outcome, run.strategies)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

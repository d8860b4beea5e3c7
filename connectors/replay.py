"""Replay a recorded tick file into the `ticks` topic: the analysts' and load testers' tool (`algo replay`).

File formats (one tick per row, in time order):
- CSV with a header: `timestamp,instrument,last_price[,volume][,token]`
- JSONL: one object per line with the same keys.
`timestamp` is ISO 8601 (a naive one is exchange time) or unix seconds; `instrument` is EXCHANGE:SYMBOL.
Ticks go out keyed by instrument, as the live connector publishes them, at the recorded pace, at `speed`
times it, or (speed None) as fast as the broker takes them. The last line printed is the achieved ticks/s.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
from aiokafka import AIOKafkaProducer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.clock import Clock, get_clock
from core.settings import Settings


class ReplayFileError(ValueError):
    """The file cannot be replayed; the message names the line and what to fix."""


@dataclass(frozen=True, slots=True)
class RecordedTick:
    at: datetime
    instrument: str
    last_price: float
    volume: int
    token: int


def _parse_time(value: str | float | int, tz: ZoneInfo) -> datetime:
    if isinstance(value, int | float) or (isinstance(value, str) and value.replace(".", "", 1).isdigit()):
        return datetime.fromtimestamp(float(value), UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)


def _row_to_tick(row: dict[str, object], where: str, tz: ZoneInfo) -> RecordedTick:
    try:
        instrument = str(row["instrument"])
        if ":" not in instrument:
            raise ValueError(f"instrument {instrument!r} must be EXCHANGE:SYMBOL, e.g. NSE:INFY")
        return RecordedTick(
            at=_parse_time(row["timestamp"], tz),  # type: ignore[arg-type]
            instrument=instrument,
            last_price=float(row["last_price"]),  # type: ignore[arg-type]
            volume=int(row.get("volume") or 0),  # type: ignore[call-overload]
            token=int(row.get("token") or 0),  # type: ignore[call-overload]
        )
    except KeyError as exc:
        raise ReplayFileError(
            f"{where}: missing column {exc.args[0]!r} (need timestamp,instrument,last_price)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ReplayFileError(f"{where}: {exc}") from None


def read_ticks(path: Path, market_timezone: str = "Asia/Kolkata") -> Iterator[RecordedTick]:
    tz = ZoneInfo(market_timezone)
    with path.open(newline="") as handle:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise ReplayFileError(f"{path.name} line {number}: not JSON ({exc})") from None
                    yield _row_to_tick(row, f"{path.name} line {number}", tz)
        else:
            for number, row in enumerate(csv.DictReader(handle), 2):
                yield _row_to_tick(dict(row), f"{path.name} line {number}", tz)


async def replay(
    settings: Settings,
    path: Path,
    speed: float | None,
    show_progress: bool = True,
    clock: Clock | None = None,
    observe: Callable[[RecordedTick], object] | None = None,
) -> tuple[int, float]:
    """Publish the file's ticks; returns (count, ticks per second achieved). `observe` is called with each
    tick just before it is published (a paper exchange following the recorded prices, in the benchmarks)."""
    ticks = list(read_ticks(path, settings.market_timezone))
    if not ticks:
        raise ReplayFileError(f"{path.name}: no ticks in the file")
    topic = settings.topic("ticks")
    clock = clock or get_clock()
    # Paced, as the live connector publishes (linger 1 ms, acks=1: a tick's CreateTime is taken when it is
    # queued, so the linger is part of every tick's lateness); as fast as possible, in large batches.
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=1 if speed is not None else 5, acks=1,
        enable_idempotence=False, max_batch_size=256 * 1024,
    )  # fmt: skip
    await producer.start()
    started = time.perf_counter()
    first = ticks[0].at
    progress = Progress(
        TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress
    )
    try:
        with progress:
            task = progress.add_task("ticks", total=len(ticks))
            pending = []
            for index, tick in enumerate(ticks):
                if speed is not None:
                    due = started + (tick.at - first).total_seconds() / speed
                    if (delay := due - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                if observe is not None:
                    observe(tick)
                value = orjson.dumps({
                    "instrument": tick.instrument, "token": tick.token, "last_price": tick.last_price,
                    "volume": tick.volume, "exchange_time": tick.at.isoformat(),
                    "received_at": clock.now().isoformat(),
                })  # fmt: skip
                pending.append(await producer.send(topic, value=value, key=tick.instrument.encode()))
                if index % 1000 == 999:
                    progress.update(task, completed=index + 1)
            await asyncio.gather(*pending)
            progress.update(task, completed=len(ticks))
    finally:
        await producer.stop()
    elapsed = time.perf_counter() - started
    return len(ticks), len(ticks) / elapsed if elapsed > 0 else float("inf")


def run_replay(settings: Settings, path: Path, speed: float | None) -> None:
    count, rate = asyncio.run(replay(settings, Path(path), speed))
    print(f"replayed {count} ticks to {settings.topic('ticks')}: {rate:,.0f} ticks/s")

"""Every tick the workers checked, by partition and offset, from their audit lines (`Settings.tick_feed_audit`).

A worker's life from one start to its end is a stint; a Kafka broker restarted empty begins a new epoch
(offsets start again at 0). Per epoch and partition, the ledger says:

- lost: an offset below the highest one checked that no stint checked (a tick whose stop was never looked at);
- re-read: an offset checked again after the stint that checked it first was killed (at least once: its
  last offsets were not committed yet), or by the same stint (a batch that failed is read again);
- checked twice: an offset checked by two stints of which the first was not killed, i.e. across a clean
  handover (a worker added or removed, or partitions moved by a rebalance), where the committed offset
  should have told the new owner exactly where to start;
- per handover (the checker of consecutive offsets changes), how long the first tick the new owner checked
  had waited since it was published: how long a stop on that partition went unchecked while it moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

AUDIT = re.compile(r"tick audit: partition (\d+) offsets (\d+)-(\d+) created ([\d.]+) checked ([\d.]+)")

KILLED = "killed"  # SIGKILL, or the process died by itself: its uncommitted offsets are read again


@dataclass(frozen=True)
class Stint:
    worker: str
    start: int  # the service's start number
    epoch: int  # the Kafka broker's life it ran in


@dataclass
class Handover:
    epoch: int
    partition: int
    offset: int  # the first offset the new owner checked
    from_stint: Stint
    to_stint: Stint
    unchecked_seconds: float  # that tick's wait from its publication to its check

    def line(self) -> str:
        return (f"ticks[{self.partition}]@{self.offset} {self.from_stint.worker}#{self.from_stint.start} -> "
                f"{self.to_stint.worker}#{self.to_stint.start}: {self.unchecked_seconds:.2f}s unchecked")  # fmt: skip


@dataclass
class TickCount:
    checked: int = 0  # distinct offsets
    lost: list[str] = field(default_factory=list)
    reread: int = 0
    twice: list[str] = field(default_factory=list)
    handovers: list[Handover] = field(default_factory=list)


@dataclass
class _Batch:
    first: int
    last: int
    created: float
    checked: float
    stint: Stint


class TickLedger:
    def __init__(self) -> None:
        self.batches: dict[tuple[int, int], list[_Batch]] = {}  # (epoch, partition) -> batches
        self.ended: dict[Stint, str] = {}  # stint -> how it ended ("killed", "stopped"); absent: running

    def line(self, stint: Stint, text: str) -> None:
        match = AUDIT.search(text)
        if match is None:
            return
        partition, first, last = int(match[1]), int(match[2]), int(match[3])
        batch = _Batch(first, last, float(match[4]), float(match[5]), stint)
        self.batches.setdefault((stint.epoch, partition), []).append(batch)

    def end(self, stint: Stint, how: str) -> None:
        self.ended.setdefault(stint, how)

    def count(self) -> TickCount:
        result = TickCount()
        for (epoch, partition), batches in sorted(self.batches.items()):
            checks: dict[int, list[_Batch]] = {}
            for batch in sorted(batches, key=lambda b: b.checked):
                for offset in range(batch.first, batch.last + 1):
                    checks.setdefault(offset, []).append(batch)
            top = max(checks)
            result.checked += len(checks)
            missing = [offset for offset in range(top + 1) if offset not in checks]
            if missing:
                result.lost.append(f"epoch {epoch} ticks[{partition}]: {len(missing)} offsets never checked "
                                   f"({_ranges(missing)})")  # fmt: skip
            owner: _Batch | None = None
            for offset in range(top + 1):
                seen = checks.get(offset, [])
                for earlier, later in zip(seen, seen[1:], strict=False):
                    if earlier.stint == later.stint or self.ended.get(earlier.stint) == KILLED:
                        result.reread += 1
                    else:
                        result.twice.append(f"epoch {epoch} ticks[{partition}]@{offset}: checked by "
                                            f"{earlier.stint.worker}#{earlier.stint.start} "
                                            f"({self.ended.get(earlier.stint, 'running')}) and again by "
                                            f"{later.stint.worker}#{later.stint.start}")  # fmt: skip
                if not seen:
                    continue
                # The handover is where the last checker of this offset differs from the previous offset's.
                last = seen[-1]
                if owner is not None and last.stint != owner.stint:
                    fresh = seen[0] if seen[0].stint == last.stint else last
                    result.handovers.append(
                        Handover(epoch, partition, offset, owner.stint, last.stint, fresh.checked - fresh.created)
                    )
                owner = last
        return result


def _ranges(offsets: list[int], shown: int = 5) -> str:
    spans: list[str] = []
    start = prev = offsets[0]
    for offset in offsets[1:] + [-2]:
        if offset != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else str(start))
            start = offset
        prev = offset
    return ", ".join(spans[:shown]) + (" ..." if len(spans) > shown else "")

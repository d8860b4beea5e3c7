"""The audit log: one record per order request received (place, modify, cancel), whatever its outcome.

It is the judge of end-to-end tests (duplicates per tag, latency, what the broker actually saw), so each
record carries both the project-clock receive time and `time.monotonic()` stamps taken when the request
arrived and when its answer was decided.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class AuditRecord:
    seq: int
    action: str  # "place" | "modify" | "cancel"
    received_at: datetime  # project clock (UTC, aware)
    received_monotonic: float
    api_key: str | None
    variety: str | None
    params: dict[str, str]
    tag: str | None = None
    order_id: str | None = None  # the order placed / targeted
    http_status: int = 0
    outcome: str = "pending"  # placed | modified | cancelled | error | timeout
    error_type: str | None = None
    message: str | None = None
    order_status: str | None = None  # order status when the answer was decided (e.g. REJECTED, COMPLETE)
    completed_monotonic: float | None = None
    faults: list[str] = field(default_factory=list)
    source_ip: str | None = None  # the address the request came from (Kite checks it against the whitelist)

    @property
    def latency_seconds(self) -> float | None:
        if self.completed_monotonic is None:
            return None
        return self.completed_monotonic - self.received_monotonic

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "action": self.action,
            "received_at": self.received_at.isoformat(),
            "received_monotonic": self.received_monotonic,
            "completed_monotonic": self.completed_monotonic,
            "latency_seconds": self.latency_seconds,
            "api_key": self.api_key,
            "variety": self.variety,
            "tag": self.tag,
            "order_id": self.order_id,
            "http_status": self.http_status,
            "outcome": self.outcome,
            "error_type": self.error_type,
            "message": self.message,
            "order_status": self.order_status,
            "faults": list(self.faults),
            "source_ip": self.source_ip,
            "params": dict(self.params),
        }


class AuditLog:
    """Append-only, thread-safe (tests read it from their own thread while the server appends)."""

    def __init__(self) -> None:
        self._records: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._seq = 0

    def open(
        self,
        action: str,
        received_at: datetime,
        received_monotonic: float,
        api_key: str | None,
        variety: str | None,
        params: dict[str, str],
        order_id: str | None = None,
        source_ip: str | None = None,
    ) -> AuditRecord:
        with self._lock:
            self._seq += 1
            record = AuditRecord(
                seq=self._seq,
                action=action,
                received_at=received_at,
                received_monotonic=received_monotonic,
                api_key=api_key,
                variety=variety,
                params=params,
                tag=params.get("tag") or None,
                order_id=order_id,
                source_ip=source_ip,
            )
            self._records.append(record)
            return record

    def records(
        self,
        api_key: str | None = None,
        tag: str | None = None,
        since: datetime | None = None,
        action: str | None = None,
    ) -> list[AuditRecord]:
        with self._lock:
            snapshot = list(self._records)
        return [
            r
            for r in snapshot
            if (api_key is None or r.api_key == api_key)
            and (tag is None or r.tag == tag)
            and (since is None or r.received_at >= since)
            and (action is None or r.action == action)
        ]

    def placements_by_tag(self, api_key: str | None = None) -> dict[str, int]:
        """How many *successful* placements each tag got (more than 1 means a duplicate order)."""
        counts: dict[str, int] = {}
        for r in self.records(api_key=api_key, action="place"):
            if r.tag and r.order_id is not None:
                counts[r.tag] = counts.get(r.tag, 0) + 1
        return counts

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

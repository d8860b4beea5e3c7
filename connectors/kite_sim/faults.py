"""Fault injection: make the simulator slow, silent, failing, rate limited or rejecting, on purpose.

A fault targets one api_key or every account (`api_key=None`), and either order placement only
(`scope="orders"`) or every Kite route (`scope="all"`; the `/_sim/` control API is never faulted).
It fires on the next `count` matching requests, or with probability `probability` drawn from its own
seeded RNG (deterministic), or, with neither, on every matching request until cleared.

Kinds:
* `latency`   - add `latency_ms` before handling;
* `timeout`   - hold the request `hold_seconds` (default far beyond any client timeout) or until released,
                then answer 504 NetworkException; with `process=True` the order is placed first;
* `error`     - answer `status` / `error_type` / `message` (default 503 NetworkException); with `process=True`
                the order is placed first and the error hides it (an "unclear outcome");
* `rate_limit`- answer 429 NetworkException "Too many requests";
* `reject`    - (placement only) accept the order, then reject it with `message`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FaultKind(StrEnum):
    LATENCY = "latency"
    TIMEOUT = "timeout"
    ERROR = "error"
    RATE_LIMIT = "rate_limit"
    REJECT = "reject"


class FaultScope(StrEnum):
    ORDERS = "orders"  # order placement only
    ALL = "all"


TERMINAL_KINDS = (FaultKind.TIMEOUT, FaultKind.ERROR, FaultKind.RATE_LIMIT)


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    api_key: str | None = None
    scope: FaultScope = FaultScope.ALL
    count: int | None = None
    probability: float | None = None
    seed: int | None = None
    latency_ms: float = 0.0
    hold_seconds: float = 300.0
    status: int = 503
    error_type: str = "NetworkException"
    message: str = ""
    process: bool = False
    fault_id: int = 0
    hits: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        self.scope = FaultScope(self.scope)
        if self.kind is FaultKind.REJECT:
            self.scope = FaultScope.ORDERS
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self._rng = random.Random(self.seed)  # noqa: S311 - reproducible fault draws, not crypto

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.count <= 0

    def _applies_to(self, api_key: str | None, is_placement: bool) -> bool:
        if self.api_key is not None and self.api_key != api_key:
            return False
        return self.scope is FaultScope.ALL or is_placement

    def fire(self, api_key: str | None, is_placement: bool) -> bool:
        """Does this fault hit the request? Consumes one of `count` / one RNG draw when it applies."""
        if self.exhausted or not self._applies_to(api_key, is_placement):
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        if self.count is not None:
            self.count -= 1
        self.hits += 1
        return True

    def describe(self) -> str:
        return f"{self.kind.value}#{self.fault_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id,
            "kind": self.kind.value,
            "api_key": self.api_key,
            "scope": self.scope.value,
            "count": self.count,
            "probability": self.probability,
            "seed": self.seed,
            "latency_ms": self.latency_ms,
            "hold_seconds": self.hold_seconds,
            "status": self.status,
            "error_type": self.error_type,
            "message": self.message,
            "process": self.process,
            "hits": self.hits,
        }


@dataclass(slots=True)
class FaultDecision:
    """What the matching faults add up to for one request."""

    latency_seconds: float = 0.0
    terminal: Fault | None = None  # timeout / error / rate_limit: at most one, the first registered
    reject: Fault | None = None
    fired: list[str] = field(default_factory=list)


class FaultRegistry:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._next_id = 0

    @property
    def active(self) -> bool:
        # Read without the lock on the hot path: a list's truthiness is atomic under the GIL.
        return bool(self._faults)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._next_id += 1
            fault.fault_id = self._next_id
            self._faults.append(fault)
        return fault

    def list(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def remove(self, fault_id: int) -> bool:
        with self._lock:
            before = len(self._faults)
            self._faults = [f for f in self._faults if f.fault_id != fault_id]
            return len(self._faults) != before

    def clear(self) -> None:
        with self._lock:
            self._faults = []

    def decide(self, api_key: str | None, is_placement: bool) -> FaultDecision:
        decision = FaultDecision()
        with self._lock:
            for fault in self._faults:
                if fault.kind is FaultKind.REJECT and (decision.reject is not None or not is_placement):
                    continue
                if fault.kind in TERMINAL_KINDS and decision.terminal is not None:
                    continue
                if not fault.fire(api_key, is_placement):
                    continue
                decision.fired.append(fault.describe())
                if fault.kind is FaultKind.LATENCY:
                    decision.latency_seconds += fault.latency_ms / 1000.0
                elif fault.kind is FaultKind.REJECT:
                    decision.reject = fault
                else:
                    decision.terminal = fault
            self._faults = [f for f in self._faults if not f.exhausted]
        return decision

"""The watch on a rebalance that does not complete (the worker's stops unchecked meanwhile)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from streams import rebalance_watch
from streams.rebalance_watch import STALLED_SECONDS, RebalanceWatch, recovery_state


def test_the_stall_counts_from_the_first_assignment_until_the_rebalance_completes() -> None:
    watch = RebalanceWatch(SimpleNamespace())  # type: ignore[arg-type]
    assert watch.stalled_for(time.monotonic()) == 0.0
    watch.assigned()
    first = watch.assigned_at
    watch.assigned()  # a second assignment before completion: the stall goes on from the first
    assert watch.assigned_at == first
    assert first is not None and watch.stalled_for(first + 12.0) == 12.0
    watch.completed()
    assert watch.stalled_for(time.monotonic() + 60.0) == 0.0


def test_a_completion_after_a_long_stall_is_said(caplog: pytest.LogCaptureFixture) -> None:
    watch = RebalanceWatch(SimpleNamespace())  # type: ignore[arg-type]
    watch.assigned()
    assert watch.assigned_at is not None
    watch.assigned_at -= STALLED_SECONDS + 1
    with caplog.at_level(logging.WARNING, rebalance_watch.__name__):
        watch.completed()
    assert "rebalance completed after" in caplog.text


def test_the_recovery_state_is_best_effort() -> None:
    assert recovery_state(SimpleNamespace()) == "recovery state unavailable (AttributeError)"  # type: ignore[arg-type]

"""The watch on a rebalance that does not complete (the worker's stops unchecked meanwhile)."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from streams import rebalance_watch
from streams.rebalance_watch import STALLED_SECONDS, RebalanceWatch, recovery_state


def _watch(gave_up: list[float] | None = None) -> RebalanceWatch:
    calls = gave_up if gave_up is not None else []
    return RebalanceWatch(SimpleNamespace(), give_up=lambda: calls.append(time.monotonic()))  # type: ignore[arg-type]


def test_the_stall_counts_from_the_first_assignment_until_the_rebalance_completes() -> None:
    watch = _watch()
    assert watch.stalled_for(time.monotonic()) == 0.0
    watch.assigned()
    first = watch.assigned_at
    watch.assigned()  # a second assignment before completion: the stall goes on from the first
    assert watch.assigned_at == first
    assert first is not None and watch.stalled_for(first + 12.0) == 12.0
    watch.completed()
    assert watch.stalled_for(time.monotonic() + 60.0) == 0.0


async def test_a_worker_whose_rebalance_does_not_complete_gives_up_once_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gave_up: list[float] = []
    watch = _watch(gave_up)
    watch.assigned()
    assert watch.assigned_at is not None
    watch.assigned_at -= STALLED_SECONDS  # assigned that long ago, never completed
    with caplog.at_level(logging.ERROR, rebalance_watch.__name__):
        await asyncio.wait_for(watch.run(), 5.0)
    assert len(gave_up) == 1
    assert "are not being checked" in caplog.text and "recovery state unavailable" in caplog.text


async def test_a_rebalance_that_completes_in_time_is_left_alone() -> None:
    gave_up: list[float] = []
    watch = _watch(gave_up)
    watch.assigned()
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(rebalance_watch.CHECK_SECONDS * 2)  # two checks of a rebalance still in its first second
    watch.completed()
    task.cancel()
    assert gave_up == []


def test_the_recovery_state_is_best_effort() -> None:
    assert recovery_state(SimpleNamespace()) == "recovery state unavailable (AttributeError)"  # type: ignore[arg-type]

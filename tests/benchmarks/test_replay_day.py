"""Issue 26's rules on a replayed stretch of a day: the replay benchmark's own run, smaller (the first 20
minutes at 60x, 30 strategies of 3 traders), on the suite's broker. Every strategy's status must agree with
the simulator's order book, each bought strategy armed once, no exit intent published twice, recovery run at
most once, and every exit the one the price path dictates."""

from __future__ import annotations

import os

import pytest

from benchmarks.replay_day import DayRun, run_one

pytestmark = pytest.mark.slow  # minutes each: `make pytest-slow`, which CI runs


@pytest.mark.tansu
@pytest.mark.timeout(300)
async def test_a_replayed_stretch_of_a_day_ends_with_every_status_agreeing_with_the_broker() -> None:
    outcome = await run_one(os.environ.get("TEST_KAFKA", "auto"), DayRun(minutes=20, strategies=30, traders=3))
    assert outcome.problems() == []
    assert sum(outcome.armed.values()) == len(outcome.armed) >= 25  # nearly all bought and armed once
    assert len(outcome.exit_delays_ms) >= 20  # most exits were by the stop, each on its crossing tick

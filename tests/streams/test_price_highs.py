"""The highest price since any instant, per instrument: what a trailing stop's high and a move to cost depend on,
kept in Redis so that a re-armed position goes on from them (a worker restart, a rebalance)."""

from __future__ import annotations

from redis.asyncio import Redis

from core.exit_prices import ExitRule
from schemas.events import ExitKind
from streams.exit_index import ExitIndex, Trail, position_stop
from streams.price_highs import HIGHS_KEY, KEEP_SECONDS, PriceHighs, highest_since, read_highs

INFY = "NSE:INFY"


def test_the_highest_price_since_an_instant_is_one_bisect_and_the_pairs_stay_few() -> None:
    highs = PriceHighs()
    highs.take(INFY, 1000.0, 1.0)  # not followed: nothing kept
    assert highs.since(INFY, 0.0) is None
    highs.follow(INFY)
    for at, price in enumerate([1000.0, 1010.0, 1005.0, 1007.0, 1001.0, 1003.0], start=10):
        highs.take(INFY, price, float(at))
    assert [highs.since(INFY, float(at)) for at in range(9, 17)] == [1010.0, 1010.0, 1010.0, 1007.0, 1007.0, 1003.0,
                                                                   1003.0, None]  # fmt: skip
    # A sawtooth under a high keeps at most one pair per price step, however many ticks.
    for n in range(10_000):
        highs.take(INFY, 990.0 - (n % 20) * 0.05, 100.0 + n)
    assert len(highs._pairs[INFY]) == 3 + 20  # the three above, and one per price of the sawtooth


def settled(*pairs: tuple[float, float]) -> PriceHighs:
    """INFY's highs after one finished batch of these (instant, price) ticks."""
    highs = PriceHighs()
    highs.follow(INFY)
    for at, price in pairs:
        highs.take(INFY, price, at)
    highs.settle()
    return highs


async def test_highs_written_by_one_worker_are_read_by_the_next(redis: Redis) -> None:
    first = settled((10.0, 1000.0), (11.0, 1030.0), (12.0, 1020.0))
    await first.flush(redis, 13.0)
    second = PriceHighs()
    await second.reload(redis, {INFY, "NSE:TCS"})
    assert (second.since(INFY, 10.5), second.since(INFY, 11.5), second.since("NSE:TCS", 0.0)) == (1030.0, 1020.0, None)
    second.take(INFY, 1040.0, 14.0)  # it goes on from there
    assert second.since(INFY, 10.0) == 1040.0
    assert highest_since([(1.0, 5.0), (2.0, 4.0)], 1.5) == 4.0


async def test_only_finished_batches_are_written_and_their_ticks_are_not_judged_again(redis: Redis) -> None:
    first = PriceHighs()
    first.follow(INFY)
    for offset, price in ((1, 2000.0), (2, 2030.0), (3, 2026.0)):  # three batches of one tick, finished
        first.take(INFY, price, float(offset), (offset, offset * 100))
        first.settle()
    first.take(INFY, 2050.0, 4.0, (4, 400))  # a batch under way: not written
    await first.flush(redis, 5.0)
    second = PriceHighs()
    await second.reload(redis, {INFY})
    assert (second.since(INFY, 0.0), second.since(INFY, 2.5)) == (2030.0, 2026.0)
    # Read again, the entry tick (under the stop of the later 2,030) and the others up to the mark are skipped;
    # the first tick past it ends the skipping.
    assert second.rereading
    assert [second.judged(INFY, (offset, offset * 100)) for offset in (1, 2, 3, 4)] == [True, True, True, False]
    assert not second.judged(INFY, (1, 100)) and not second.rereading
    # A recreated topic starts its offsets again, with later CreateTimes: nothing of it is skipped.
    third = PriceHighs()
    await third.reload(redis, {INFY})
    assert not third.judged(INFY, (1, 900))
    # What a batch taught is forgotten if it fails, and so is its mark.
    first.revert()
    first.take(INFY, 2010.0, 6.0, (5, 500))
    first.settle()
    assert first.since(INFY, 0.0) == 2030.0
    await first.flush(redis, 7.0)
    assert (await read_highs(redis, [INFY]))[INFY] == [(2.0, 2030.0), (3.0, 2026.0), (6.0, 2010.0)]


async def test_highs_older_than_a_day_are_forgotten_in_memory_and_in_redis(redis: Redis) -> None:
    highs = settled((1.0, 1030.0), (2.0, 1020.0), (3.0, 1010.0))
    await highs.flush(redis, 2.5 + KEEP_SECONDS)
    assert highs._pairs[INFY] == (await read_highs(redis, [INFY]))[INFY] == [(3.0, 1010.0)]


async def test_highs_written_before_the_marks_are_read_without_one(redis: Redis) -> None:
    await redis.hset(HIGHS_KEY, INFY, "[[10.0, 1030.0], [11.0, 1020.0]]")
    highs = PriceHighs()
    await highs.reload(redis, {INFY})
    assert highs.since(INFY, 10.5) == 1020.0 and not highs.judged(INFY, (0, 0))


def test_a_re_armed_position_goes_on_from_its_high_and_a_move_to_cost_it_reached() -> None:
    index = ExitIndex()
    # Trailing 10 under the high from a 1,000 entry; the highest price since it was armed was 1,030: stop 1,020.
    index.arm(1, INFY, 950.0, trail=Trail(high=1000.0, points=10.0), seen_high=1030.0)
    assert index.level(1) == 1020.0
    # Activation at 1,005, reached before the restart: active from the high; not reached: still waiting.
    index.arm(2, INFY, 950.0, trail=Trail(high=1000.0, points=10.0, activate_at=1005.0), seen_high=1012.0)
    index.arm(3, INFY, 950.0, trail=Trail(high=1000.0, points=10.0, activate_at=1015.0), seen_high=1012.0)
    assert (index.level(2), index.level(3)) == (1002.0, 950.0)
    # Moved to cost before the restart: the stop is the entry, and says so when it fires.
    index.arm(4, INFY, 882.0, cost_at=906.0, entry=900.0, seen_high=906.0)
    index.arm(5, INFY, 882.0, cost_at=906.0, entry=900.0, seen_high=905.95)
    assert (index.level(4), index.level(5)) == (900.0, 882.0)
    assert index.crossed(INFY, 1000.0)
    assert sorted((hit.strategy_id, hit.kind, hit.level) for hit in index.trigger(INFY, 1000.0)) == [
        (1, ExitKind.TRAILING_STOP, 1020.0), (2, ExitKind.TRAILING_STOP, 1002.0),
    ]  # fmt: skip
    assert index.crossed(INFY, 900.0)
    assert sorted((hit.strategy_id, hit.kind, hit.level) for hit in index.trigger(INFY, 900.0)) == [
        (3, ExitKind.STOP, 950.0), (4, ExitKind.COST_STOP, 900.0), (5, ExitKind.COST_STOP, 900.0),  # 5: at 1,000
    ]  # fmt: skip


def test_recovery_reads_the_stop_as_the_index_holds_it() -> None:
    trailing = ExitRule(stop_loss_points=50, trail_points=10, trail_activation_points=5)
    assert position_stop(trailing, 2000.0, 10, None) == 1950.0  # nothing known: the configured stop
    assert position_stop(trailing, 2000.0, 10, 2004.95) == 1950.0  # not activated
    assert position_stop(trailing, 2000.0, 10, 2030.0) == 2020.0
    to_cost = ExitRule(stop_loss_percent=2, move_to_cost_points=6, max_loss=100)
    assert position_stop(to_cost, 900.0, 10, None) == 890.0  # the loss limit, higher than the 2% stop
    assert position_stop(to_cost, 900.0, 10, 906.0) == 900.0

"""BrokerRateLimiter: each user's broker rate budget, a sliding window in Redis shared by workers.

The rate limiter's own clock (`time.time`) and its waits (`asyncio.sleep`) are replaced by a virtual clock
in most tests: Redis still runs the real script, but "waiting 0.1 s" advances the virtual clock instead
of the wall clock, so the tests assert exact counts and orders rather than timings.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from connectors.broker import ANSWERED_AT, SEND_AT
from schemas.events import Action
from streams.execution import limits
from streams.execution.limits import BrokerRateLimiter, DayBudgetExhausted
from streams.execution.priority import PRIORITY

# ------------------------------------------------------------------------------------ BrokerRateLimiter


class VirtualTime:
    """Stands in for the `time` module and `asyncio` inside streams.execution.limits: waits advance this clock."""

    def __init__(self) -> None:
        self.now = 1_750_000_000.0
        self.waits: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def virtual(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualTime]:
    clock = VirtualTime()
    monkeypatch.setattr(limits, "time", clock)
    monkeypatch.setattr(limits, "asyncio", clock)
    yield clock


@pytest_asyncio.fixture
async def second_redis(redis_url: str) -> AsyncIterator[Redis]:
    """Another worker's connection to the same Redis."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def take(limiter: BrokerRateLimiter, user_id: int, action: Action = Action.BUY) -> None:
    async with limiter.permit(user_id, PRIORITY[action]):
        pass


async def test_a_user_gets_a_seconds_budget_at_once_then_waits_for_the_window(
    redis: Redis, virtual: VirtualTime
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    assert limiter.limit == 10
    for _ in range(10):
        await take(limiter, user_id=1)
    assert virtual.waits == []
    await take(limiter, user_id=1)  # the 11th waits until the first grant leaves the one-second window
    assert virtual.waits == [pytest.approx(1.0, abs=1e-6)]
    await take(limiter, user_id=1)  # all ten left together: room again at once
    assert len(virtual.waits) == 1


async def test_users_have_budgets_of_their_own(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    for _ in range(10):
        await take(limiter, user_id=1)
    for _ in range(10):
        await take(limiter, user_id=2)
    assert virtual.waits == []


async def test_two_workers_share_one_users_budget(redis: Redis, second_redis: Redis, virtual: VirtualTime) -> None:
    worker_a = BrokerRateLimiter(redis, per_second=10)
    worker_b = BrokerRateLimiter(second_redis, per_second=10)
    for _ in range(5):
        await take(worker_a, user_id=7)
        await take(worker_b, user_id=7)
    assert virtual.waits == []
    await take(worker_b, user_id=7)  # the 11th permit, whichever worker asks, must wait
    assert virtual.waits == [pytest.approx(1.0, abs=1e-6)]


async def test_no_one_second_window_holds_more_than_the_rate(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    granted: list[float] = []
    for _ in range(40):
        await take(limiter, user_id=1)
        granted.append(virtual.now)
    busiest = max(sum(1 for t in granted if start <= t < start + 1.0) for start in granted)
    assert busiest <= 10, f"{busiest} permits within one second at a limit of 10/s"


async def test_a_stoploss_queued_behind_buys_of_the_same_user_goes_first(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    for _ in range(10):
        await take(limiter, user_id=3)  # the budget is spent: every further permit waits an interval
    order: list[str] = []

    async def ask(name: str, action: Action) -> None:
        async with limiter.permit(3, PRIORITY[action]):
            order.append(name)

    # Created in one go, they all queue before Redis is asked: the grants go by priority, the STOPLOSS first.
    tasks = [
        asyncio.create_task(ask(name, action))
        for name, action in [
            ("buy-1", Action.BUY),
            ("buy-2", Action.BUY),
            ("buy-3", Action.BUY),
            ("stoploss", Action.STOPLOSS),
            ("buy-4", Action.BUY),
        ]
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["stoploss", "buy-1", "buy-2", "buy-3", "buy-4"]


async def test_grants_reserved_for_an_instant_take_that_instants_budget_only(
    redis: Redis, virtual: VirtualTime
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    due = virtual.now + 10
    assert [await limiter.reserve(4, due) is not None for _ in range(11)] == [True] * 10 + [False]
    for _ in range(10):
        await take(limiter, user_id=4)  # now is 10 s away from those: this second's budget is whole
    assert virtual.waits == []
    # The grants for now did not shorten the key's life: the reservations outlive them.
    assert await redis.pttl("ratelimit:orders:4") > 10_000
    assert await limiter.reserve(4, due + 0.5) is None  # within a second of ten reserved grants
    assert await limiter.reserve(4, due + 1.0) is not None


async def test_a_reserved_grant_is_dated_when_its_call_returns_so_the_next_second_counts_from_there(
    redis: Redis, virtual: VirtualTime
) -> None:
    """Ten BUYs held for one instant reach the broker a little after it: the next grants count from then."""
    limiter = BrokerRateLimiter(redis, per_second=10)
    due = virtual.now
    grants = [await limiter.reserve(6, due) for _ in range(10)]
    virtual.now = due + 0.03  # the held BUYs' calls return 30 ms after their instant
    for grant in grants:
        assert grant is not None
        async with limiter.dated(6, grant):
            pass
    await take(limiter, user_id=6)
    assert virtual.now >= due + 1.03  # without the re-dating: due + 1.0, 30 ms inside the broker's second


async def test_reserved_and_immediate_grants_together_never_put_more_than_the_rate_in_a_second(
    redis: Redis, virtual: VirtualTime
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10)
    start = virtual.now
    granted = [start + 0.5 + i * 0.01 for i in range(6) if await limiter.reserve(5, start + 0.5 + i * 0.01)]
    assert len(granted) == 6
    for _ in range(20):
        await take(limiter, user_id=5)
        granted.append(virtual.now)
    assert virtual.waits, "the six reserved grants half a second ahead must hold some of these back"
    busiest = max(sum(1 for t in granted if first <= t < first + 1.0) for first in granted)
    assert busiest <= 10, f"{busiest} grants within one second at a limit of 10/s"


async def test_real_time_smoke_the_limiter_really_waits(redis: Redis) -> None:
    """Once on the wall clock: the budget at once, then roughly one permit per interval."""
    limiter = BrokerRateLimiter(redis, per_second=20)  # interval 50 ms
    started = time.monotonic()
    for _ in range(20):
        await take(limiter, user_id=9)
    burst_done = time.monotonic()
    for _ in range(4):
        await take(limiter, user_id=9)
    finished = time.monotonic()
    assert burst_done - started < 1.0  # generous: no waiting at all is expected
    assert finished - burst_done >= 0.15  # four more permits need ~0.2 s of waiting
    assert finished - started < 3.0


async def test_a_users_queued_waiters_are_granted_in_one_round_trip(redis: Redis) -> None:
    """On the wall clock (a virtual sleep would date the first grants' returns a window late)."""
    limiter = BrokerRateLimiter(redis, per_second=10)
    rounds: list[int] = []
    script = limiter._script

    async def counted(**kwargs: Any) -> Any:
        answer = await script(**kwargs)
        rounds.append(int(answer[0]))
        return answer

    limiter._script = counted  # type: ignore[assignment]
    await asyncio.wait_for(asyncio.gather(*(take(limiter, 6, Action.STOPLOSS) for _ in range(12))), 5)
    assert rounds[0] == 10  # ten at once
    assert len(rounds) <= 3  # the last two once the first calls were answered, not a round each


async def test_exits_the_window_has_no_room_for_are_given_the_instants_their_slots_free(redis: Redis) -> None:
    """On the wall clock: the two exits beyond the second's ten leave a second after the first calls' answers, as
    soon as those are known, handed over with the instant (`SEND_AT`) rather than woken at it."""
    limiter = BrokerRateLimiter(redis, per_second=10)
    answers: list[float] = []
    leaves: list[tuple[float | None, float]] = []

    async def exit_() -> None:
        async with limiter.permit(11, PRIORITY[Action.STOPLOSS]):
            leaves.append((SEND_AT.get(), time.time()))
            answered = ANSWERED_AT.get()
            assert answered is not None
            answered.append(time.time())
            answers.append(answered[-1])

    await asyncio.wait_for(asyncio.gather(*(exit_() for _ in range(12))), 5)
    ahead = sorted(send_at for send_at, _ in leaves if send_at is not None)
    assert len(ahead) == 2
    assert ahead == pytest.approx([answer + 1.0 for answer in sorted(answers)[:2]], abs=1e-3)
    assert all(started >= send_at for send_at, started in leaves if send_at is not None)


async def test_a_slot_ahead_counts_a_call_not_yet_answered_wherever_it_may_land(
    redis: Redis, virtual: VirtualTime
) -> None:
    """Two grants, one answered 0.1 s after it was made and one not yet: the next slot is a second after the answer,
    and counts the call still out as if it landed there. Once that one is answered, a second slot follows it."""
    limiter = BrokerRateLimiter(redis, per_second=2)
    start = virtual.now
    granted, _, prefix, ahead = await limiter._grant(12, 2, start)
    assert (granted, ahead) == (2, [])
    await limiter._date(12, f"{prefix}:1", start + 0.1)
    virtual.now = start + 0.2
    granted, _, _, ahead = await limiter._grant(12, 2, virtual.now)
    # Not start + 1.0 (the unanswered call may yet land anywhere after `start`), and only one: the unanswered
    # call and this one fill the window after the answered one.
    assert (granted, ahead) == (0, [pytest.approx(start + 1.1, abs=1e-4)])
    virtual.now = start + 0.5
    await limiter._date(12, f"{prefix}:2", virtual.now)
    granted, _, _, ahead = await limiter._grant(12, 1, virtual.now)
    assert (granted, ahead) == (0, [pytest.approx(start + 1.5, abs=1e-4)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    transits=st.lists(st.floats(0.0, 0.05), min_size=30, max_size=30),
    answers=st.lists(st.floats(0.001, 0.9), min_size=30, max_size=30),
)
async def test_no_second_holds_more_arrivals_than_the_rate_however_the_calls_travel(
    redis: Redis, virtual: VirtualTime, transits: list[float], answers: list[float]
) -> None:
    """30 exits of one user, every one waiting from the start; each call reaches the broker up to 50 ms after its
    grant's instant and is answered up to 0.9 s after that. Rounds run as the limiter's drainer runs them: at once,
    at each answer and when the wait it was told runs out. Counted as the broker counts, by arrival, no one-second
    window holds more than the rate. (A grant for now trusts the date a call unanswered for over a window was
    granted at: answers slower than that may draw a 429, which sends nothing and is sent again.)"""
    await redis.flushdb()
    limiter = BrokerRateLimiter(redis, per_second=3)
    start = virtual.now
    events: list[tuple[float, int, str]] = [(start, 0, "round")]  # (instant, order, what)
    arrivals: list[float] = []
    waiting, calls = 30, 0
    while waiting or len(arrivals) < 30:
        at, _, what = heapq.heappop(events)
        virtual.now = max(virtual.now, at)
        if what.startswith("answer "):
            member, answered = what.split()[1], float(what.split()[2])
            await limiter._date(13, member, answered)
            what = "round"
        if what == "round" and waiting:
            granted, wait, prefix, ahead = await limiter._grant(13, waiting, virtual.now)
            instants = [virtual.now] * granted + ahead
            for n, instant in enumerate(instants, 1):
                arrived = instant + transits[calls]
                arrivals.append(arrived)
                answered = arrived + answers[calls]
                heapq.heappush(events, (answered, len(events) + calls, f"answer {prefix}:{n} {answered!r}"))
                calls += 1
            waiting -= len(instants)
            if waiting:
                # At least a millisecond on: a wait shorter than the clock's resolution would not move it.
                heapq.heappush(events, (virtual.now + max(wait, 0.001), len(events) + calls, "round"))
    arrivals.sort()
    busiest = max(bisect.bisect_left(arrivals, first + 1.0) - i for i, first in enumerate(arrivals))
    assert busiest <= 3, f"{busiest} arrivals within one second at a limit of 3/s"


async def test_a_grant_is_dated_by_its_calls_return_so_a_slow_call_delays_the_next_window(
    redis: Redis, virtual: VirtualTime
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=2)
    start = virtual.now
    async with limiter.permit(7, 0):
        virtual.now += 0.3  # the first call took 0.3 s: it reached the broker some time before it returned
    await take(limiter, 7)
    await take(limiter, 7)  # the third grant waits for the first's return, not its grant, to leave the window
    assert virtual.now == pytest.approx(start + 1.3)


async def test_an_exits_work_before_its_call_runs_while_its_grant_is_near_and_not_long_before(redis: Redis) -> None:
    """On the wall clock: `ready` (the attempt row) overlaps the wait for a grant expected within `lead`, and for
    one further off it waits until a round brings the grant that near."""
    limiter = BrokerRateLimiter(redis, per_second=2)
    for _ in range(2):
        await take(limiter, 8, Action.STOPLOSS)  # this second's budget is spent
    start = time.time()
    ready_at: dict[str, float] = {}
    called_at: dict[str, float] = {}

    async def exit_(name: str, lead: float) -> None:
        async def ready() -> None:
            ready_at[name] = time.time() - start

        async with limiter.permit(8, PRIORITY[Action.STOPLOSS], ready=ready, lead=lead):
            called_at[name] = time.time() - start

    first = asyncio.create_task(exit_("first", 0.0))
    near = asyncio.create_task(exit_("near", 1.5))  # given the slot a second away: ready at once
    far = asyncio.create_task(exit_("far", 1.5))  # two waiters ahead: its slot is known once theirs are answered
    short = asyncio.create_task(exit_("short", 0.3))
    await asyncio.wait_for(asyncio.gather(first, near, far, short), 10)
    assert ready_at["near"] < 0.3 and called_at["near"] >= 0.9
    assert 0.9 <= ready_at["far"] < 1.5 and called_at["far"] >= 1.9  # made ready once its slot was known
    assert 1.6 <= ready_at["short"] < 1.9  # its slot's instant came within 0.3 s only then
    assert ready_at["first"] >= 0.9  # lead 0: only at its slot's instant
    assert all(ready_at[name] <= called_at[name] for name in called_at)


async def test_an_exit_whose_work_before_its_call_fails_gives_its_place_up(redis: Redis) -> None:
    limiter = BrokerRateLimiter(redis, per_second=2)

    async def fails() -> None:
        raise RuntimeError("the row was not written")

    with pytest.raises(RuntimeError):
        async with limiter.permit(9, PRIORITY[Action.STOPLOSS], ready=fails, lead=1.0):
            raise AssertionError("no call without its row")
    for _ in range(2):  # its grant, if made, goes unused; the user's budget is otherwise untouched
        await asyncio.wait_for(take(limiter, 9, Action.STOPLOSS), 5)


async def test_a_grant_is_dated_by_its_calls_answer_not_by_when_the_caller_resumed(
    redis: Redis, virtual: VirtualTime
) -> None:
    limiter = BrokerRateLimiter(redis, per_second=1)
    start = virtual.now
    async with limiter.permit(10, 0):
        answered = ANSWERED_AT.get()
        assert answered is not None  # the broker call in the block notes its answer here
        answered.append(start + 0.1)
        virtual.now += 0.3  # the event loop resumed the caller 0.2 s after the answer
    await take(limiter, 10)
    assert virtual.now == pytest.approx(start + 1.1)


# ----------------------------------------------------------------- the minute and the day (Kite, April 2026)


async def test_no_minute_holds_more_than_the_per_minute_cap(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10, per_minute=25, exit_reserve=0)
    granted: list[float] = []
    for _ in range(60):
        await take(limiter, user_id=1, action=Action.STOPLOSS)
        granted.append(virtual.now)
    busiest = max(sum(1 for t in granted if start <= t < start + 60.0) for start in granted)
    assert busiest == 25, f"{busiest} permits within one minute at a cap of 25"


async def test_buys_leave_the_minutes_reserve_to_exits(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=10, per_minute=25, exit_reserve=5)
    start = virtual.now
    for _ in range(20):
        await take(limiter, user_id=4)  # BUYs: 10 at once, then 10 a second later
    await take(limiter, user_id=4, action=Action.STOPLOSS)  # the reserve: it waits for the second, not the minute
    assert virtual.waits == [pytest.approx(1.0, abs=1e-4)] * 2  # the exit: given the slot freeing a second on
    await take(limiter, user_id=4)  # the next BUY waits until the first grant leaves the minute
    assert virtual.waits[-1] == pytest.approx(start + 60.0 - (start + 2.0), abs=1e-4)


async def test_a_buy_beyond_the_days_budget_is_refused_an_exit_never(redis: Redis, virtual: VirtualTime) -> None:
    limiter = BrokerRateLimiter(redis, per_second=100, per_minute=1000, per_day=6, exit_reserve=2)
    for _ in range(4):
        await take(limiter, user_id=5)
    with pytest.raises(DayBudgetExhausted):
        await take(limiter, user_id=5)
    for _ in range(5):  # past the day's budget: exits still go (Kite's own cap is the broker's business)
        await take(limiter, user_id=5, action=Action.STOPLOSS)
    with pytest.raises(DayBudgetExhausted):
        await take(limiter, user_id=5)
    assert virtual.waits == []

"""JobBook: due jobs come out earliest first; cancelled and replaced jobs never come out (lazy deletion)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Action
from streams.job_book import Job, JobBook

T0 = datetime(2025, 1, 15, 4, 0, tzinfo=UTC)  # 09:30 IST


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(strategy_id: int, action: Action, seconds: float, run: int = 1) -> Job:
    return Job(at(seconds), at(seconds), strategy_id, action, run)


def test_pop_due_returns_only_due_jobs_earliest_first() -> None:
    book = JobBook()
    book.add(job(3, Action.BUY, 30))
    book.add(job(1, Action.SELL, 10))
    book.add(job(2, Action.BUY, 20))
    book.add(job(4, Action.BUY, 40))

    assert book.pop_due(at(5)) == []
    assert book.pop_due(at(25)) == [job(1, Action.SELL, 10), job(2, Action.BUY, 20)]
    assert len(book) == 2
    assert book.pop_due(at(30)) == [job(3, Action.BUY, 30)]  # due exactly now counts
    assert book.pop_due(at(30)) == []  # popped jobs are gone
    assert book.next_due() == at(40)


def test_jobs_due_at_the_same_instant_all_come_out() -> None:
    book = JobBook()
    for sid in range(1_000, 0, -1):
        book.add(job(sid, Action.BUY, 0))
    due = book.pop_due(at(0))
    assert [j.strategy_id for j in due] == list(range(1, 1_001))  # ties broken by strategy id
    assert len(book) == 0
    assert book.next_due() is None


def test_cancel_one_action_keeps_the_other() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10))
    book.add(job(1, Action.SELL, 20))
    book.cancel(1, Action.BUY)
    assert len(book) == 1
    assert book.jobs_of(1) == [job(1, Action.SELL, 20)]
    assert book.pop_due(at(100)) == [job(1, Action.SELL, 20)]


def test_cancel_all_actions_of_a_strategy() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10))
    book.add(job(1, Action.SELL, 20))
    book.add(job(2, Action.BUY, 15))
    book.cancel(1)
    assert book.jobs_of(1) == []
    assert len(book) == 1
    assert book.pop_due(at(100)) == [job(2, Action.BUY, 15)]


def test_cancelling_unknown_jobs_is_harmless() -> None:
    book = JobBook()
    book.cancel(99)
    book.cancel(99, Action.SELL)
    book.add(job(1, Action.BUY, 10))
    book.cancel(1, Action.SELL)
    assert len(book) == 1


def test_add_replaces_the_job_of_the_same_strategy_and_action() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10, run=1))
    book.add(job(1, Action.BUY, 50, run=2))
    assert len(book) == 1
    assert book.next_due() == at(50)
    assert book.pop_due(at(20)) == []  # the replaced job does not fire at its old time
    assert book.pop_due(at(60)) == [job(1, Action.BUY, 50, run=2)]
    assert book.pop_due(at(1_000)) == []


def test_replacing_with_an_earlier_time_fires_once() -> None:
    book = JobBook()
    book.add(job(1, Action.SELL, 50))
    book.add(job(1, Action.SELL, 10))
    assert book.pop_due(at(100)) == [job(1, Action.SELL, 10)]


def test_replacing_back_and_forth_and_with_an_identical_job_fires_once() -> None:
    book = JobBook()
    original = job(1, Action.BUY, 30)
    book.add(original)
    book.add(job(1, Action.BUY, 10))
    book.add(original)
    book.add(original)
    assert book.pop_due(at(20)) == []
    assert book.pop_due(at(100)) == [original]
    assert len(book) == 0


def test_cancel_then_add_again_fires_once() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10))
    book.cancel(1)
    book.add(job(1, Action.BUY, 10))
    assert book.pop_due(at(10)) == [job(1, Action.BUY, 10)]
    assert book.pop_due(at(10)) == []


def test_next_due_skips_cancelled_and_replaced_heads() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10))
    book.add(job(2, Action.BUY, 20))
    book.add(job(3, Action.BUY, 30))
    book.cancel(1)
    assert book.next_due() == at(20)
    book.add(job(2, Action.BUY, 40))  # replaced with a later time
    assert book.next_due() == at(30)
    book.cancel(3)
    assert book.next_due() == at(40)
    book.cancel(2)
    assert book.next_due() is None
    assert len(book) == 0


def test_lazy_deletion_drops_dead_entries_when_they_surface() -> None:
    book = JobBook()
    for sid in range(100):
        book.add(job(sid, Action.BUY, sid))
    for sid in range(0, 100, 2):
        book.cancel(sid)
    assert len(book) == 50  # live count is exact even though dead entries are still in the heap
    due = book.pop_due(at(1_000))
    assert [j.strategy_id for j in due] == list(range(1, 100, 2))
    assert book.next_due() is None
    assert book._heap == []  # every dead entry went once it reached the top


def test_clear() -> None:
    book = JobBook()
    book.add(job(1, Action.BUY, 10))
    book.clear()
    assert len(book) == 0
    assert book.next_due() is None
    assert book.pop_due(at(100)) == []


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, 8),
            st.sampled_from([Action.BUY, Action.SELL]),
            st.integers(0, 50),
            st.integers(1, 3),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 8), st.sampled_from([Action.BUY, Action.SELL, None])),
        st.tuples(st.just("pop"), st.integers(0, 60)),
    ),
    max_size=60,
)


@given(OPS)
@settings(max_examples=300, deadline=None)
def test_against_a_dictionary_model(ops: list[tuple[object, ...]]) -> None:
    book = JobBook()
    model: dict[tuple[int, Action], Job] = {}
    for op in ops:
        if op[0] == "add":
            _, sid, action, seconds, run = op
            assert isinstance(sid, int) and isinstance(action, Action) and isinstance(seconds, int)
            assert isinstance(run, int)
            new = job(sid, action, seconds, run)
            book.add(new)
            model[(sid, action)] = new
        elif op[0] == "cancel":
            _, sid, maybe_action = op
            assert isinstance(sid, int)
            book.cancel(sid, maybe_action if isinstance(maybe_action, Action) else None)
            for action in [maybe_action] if isinstance(maybe_action, Action) else list(Action):
                model.pop((sid, action), None)
        else:
            _, seconds = op
            assert isinstance(seconds, int)
            now = at(seconds)
            expected = sorted(j for j in model.values() if j.fires_at <= now)
            assert book.pop_due(now) == expected
            for j in expected:
                del model[(j.strategy_id, j.action)]
        assert len(book) == len(model)
        assert book.next_due() == min((j.fires_at for j in model.values()), default=None)

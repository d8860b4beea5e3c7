"""The crash matrix's tick count across handovers (tests/crash/tick_ledger.py), on audit lines as workers log them."""

from __future__ import annotations

from tests.crash.tick_ledger import KILLED, Stint, TickLedger

A, B = Stint("worker", 1, 0), Stint("worker-2", 1, 0)


def _line(partition: int, first: int, last: int, created: float, checked: float) -> str:
    return (f"[2026-01-01 10:00:00,000] [1] [INFO] tick audit: partition {partition} offsets {first}-{last} "
            f"created {created:.3f} checked {checked:.3f}")  # fmt: skip


def test_a_clean_handover_where_the_old_owner_stopped_counts_nothing_wrong_and_times_the_gap() -> None:
    ledger = TickLedger()
    ledger.line(A, _line(0, 0, 9, 100.0, 100.1))
    ledger.line(B, _line(0, 10, 14, 101.0, 103.5))  # its first tick waited 2.5 s for the new owner
    ledger.end(A, "stopped")
    count = ledger.count()
    assert count.checked == 15 and not count.lost and not count.twice and count.reread == 0
    assert [(h.offset, h.from_stint, h.to_stint) for h in count.handovers] == [(10, A, B)]
    assert count.handovers[0].unchecked_seconds == 2.5


def test_a_gap_is_a_lost_tick_and_a_second_check_after_a_clean_stop_is_counted_twice() -> None:
    ledger = TickLedger()
    ledger.line(A, _line(0, 0, 9, 100.0, 100.1))
    ledger.line(B, _line(0, 8, 12, 101.0, 101.2))  # 8 and 9 again, though the old owner stopped cleanly
    ledger.line(B, _line(0, 15, 20, 102.0, 102.1))  # 13 and 14 never checked
    ledger.end(A, "stopped")
    count = ledger.count()
    assert len(count.twice) == 2 and "@8" in count.twice[0]
    assert len(count.lost) == 1 and "2 offsets never checked (13-14)" in count.lost[0]


def test_ticks_read_again_after_a_kill_are_re_reads_not_double_checks() -> None:
    ledger = TickLedger()
    ledger.line(A, _line(1, 0, 9, 100.0, 100.1))
    ledger.line(B, _line(1, 7, 12, 104.0, 104.3))  # A's last offsets were not committed when it died
    ledger.end(A, KILLED)
    count = ledger.count()
    assert count.reread == 3 and not count.twice and not count.lost


def test_a_broker_restart_starts_the_offsets_again_in_a_new_epoch() -> None:
    ledger = TickLedger()
    ledger.line(A, _line(0, 0, 5, 100.0, 100.1))
    ledger.line(Stint("worker", 2, 1), _line(0, 0, 3, 110.0, 110.1))
    count = ledger.count()
    assert count.checked == 10 and not count.twice and not count.lost

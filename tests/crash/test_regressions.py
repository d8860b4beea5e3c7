"""Regression tests for failures the crash matrix found (each names its seed)."""

from __future__ import annotations

from datetime import UTC, datetime

from storage.db import aware


def test_seed_1_recovered_intent_due_at_is_timezone_aware() -> None:
    # SQLite returned the attempt's created_at naive; the recovered BUY's grace check then raised
    # TypeError forever and the BUY the broker had filled was never adopted (a naked position).
    naive = datetime(2025, 1, 15, 4, 30)  # noqa: DTZ001 - what SQLite hands back
    recovered = aware(naive)
    assert recovered.tzinfo is not None
    assert recovered == datetime(2025, 1, 15, 4, 30, tzinfo=UTC)
    assert (datetime.now(UTC) - recovered).total_seconds() > 0
    already = datetime(2025, 1, 15, 4, 30, tzinfo=UTC)
    assert aware(already) is already

"""benchmarks/plots.py: a run's samples saved and merged, and drawn as PNGs (where matplotlib is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import plots


def test_samples_of_separate_runs_are_merged_and_drawn(tmp_path: Path) -> None:
    samples = tmp_path / "plots" / "samples.json"
    plots.save({"BUY burst of 100": [float(v) for v in range(100, 600, 5)]}, [], "run one", samples)
    plots.save({"tick-to-STOPLOSS at 1,000 ticks-per-s": [20.0, 25.0, 40.0]}, [(1, 9000.0), (3000, 8000.0)],
               "run two", samples)  # fmt: skip
    saved = json.loads(samples.read_text())
    assert set(saved["latencies_ms"]) == {"BUY burst of 100", "tick-to-STOPLOSS at 1,000 ticks-per-s"}
    assert saved["latencies_ms"]["BUY burst of 100"]["run"] == "run one"
    assert saved["throughput"]["points"] == [[1, 9000.0], [3000, 8000.0]]

    pytest.importorskip("matplotlib", reason="the plots are an optional extra: pip install -e '.[plots]'")
    written = plots.draw(samples)
    assert {path.name for path in written} == {
        "BUY-burst-of-100.png", "tick-to-STOPLOSS-at-1,000-ticks-per-s.png", "ticks-per-second-vs-stops.png",
    }  # fmt: skip
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""PNG plots of the pipeline benchmark's latest run: the BUY burst's latency distribution, tick-to-STOPLOSS
latency, and ticks/s against the stops armed.

`python -m benchmarks.pipeline ...` saves its raw samples to `benchmarks/plots/samples.json` and draws the
plots from them when matplotlib is installed (`pip install -e '.[plots]'`); `python -m benchmarks.plots`
draws them again from the saved samples. Each plot is titled with the run's date, commit and machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PLOTS = Path(__file__).resolve().parent / "plots"
SAMPLES = PLOTS / "samples.json"


def run_label(machine: str) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=PLOTS.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown commit"
    return f"{datetime.now(UTC):%Y-%m-%d}, {commit}, {machine}"


def save(
    latencies_ms: dict[str, list[float]], throughput: list[tuple[int, float]], label: str, samples: Path = SAMPLES
) -> Path:
    """Keep what the latest run measured, merged with what earlier runs of other scenarios saved."""
    samples.parent.mkdir(exist_ok=True)
    saved: dict[str, Any] = json.loads(samples.read_text()) if samples.exists() else {}
    for name, values in latencies_ms.items():
        saved.setdefault("latencies_ms", {})[name] = {"values": values, "run": label}
    if throughput:
        saved["throughput"] = {"points": throughput, "run": label}
    samples.write_text(json.dumps(saved, indent=1))
    return samples


def draw(samples: Path = SAMPLES) -> list[Path]:
    """The PNGs for whatever the samples hold; [] without matplotlib (said once on stderr)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plots: no matplotlib (pip install -e '.[plots]'); samples kept in {samples}", file=sys.stderr)
        return []
    saved = json.loads(samples.read_text())
    written: list[Path] = []
    for name, entry in saved.get("latencies_ms", {}).items():
        values = sorted(entry["values"])
        if not values:
            continue
        figure, (histogram, cumulative) = plt.subplots(1, 2, figsize=(10, 4))
        histogram.hist(values, bins=min(50, max(10, len(values) // 5)))
        histogram.set_xlabel("ms")
        histogram.set_ylabel("count")
        cumulative.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        cumulative.set_xlabel("ms")
        cumulative.set_ylabel("fraction at or below")
        for quantile in (0.5, 0.99):
            at = values[min(len(values) - 1, int(len(values) * quantile))]
            cumulative.axvline(at, linestyle="--", linewidth=0.8)
            cumulative.annotate(f"p{quantile * 100:g} {at:.0f} ms", (at, quantile), fontsize=8)
        figure.suptitle(f"{name} (n={len(values)})\n" + "\n".join(textwrap.wrap(entry["run"], 110)), fontsize=9)
        figure.tight_layout()
        path = samples.parent / f"{name.replace(' ', '-')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    if throughput := saved.get("throughput"):
        points = sorted(throughput["points"])
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot([stops for stops, _ in points], [rate for _, rate in points], marker="o")
        axes.set_xscale("log")
        axes.set_xlabel("stops armed")
        axes.set_ylabel("ticks/s through the stop-loss join")
        axes.set_title("ticks/s against stops armed\n" + "\n".join(textwrap.wrap(throughput["run"], 70)), fontsize=8)
        figure.tight_layout()
        path = samples.parent / "ticks-per-second-vs-stops.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main() -> int:
    if not SAMPLES.exists():
        print(f"no samples yet: run python -m benchmarks.pipeline first ({SAMPLES})", file=sys.stderr)
        return 1
    for path in draw():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

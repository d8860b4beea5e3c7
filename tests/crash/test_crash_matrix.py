"""The crash matrix in CI: one fixed seed, bounded size (see tests/crash/harness.py for what it does).

Asserted: no order lost, doubled or unlogged (every BUY exactly one exit, broker and order log agree, the
expired session stops cleanly). Reported only: stop exits later than 5 s after the system is back up (the
20-seed benchmark judges that bound).

Not marked `slow` on purpose: the CI runs plain `pytest`, and the matrix must run there. The 20-seed run
is `python -m benchmarks.crash_matrix --seeds 20` (results in BENCHMARKS.md, "Crash matrix").

One more seed with three workers and two schedulers: the rebalances (a worker killed in a BUY burst, one
added while stops cross, one removed while BUYs are due, a scheduler killed, the broker restarted) under
the same judgement, plus every partition owned by exactly one live worker soon after each move and no tick
lost or checked twice across a handover. The kills of the other parts are the first seed's business.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash.harness import KILLS, MatrixConfig, run_matrix, service_tails

pytestmark = pytest.mark.slow  # minutes each: `make pytest-slow`, which CI runs

MULTI_WORKER_KILLS = ("worker_mid_burst", "add_worker", "remove_worker", "scheduler", "kafka")

CI_SEED = 1
CI_MULTI_WORKER_SEED = 2


@pytest.mark.timeout(240)
async def test_crash_matrix_fixed_seed_loses_and_doubles_no_order(tmp_path: Path) -> None:
    config = MatrixConfig(seed=CI_SEED, strategies=200, kills=KILLS, workdir=tmp_path / "matrix", verbose=True)
    result = await run_matrix(config)
    print(result.line())
    for incident in result.incidents:
        print(f"  {incident}")
    assert result.incidents, "no incident happened: the matrix tested nothing"
    assert result.bought > 0, "no strategy bought: the matrix tested nothing"
    assert result.passed, (
        f"crash matrix seed {CI_SEED} failed:\n"
        + "\n".join(result.violations[:40])
        + "\n"
        + "\n".join(service_tails(result))
    )
    # The 5-second bound on stop exits after a restart is a latency target: it is judged by the 20-seed
    # benchmark on a quiet machine (`python -m benchmarks.crash_matrix`, BENCHMARKS.md), not asserted on a
    # shared CI runner whose stalls would fail it as often as the system would. Printed here; that every
    # crossing exits exactly once is asserted above.
    for late in result.late_exits:
        print(f"  late stop exit: {late}")


@pytest.mark.timeout(300)
async def test_crash_matrix_with_three_workers_moves_every_partition_to_one_live_owner(tmp_path: Path) -> None:
    config = MatrixConfig(seed=CI_MULTI_WORKER_SEED, strategies=120, kills=MULTI_WORKER_KILLS, workers=3,
                          schedulers=2, workdir=tmp_path / "matrix", verbose=True)  # fmt: skip
    result = await run_matrix(config)
    print(result.line())
    for line in result.handover_lines():
        print(f"  {line}")
    assert result.bought > 0, "no strategy bought: the matrix tested nothing"
    assert len(result.rebalances) >= 4, f"too few partition moves were judged: {result.rebalances}"
    assert result.ticks.handovers, "no tick partition changed hands: the handover was not tested"
    assert result.passed, (
        f"crash matrix seed {CI_MULTI_WORKER_SEED} with 3 workers failed:\n"
        + "\n".join(result.violations[:40])
        + "\n"
        + "\n".join(service_tails(result))
    )

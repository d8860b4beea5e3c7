"""Every service's Prometheus endpoint, scraped on the real stack (`algo up --demo`) while a trade happens.

The demo trader's strategies buy through the real worker, the simulator fills them, and the series that
describe it must move: orders by outcome, the broker call's latency, the book's open positions, the
scheduler's time events and the connector's ticks. Judged by the scrapes, each compared with the one taken
before the BUY was due.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.entrypoints import module_present
from tests.cli import test_up
from tests.cli.test_up import RunningStack
from tests.fixtures.api import OPERATOR_TOKEN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher's children need Linux"),
    pytest.mark.skipif(not (module_present("api") and module_present("sim")), reason="needs the API and simulator"),
]

ROOT = Path(__file__).resolve().parents[2]
start_stack = test_up.start_stack  # the fixture that runs `algo up` on free ports and cleans up after it
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= set(found))


def eventually(check: Callable[[], bool], within: float, what: str, stack: RunningStack) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{stack.output()[-5000:]}")
        time.sleep(0.5)


def test_every_service_exports_metrics_that_move_when_a_trade_happens(  # type: ignore[no-untyped-def]
    start_stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher runs `python -m cli.main` in a scratch directory: this checkout's code, not an installed one.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    with_prometheus = shutil.which("prometheus") is not None  # `--prometheus` is checked where one is installed
    stack: RunningStack = start_stack("--for", "120", "--demo", *(["--prometheus"] if with_prometheus else []))
    # Readiness within 90 s: this test is about the metrics (test_up.py holds the start-up time to its bound).
    line = stack.ready.get(timeout=90)
    assert "up | ready in " in line, stack.output()[-5000:]
    assert stack.wait_for("Metrics ", 30), stack.output()[-5000:]
    metrics_line = next(line for line in stack.lines if "Metrics " in line)
    ports = dict(re.findall(r"(worker-1|scheduler|ticker) :(\d+)", metrics_line))
    assert set(ports) == {"worker-1", "scheduler", "ticker"}, metrics_line
    api = f"http://127.0.0.1:{stack.api_port}/metrics"
    endpoints = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}

    # The operator's token guards the API's endpoint: the series describe the trading book.
    assert httpx.get(api, timeout=10).status_code == 401

    # The API reads the book at most every few seconds, and a Prometheus started with the stack may have had it
    # read before the demo's STARTs: wait for the read that sees them.
    def started() -> bool:
        return total(scrape(api, OPERATOR_TOKEN), "algo_strategies", status="running") == 2

    eventually(started, 30, "the demo's two strategies running (algo_strategies)", stack)
    before = {name: scrape(url) for name, url in endpoints.items()}
    before["api"] = scrape(api, OPERATOR_TOKEN)
    assert total(before["worker-1"], "algo_orders_total", action="BUY") == 0  # the demo's BUY is a minute ahead

    def bought() -> bool:
        return total(scrape(endpoints["worker-1"]), "algo_orders_total", action="BUY", outcome="filled") >= 2

    eventually(bought, 60, "the demo's two BUYs filled (algo_orders_total)", stack)
    after = {name: scrape(url) for name, url in endpoints.items()}
    after["api"] = scrape(api, OPERATOR_TOKEN)

    worker = after["worker-1"]
    placed = total(worker, "algo_broker_call_seconds_count", call="place_order", outcome="ok")
    assert placed >= 2 > total(before["worker-1"], "algo_broker_call_seconds_count", call="place_order")
    assert total(worker, "algo_intent_lag_seconds_count", action="BUY") >= 2
    assert total(worker, "algo_ticks_read_total") > 0
    assert total(worker, "algo_tick_feed_lateness_seconds_count") > 0

    # The positions: bought and held (or already exited by their stop, then counted as a STOPLOSS order).
    # The API's book is read at most every few seconds: wait for the read after the fills.
    def positions_counted() -> bool:
        held = total(scrape(api, OPERATOR_TOKEN), "algo_open_positions", status="running")
        stopped_out = total(scrape(endpoints["worker-1"]), "algo_orders_total", action="STOPLOSS", outcome="filled")
        return held + stopped_out >= 2

    eventually(positions_counted, 30, "the demo's two positions counted (algo_open_positions)", stack)
    assert total(before["api"], "algo_open_positions") == 0
    after["api"] = scrape(api, OPERATOR_TOKEN)
    assert total(after["api"], "algo_positions_without_live_stop") == 0
    assert total(after["scheduler"], "algo_time_events_total", action="BUY") >= 2
    assert total(after["ticker"], "algo_ticks_published_total") > total(before["ticker"], "algo_ticks_published_total")
    assert total(after["ticker"], "algo_ticker_connected") == 1
    # No label names a user, a strategy or an order.
    for samples in after.values():
        assert not {label for (_, labels) in samples for label, _ in labels} & {"user", "user_id", "strategy_id"}

    if with_prometheus:
        # The real Prometheus `algo up --prometheus` ran scraped every service and loaded the alert rules.
        (port,) = re.findall(r"Prometheus +http://127.0.0.1:(\d+)", stack.output())
        prometheus = f"http://127.0.0.1:{port}/api/v1"

        def all_scraped() -> bool:
            targets = httpx.get(f"{prometheus}/targets", timeout=10).json()["data"]["activeTargets"]
            up = {target["labels"]["job"] for target in targets if target["health"] == "up"}
            return up == {"api", "worker", "scheduler", "ticker"}

        eventually(all_scraped, 30, "Prometheus scraping every service", stack)
        rules = httpx.get(f"{prometheus}/rules", timeout=10).json()["data"]["groups"]
        assert {"PositionWithoutLiveStop", "ExitNotFilled"} <= {r["name"] for g in rules for r in g["rules"]}

    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(30) == 0, stack.output()[-5000:]

"""The monitoring files in ops/: Prometheus's configuration and alert rules checked by promtool (and the alerts
unit-tested on series that must fire them), Grafana's provisioning and dashboard checked for structure, and
every series they name one the services export (core/metrics.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import core.metrics  # noqa: F401 - registers every series

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
DASHBOARD = json.loads((OPS / "grafana/dashboards/algo-trading.json").read_text())
ALERTS = yaml.safe_load((OPS / "prometheus/alerts.yml").read_text())
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; scripts/install-services)"
)


def exported_series() -> set[str]:
    names = {"up"}  # Prometheus's own, per target
    for family in REGISTRY.collect():
        if family.name.startswith("algo_"):
            names |= {sample.name for sample in family.samples} | {family.name}
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum", "_total")}
    return names


def series_in(expression: str) -> set[str]:
    return set(re.findall(r"\balgo_[a-z_]+\b", expression)) | ({"up"} if re.search(r"\bup\b", expression) else set())


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    return [rule["expr"] for group in ALERTS["groups"] for rule in group["rules"]]


def test_the_dashboard_is_structurally_sound() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["panels"]
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("expression", dashboard_expressions() + alert_expressions())
def test_every_series_named_is_one_the_services_export(expression: str) -> None:
    named = series_in(expression)
    assert named, f"no series found in {expression!r}"
    assert named <= exported_series(), f"not exported: {sorted(named - exported_series())}"


def test_the_alerts_cover_what_loses_money() -> None:
    names = {rule["alert"] for group in ALERTS["groups"] for rule in group["rules"]}
    assert {"PositionWithoutLiveStop", "ExitNotFilled", "TickFeedLate", "BrokerErrorRate"} <= names


@needs_promtool
def test_promtool_accepts_the_rules_and_each_alert_fires_on_its_series() -> None:
    rules = OPS / "prometheus"
    checked = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=rules, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_promtool_accepts_the_configuration_and_the_dashboards_queries(tmp_path: Path) -> None:
    checked = subprocess.run(
        [PROMTOOL, "check", "config", "--syntax-only", str(OPS / "prometheus/prometheus.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries, as recording rules: promtool parses each one as PromQL.
    recorded = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": expression}
        for index, expression in enumerate(dashboard_expressions())
    ]}]}  # fmt: skip
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(recorded))
    parsed = subprocess.run([PROMTOOL, "check", "rules", "dashboard.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr

"""`algo up --prometheus`: a real Prometheus beside the local stack, where one is installed (Debian's
`prometheus` package), scraping every service's endpoint with the alert rules of ops/prometheus/alerts.yml."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RULES = Path(__file__).resolve().parents[1] / "ops" / "prometheus" / "alerts.yml"
WORKDIR = Path("var") / "prometheus"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def write_config(api_port: int, operator_token: str, targets: dict[str, list[int]], workdir: Path = WORKDIR) -> Path:
    """prometheus.yml for this stack: the API's /metrics with the operator token (in a file only this user
    reads), each other service's port; the repository's alert rules when they are there."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = workdir / "operator_token"
    token.write_text(operator_token)
    os.chmod(token, 0o600)
    jobs: list[dict[str, object]] = [{
        "job_name": "api",
        "authorization": {"type": "Bearer", "credentials_file": str(token.resolve())},
        "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}],
    }]  # fmt: skip
    for job, ports in targets.items():
        jobs.append({"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}]})
    config: dict[str, object] = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": jobs,
    }
    if RULES.exists():
        config["rule_files"] = [str(RULES)]
    path = workdir / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML: no YAML library needed at run time
    return path


def command(binary: str, config: Path, port: int, workdir: Path = WORKDIR) -> list[str]:
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]

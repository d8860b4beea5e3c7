"""docker-compose.yml: every project service runs a real `algo` command, configured only by real settings.

No Docker engine runs here, so the file is checked against the code instead of being started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.core import TyperGroup
from typer.main import get_command

from cli.main import app
from core.apache_kafka import BASE_CONFIG, KAFKA_VERSION
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROJECT = {name: spec for name, spec in SERVICES.items() if "build" in spec}
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def test_the_project_services_are_all_there() -> None:
    assert {"migrate", "topics", "api", "worker", "scheduler", "ticker"} <= set(PROJECT)
    assert {"kafka", "redis", "postgres"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper


def test_production_runs_the_kafka_the_tests_run() -> None:
    """The same Apache Kafka release, and every broker setting the tests' broker has (less its listeners)."""
    kafka = SERVICES["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    environment = {key: str(value) for key, value in kafka["environment"].items()}
    for name, value in BASE_CONFIG.items():
        if name in {"inter.broker.listener.name", "listener.security.protocol.map"}:
            continue  # named differently with the container's hostnames; the listener map is checked below
        variable = "KAFKA_" + name.upper().replace(".", "_")
        assert environment.get(variable) == value, f"{variable} should be {value!r} as in core/apache_kafka.py"
    assert set(environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")) == set(
        BASE_CONFIG["listener.security.protocol.map"].split(",")
    )


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_service_runs_a_real_algo_command(name: str) -> None:
    spec = PROJECT[name]
    assert spec["image"] == PROJECT["api"]["image"], "one image for every project service"
    command = spec["command"]
    assert isinstance(command, list) and command
    # Walk down the typer app's registered commands: every word but the arguments must be one of them.
    words = list(command)
    current = get_command(app)
    context = current.make_context("algo", list(command))
    while isinstance(current, TyperGroup):
        sub = current.get_command(context, words.pop(0))
        assert sub is not None, f"{name}: `algo {' '.join(command)}` is not a command"
        current = sub
    current.make_context(current.name or "", words)  # its own arguments and options parse


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_service_env_vars_are_settings_fields(name: str) -> None:
    unknown = set(PROJECT[name].get("environment", {})) - SETTING_NAMES
    assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"


def test_workers_can_scale() -> None:
    worker = PROJECT["worker"]
    # `--scale worker=N` fails with a fixed container name or a published host port.
    assert "container_name" not in worker
    assert "ports" not in worker


def test_production_secrets_have_no_defaults() -> None:
    env = PROJECT["api"]["environment"]
    assert env["ENVIRONMENT"] == "production"
    for secret in ("JWT_SECRET", "ENCRYPTION_KEYS"):
        assert env[secret].startswith("${" + secret + ":?"), f"{secret} must be required, not defaulted"


def test_dockerfile_builds_one_non_root_image() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "USER algo" in dockerfile
    assert 'ENTRYPOINT ["algo"]' in dockerfile
    for package in ("core", "cli", "api", "streams", "connectors", "storage", "schemas", "manager"):
        assert f"COPY {package} " in dockerfile


def test_prometheus_and_grafana_run_from_the_files_in_the_repository() -> None:
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:") and grafana["image"].startswith("grafana/grafana:")
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{source} is mounted but not in the repository"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_prometheus_scrapes_every_service_where_it_serves_its_metrics() -> None:
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Settings()
    ports = {
        "api": PROJECT["api"]["environment"]["API_PORT"],
        "worker": defaults.worker_metrics_port,
        "scheduler": defaults.scheduler_metrics_port,
        "ticker": defaults.ticker_metrics_port,
    }
    for service, port in ports.items():
        (target,) = jobs[service]["dns_sd_configs"]
        assert target["names"] == [service] and target["port"] == int(port), service
    assert PROJECT["worker"]["environment"]["METRICS_HOST"] == "0.0.0.0"  # reachable from the Prometheus container
    # The API's /metrics wants the operator token: Prometheus reads it from the compose secret the API's comes from.
    assert jobs["api"]["authorization"]["credentials_file"] == "/run/secrets/operator_token"
    assert "operator_token" in SERVICES["prometheus"]["secrets"]
    assert COMPOSE["secrets"]["operator_token"] == {"environment": "OPERATOR_TOKEN"}
    assert PROJECT["api"]["environment"]["OPERATOR_TOKEN"].startswith("${OPERATOR_TOKEN:?")

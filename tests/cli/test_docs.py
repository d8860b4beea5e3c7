"""The README stays in step with the code: every setting and every command is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command

from cli.main import app
from core.settings import Settings
from streams.topics import topic_specs
from tests.fixtures.services import build_settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_configuration_table(field: str) -> None:
    assert f"`{field.upper()}`" in README


@pytest.mark.parametrize("command", sorted(get_command(app).commands))  # type: ignore[attr-defined]
def test_every_command_is_in_the_cli_reference(command: str) -> None:
    assert f"`algo {command}" in README


@pytest.mark.parametrize("spec", topic_specs(build_settings()), ids=lambda spec: spec.name)
def test_every_topic_is_in_the_topic_table(spec: object) -> None:
    assert f"| `{spec.name}` |" in README  # type: ignore[attr-defined]
    assert f"`{spec.value.__name__}`" in README  # type: ignore[attr-defined]

"""The docs stay in step with the code: every setting, command and topic is documented, and the README is a
short entry point whose every link resolves. (`make docs` builds the site with --strict: the links inside
docs/ are checked there.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command

from cli.main import app
from core.settings import Settings
from streams.topics import topic_specs
from tests.fixtures.services import build_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()
CONFIGURATION = (ROOT / "docs/configuration.md").read_text()
CLI = (ROOT / "docs/cli.md").read_text()
TOPICS = (ROOT / "docs/topics.md").read_text()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_configuration_table(field: str) -> None:
    assert f"`{field.upper()}`" in CONFIGURATION


@pytest.mark.parametrize("command", sorted(get_command(app).commands))  # type: ignore[attr-defined]
def test_every_command_is_in_the_cli_reference(command: str) -> None:
    assert f"`algo {command}" in CLI


@pytest.mark.parametrize("spec", topic_specs(build_settings()), ids=lambda spec: spec.name)
def test_every_topic_is_in_the_topic_table(spec: object) -> None:
    assert f"| `{spec.name}` |" in TOPICS  # type: ignore[attr-defined]
    assert f"`{spec.value.__name__}`" in TOPICS  # type: ignore[attr-defined]


def test_the_readme_is_short_and_says_how_to_start() -> None:
    assert len(README) < 8_000, f"README.md is {len(README)} characters: move the detail to docs/"
    for command in ("make run", "make test", "make install"):
        assert command in README
    assert "```mermaid" in README


@pytest.mark.parametrize(("name", "text"), [("README.md", README), ("BENCHMARKS.md", BENCHMARKS)])
def test_every_link_resolves(name: str, text: str) -> None:
    links = LINK.findall(text)
    assert links, f"{name} links nowhere"
    for target in links:
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / name
        assert file.is_file(), f"{name}: {target} does not exist"
        if anchor:
            lines = file.read_text().splitlines()
            headings = {_slug(line.lstrip("#").strip()) for line in lines if line.startswith("#")}
            assert anchor in headings, f"{name}: no heading #{anchor} in {path or name}"


def _slug(heading: str) -> str:
    """GitHub's (and mkdocs' toc's) anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_no_file_keeps_a_merge_conflict_marker() -> None:
    """A conflict left in a page renders as text (mkdocs does not see the README): markers fail the suite."""
    marker = re.compile(r"^(<{7}|>{7}) |^={7}$", re.MULTILINE)
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]
    left = [str(page.relative_to(ROOT)) for page in pages if marker.search(page.read_text())]
    assert left == []

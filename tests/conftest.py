"""Session-wide fixtures live in tests/fixtures/*; this file wires them in and reports what ran."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.simulator",
    "tests.fixtures.pipeline",
    "tests.fixtures.api",
    "tests.fixtures.proxies",
]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.fixtures.services import SERVICES

    if SERVICES.used:
        terminalreporter.section("real services used")
        for kind, where in sorted(SERVICES.used.items()):
            terminalreporter.write_line(f"{kind}: {where}")
    for note in SERVICES.notes:
        terminalreporter.write_line(f"note: {note}")

"""core/logs.py: one JSON object per line with the intent's ids, secrets never printed, library chatter quiet."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from core import logs
from tests.fixtures.services import build_settings

SECRET = "a-jwt-secret-that-must-never-be-printed-0123456789"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_intent_and_order_ids_and_no_secret(captured: io.StringIO) -> None:
    logs.configure_logging(build_settings(log_format="json", jwt_secret=SECRET), "worker", captured)
    with logs.intent_context("7:2026-12-04:1:BUY", 7):
        logging.getLogger("streams.execution").info("placing with %s", SECRET)
    logging.getLogger("orders").info("BUY filled", extra={"order_id": "261204000000001"})

    first, second = (orjson.loads(line) for line in captured.getvalue().splitlines())
    assert first["intent_id"] == "7:2026-12-04:1:BUY" and first["strategy_id"] == 7
    assert first["service"] == "worker" and first["level"] == "INFO"
    assert first["message"] == "placing with ***"
    assert second["order_id"] == "261204000000001" and "intent_id" not in second
    assert SECRET not in captured.getvalue()


def test_library_start_up_chatter_is_quiet_and_repeated_warnings_are_said_once(captured: io.StringIO) -> None:
    logs.configure_logging(build_settings(log_format="text"), "scheduler", captured)
    logging.getLogger("aiokafka.consumer").info("Discovered coordinator 1 for group algo-ticker")
    logging.getLogger("streams.transport").info("[^--_Consumer]: Starting...")  # mode's service life cycle
    logging.getLogger("faust.worker").info("[^ServiceWorker]: Ready")
    for _ in range(5):
        logging.getLogger("aiokafka.consumer.group_coordinator").warning("Marking the coordinator dead (node %s)", 1)
    logging.getLogger("streams.worker").warning("tick feed reads late")

    lines = captured.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "[^ServiceWorker]: Ready",
        "Marking the coordinator dead (node 1)",
        "tick feed reads late",
    ]

"""How every service logs: one line per event, readable text by default, one JSON object per line when
LOG_FORMAT=json (for a log collector), never a secret.

The libraries' start-up detail (Faust's tables of topics, partitions and offsets, aiokafka's group joins) is
logged at LIBRARY_LOG_LEVEL (WARNING by default): an operator needs their warnings, not their progress.
Faust's "Worker]: Ready" line is kept: it says a worker or the scheduler is serving.

In JSON, a line logged while an order intent is being executed carries its `intent_id` and `strategy_id`
(set by the execution lanes through `intent_context`), and any `order_id` a log call passes in `extra`.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from core.settings import Settings
from schemas.events import OrderResult

# The loggers whose INFO lines are start-up and rebalance detail rather than events an operator acts on (and
# uvicorn's access log: a line per request, which the load balancer keeps in production).
LIBRARY_LOGGERS = (
    "faust", "mode", "aiokafka", "kafka", "httpx", "httpcore", "alembic", "uvicorn.error", "uvicorn.access",
)  # fmt: skip
# A library repeating the same warning (a coordinator not available yet, a broker restarting) says it once per this.
REPEAT_SECONDS = 30.0
# ... except the one line that says a Faust worker is up and serving.
READY_LOGGER = "faust.worker"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TEXT_DATE_FORMAT = "%H:%M:%S"

_intent: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("log_intent", default=None)


@contextmanager
def intent_context(intent_id: str, strategy_id: int) -> Iterator[None]:
    """Lines logged inside carry this intent's ids (JSON format)."""
    token = _intent.set((intent_id, strategy_id))
    try:
        yield
    finally:
        _intent.reset(token)


def secret_values(settings: Settings) -> list[str]:
    """Every configured secret, as it could appear in a message (the whole value and each key of a list)."""
    values: list[str] = []
    for secret in (settings.jwt_secret, settings.encryption_keys, settings.operator_token,
                   settings.ticker_access_token):  # fmt: skip
        if secret is None:
            continue
        plain = secret.get_secret_value()
        values += [plain, *plain.split(",")]
    return sorted({value for value in values if len(value) >= 8}, key=len, reverse=True)


class _Quieter(logging.Filter):
    """What is left of the libraries' start-up noise once they log at WARNING.

    * mode's service life cycle ("[^--_Consumer]: Starting...", "Stopping...", "Gathering all futures..."), logged
      at INFO under the logger of the module that defines each service, ours included: dropped, except "Ready".
    * A library's warning repeated within REPEAT_SECONDS (aiokafka marks a coordinator dead a dozen times a second
      while Kafka elects one after a start): logged once per period.
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.now = now
        self.last_said: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            message = record.msg if isinstance(record.msg, str) else ""
            return not (message.startswith("[^") and not message.endswith("]: Ready"))
        if not record.name.startswith(LIBRARY_LOGGERS):
            return True
        key, now = (record.name, record.msg), self.now()
        if now - self.last_said.get(key, -REPEAT_SECONDS) < REPEAT_SECONDS:
            return False
        self.last_said[key] = now
        return True


class _Redacting(logging.Formatter):
    def __init__(self, secrets: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = secrets

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(_Redacting):
    """One JSON object per line: time (UTC, ISO), level, logger, message, the service, the intent's ids."""

    def __init__(self, secrets: list[str], service: str) -> None:
        super().__init__(secrets)
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": self.redact(record.getMessage()),
        }
        if (intent := _intent.get()) is not None:
            line["intent_id"], line["strategy_id"] = intent
        for field in ("intent_id", "strategy_id", "order_id"):
            if (value := getattr(record, field, None)) is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.redact(self.formatException(record.exc_info))
        return orjson.dumps(line).decode()


def configure_logging(settings: Settings, service: str, stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one to `stream` (stderr) in the configured format."""
    secrets = secret_values(settings)
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(secrets, service))
    else:
        handler.setFormatter(_Redacting(secrets, TEXT_FORMAT, TEXT_DATE_FORMAT))
    handler.addFilter(_Quieter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(settings.library_log_level.upper())
    logging.getLogger(READY_LOGGER).setLevel(root.level)


_outcomes = logging.getLogger("orders")


def log_outcome(result: OrderResult) -> None:
    """The one line an order's outcome gets: what, for which strategy, at what price, after how many attempts."""
    price = f" at {result.price:g}" if result.price is not None else ""
    why = f": {result.message}" if result.message and result.status.value != "filled" else ""
    level = logging.INFO if result.status.value in {"filled", "placed", "skipped"} else logging.WARNING
    _outcomes.log(
        level,
        "%s %s%s: strategy %s x%s, order %s, %d attempt(s)%s",
        result.action.value, result.status.value, price, result.strategy_id, result.quantity,
        result.broker_order_id or "-", result.attempts, why,
        extra={"order_id": result.broker_order_id, "intent_id": result.intent_id, "strategy_id": result.strategy_id},
    )  # fmt: skip

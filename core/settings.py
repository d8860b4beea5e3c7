"""The one settings object. Every process reads it from the environment (and an optional `.env`)."""

from __future__ import annotations

from datetime import time
from enum import StrEnum
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Literal, Self

from limits import parse_many
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Development defaults that must never reach production: refused there by the validator below.
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789abcdef"  # noqa: S105 - refused outside development
DEV_ENCRYPTION_KEY = "ZGV2LW9ubHktZmVybmV0LWtleS1jaGFuZ2UtbWUtISE="  # noqa: S105 - refused outside development


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Frozen, typed configuration. Names map 1:1 to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Environment = Environment.DEVELOPMENT

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    embedded_kafka: Literal["auto", "apache", "tansu"] = Field(
        "auto",
        description="The broker `algo up` starts when KAFKA_BOOTSTRAP names none that answers: auto is Apache "
        "Kafka where a JDK is present, else Tansu.",
    )
    topic_prefix: str = Field("", description="Prepended to every topic and consumer group (test isolation).")
    ticks_partitions: int = Field(8, ge=1, le=1024)
    orders_partitions: int = Field(8, ge=1, le=1024)
    events_partitions: int = Field(8, ge=1, le=1024)
    # Consumer-group session: a dead worker's partitions move after this long. Apache Kafka refuses a session
    # below its group.min.session.timeout.ms (6 s by default; the tests' broker lowers it for their 3 s).
    # Measured (`python -m benchmarks.rebalance`, BENCHMARKS.md): a killed worker's stops go unchecked for the
    # session plus up to 1.7 s (10 s: 11.7 s, 6 s: 6.8 s, 3 s: 3.4 s); a clean stop or a new worker, ~1 s
    # whatever the session. 6 s: the lowest a stock broker accepts, and heartbeats (a sixth of it) that a
    # loaded event loop still sends in time.
    kafka_session_timeout_seconds: float = Field(6.0, ge=2, le=300)
    # How long a consumer's fetch may wait for data. Tansu answers a fetch only when the wait ends, so this is
    # per-hop latency there; Apache Kafka answers as soon as data arrives, whatever the value.
    kafka_fetch_max_wait_ms: int = Field(10, ge=1, le=5000)
    # The same for the consumers of the lifecycle topic (the Faust agents that arm stops and register jobs, the
    # ticker's subscriptions), which are off the order's path: each fetch of an idle consumer costs CPU in the
    # process and in the broker, and at 10 ms an idle worker used 23 % of a core on fetching alone.
    kafka_lifecycle_fetch_max_wait_ms: int = Field(100, ge=1, le=5000)
    # Idempotent producers (a send retried after a lost acknowledgement is written once): "on" requires them,
    # "auto" falls back to plain producers on a broker that refuses them (Tansu), "off" never asks. Off by
    # default: aiokafka's idempotent producer can stay wedged on OutOfOrderSequenceNumber after a broker restart
    # (the multi-worker crash matrix saw a worker fail its exits for 17 s so), and the repeats it would remove
    # are absorbed downstream anyway (docs/delivery-guarantees.md).
    kafka_idempotent_producer: Literal["auto", "on", "off"] = "off"
    # Every batch of ticks the stop-loss feed checks is logged (partition, offsets, when): how the crash matrix
    # counts ticks lost or checked twice across a partition's handover. Off in production (a line per batch).
    tick_feed_audit: bool = False
    execution_concurrency: int = Field(256, ge=1, le=10_000, description="Intents executed at once per worker.")

    # Runtime layer and database
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "sqlite+aiosqlite:///var/algo.db"

    # Broker (Kite Connect or the simulator)
    kite_api_root: str = "https://api.kite.trade"
    kite_ticker_root: str = "wss://ws.kite.trade"
    kite_login_url: str = "https://kite.zerodha.com/connect/login"
    broker_mode: Literal["kite", "paper"] = Field(
        "kite", description="kite: orders go to Kite (or the simulator); paper: filled locally at the live price."
    )
    broker_timeout_seconds: float = Field(7.0, gt=0, le=60)
    broker_orders_per_second: float = Field(10.0, gt=0, description="Kite's per-api_key order rate limit.")
    broker_orders_per_minute: int = Field(
        400, ge=1, description="Kite's per-minute order cap (place, modify, cancel; 2026 answers: 400, earlier 200)."
    )
    broker_orders_per_day: int = Field(
        5000, ge=1, description="Kite's per-day order cap (2026 answers: 5,000, earlier 3,000)."
    )
    broker_book_reads_per_second: float = Field(
        8.0,
        gt=0,
        le=10,
        description="A trader's order-book reads a second, shared by every process (Kite: 10 for every read "
        "other than quotes; the rest is left to the egress check and the occasional profile read).",
    )
    broker_exit_reserve: int = Field(
        50, ge=0, description="Orders of each minute and of the day BUYs leave to exits: an exit is never refused."
    )
    order_max_attempts: int = Field(4, ge=1, le=10, description="First try plus three retries.")
    execution_deadline_seconds: float = Field(
        90.0,
        ge=1,
        description="An intent still unfinished after this long is abandoned and retried, as after a crash "
        "(its attempt rows and broker tag keep it to one order): a stalled call must not hold a strategy's "
        "lane, and the exit queued behind it, for ever. Above the worst legitimate case (every retry timing out).",
    )

    # Egress (docs/egress.md): Kite takes order calls only from the static IP registered on the trader's developer
    # account, shared at most within a family; each trader's orders leave through that trader's own proxy.
    single_trader: bool = Field(
        False,
        description="This deployment serves one trader (or one family) and its own address is the registered "
        "static IP: order calls may leave directly.",
    )
    require_egress: bool | None = Field(
        None,
        description="Refuse START for a trader whose broker connection has no egress. Unset: required in "
        "production unless SINGLE_TRADER.",
    )
    egress_check_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="How long /broker/connect waits for the broker through a new egress."
    )
    egress_allowed_networks: str = Field(
        "",
        description="Comma-separated networks (CIDR) an egress proxy may be in besides public addresses. A private, "
        "loopback or link-local proxy is refused unless listed: /broker/connect must not let a user probe the "
        "deployment's own network.",
    )

    # Market data session for the tick connector; unset: the most recently connected trader's session.
    ticker_api_key: str | None = None
    ticker_access_token: SecretStr | None = None
    ticker_silence_seconds: float = Field(10.0, gt=0, description="No data nor heartbeat this long: reconnect.")
    ticker_resync_seconds: float = Field(
        2.0, gt=0, description="How often the tick connector checks its subscriptions against running strategies."
    )

    # Secrets
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_ttl_minutes: int = Field(
        15, ge=1, le=24 * 60, description="Access token lifetime; the app renews it with its refresh token."
    )
    refresh_ttl_days: int = Field(30, ge=1, le=365, description="A login's refresh tokens expire this long after it.")
    encryption_keys: SecretStr = Field(
        SecretStr(DEV_ENCRYPTION_KEY),
        description="Comma-separated Fernet keys, newest first; older keys still decrypt (rotation).",
    )

    # Market
    market_timezone: str = "Asia/Kolkata"
    market_open: time = time(9, 15)
    market_close: time = time(15, 30)
    sell_overdue_seconds: float = Field(
        10.0, gt=0, description="An open position this long past its sell time without a SELL gets one (safety net)."
    )
    missed_buy_grace_seconds: float = Field(60.0, ge=0)
    daily_start_lead_minutes: float = Field(
        30.0, gt=0, le=360,
        description="A daily strategy's run for a day may start from this long before its buy_time; a day that still "
        "cannot start at buy_time (kill switch, broker session expired) is skipped.",
    )  # fmt: skip
    daily_run_check_seconds: float = Field(
        1.0, gt=0, le=60, description="How often each worker looks for daily strategies whose day's run is due."
    )
    buy_lead_seconds: float = Field(
        10.0,
        ge=0,
        le=30,
        description="The scheduler hands a BUY to the workers this long before its time: its checks and attempt row "
        "are done by then, and only the broker call is left when it falls due. The order never leaves early.",
    )

    # Clock: production runs on the real clock; tests and demos shift or speed it up for every process alike.
    clock_start: str | None = Field(
        None, description="ISO datetime the project clock reads at CLOCK_ANCHOR (unset: real time)."
    )
    clock_anchor: float | None = Field(None, description="Unix time at which the clock reads CLOCK_START.")
    clock_speed: float = Field(1.0, gt=0, le=10_000)

    # Kite's rules since April 2026 (docs/kite-rules.md)
    broker_market_protection: float = Field(
        -1.0,
        description="market_protection sent on every MARKET and SL-M order: -1 automatic (the exchange's "
        "guideline) or a percentage above 0, at most 100. Kite refuses such orders without it.",
    )

    exit_chase_modifications: int = Field(
        8, ge=0, le=20,
        description="A resting exit is re-priced by modify at most this many times (Kite allows 25 per order), then "
        "cancelled and placed anew.",
    )  # fmt: skip
    exit_chase_interval_seconds: float = Field(0.5, gt=0, le=10, description="Between two steps of a chase.")
    exit_rest_seconds: float = Field(
        1.0, gt=0, le=10,
        description="A placed exit still unfilled this long rests (a protected market order in a fast move) and "
        "its chase begins; a marketable order fills in milliseconds.",
    )  # fmt: skip
    protective_stop_step_ticks: int = Field(
        10, ge=1, le=10_000,
        description="The protective SL-M follows a rising stop (trailing, moved to cost) once it has risen this many "
        "exchange ticks (0.05) above its trigger: fewer, larger modifications.",
    )  # fmt: skip
    protective_stop_modifications: int = Field(
        25, ge=0, le=25,
        description="The protective SL-M is modified at most this many times (Kite allows 25 per order), then "
        "cancelled and placed anew at the risen stop.",
    )  # fmt: skip
    buy_rest_seconds: float = Field(
        30.0, gt=0, le=600, description="A BUY resting unfilled this long is cancelled (never chased), the run stopped."
    )
    broker_mis_square_off: time = Field(
        time(15, 20),
        description="Exchange time at which Zerodha squares off open MIS equity positions itself and refuses new "
        "MIS orders (15:25 for F&O): a MIS strategy must sell before it.",
    )

    # Account security (docs/security.md). Rates are `limits` strings: "N/unit" joined by ";", all enforced.
    login_rate_per_address: str = Field(
        "20/minute;200/hour", description="Logins from one address (an IPv6 /64), whatever the email."
    )
    login_failures_per_address_email: str = Field(
        "5/minute;20/hour;50/day", description="Failed logins from one address for one email: each tier slows more."
    )
    login_failures_per_account: str = Field(
        "30/hour;100/day",
        description="Failed logins for one email from all addresses. Past it, only addresses this account has "
        "logged in from before may try: an attacker cannot lock the owner out.",
    )
    register_rate_per_address: str = Field("10/hour;30/day", description="Registrations from one address.")
    known_address_days: int = Field(90, ge=1, le=3650, description="How long a login's address stays known.")
    password_hash_threads: int = Field(
        1, ge=1, le=64, description="Threads hashing passwords: a login flood queues here, not on the event loop."
    )
    password_hash_queue: int = Field(
        32, ge=1, le=10_000, description="Hashes waiting beyond this are refused with 503 and Retry-After."
    )
    password_min_score: int = Field(3, ge=0, le=4, description="zxcvbn strength a new password must reach (0-4).")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024, description="Larger bodies get 413.")
    operator_token: SecretStr | None = Field(
        None, description="Bearer token for GET /health/ready's detail; unset: the detail is not served."
    )
    health_cache_seconds: float = Field(
        2.0, ge=0, le=60, description="GET /health/ready answers from a check at most this old."
    )

    # Services
    stop_grace_seconds: float = Field(
        10.0, gt=0, le=300,
        description="A worker or scheduler still stopping this long after its stop signal exits at once (as if "
        "killed: the crash-safety rules cover it); `up` kills a child that takes longer.",
    )  # fmt: skip
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    sim_host: str = "127.0.0.1"
    sim_port: int = Field(8100, ge=1, le=65535)
    worker_web_port: int = Field(6066, ge=1, le=65535)

    # Observability (docs/operations.md): Prometheus endpoints and log format. The API serves GET /metrics on its
    # own port; each other service serves /metrics on its port below (0: not served). `algo up` gives each
    # worker a free port of its own.
    metrics_host: str = Field("127.0.0.1", description="Address the services' metrics ports listen on.")
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    scheduler_metrics_port: int = Field(9102, ge=0, le=65535)
    ticker_metrics_port: int = Field(9103, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line, for collectors."
    )
    library_log_level: str = Field(
        "WARNING",
        description="Log level of Faust, mode and aiokafka, whose start-up detail (offsets, assignments) is noise "
        "to an operator; INFO or DEBUG to see it.",
    )

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Self:
        if self.environment is Environment.PRODUCTION:
            if self.jwt_secret.get_secret_value() == DEV_JWT_SECRET:
                raise ValueError("JWT_SECRET: set a random secret of 32+ characters for production")
            if DEV_ENCRYPTION_KEY in self.encryption_keys.get_secret_value().split(","):
                raise ValueError("ENCRYPTION_KEYS: set your own Fernet key (Fernet.generate_key()) for production")
        if len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("JWT_SECRET: must be at least 32 characters")
        if self.operator_token is not None and len(self.operator_token.get_secret_value()) < 32:
            raise ValueError("OPERATOR_TOKEN: must be at least 32 characters")
        return self

    @field_validator("broker_market_protection")
    @classmethod
    def _market_protection(cls, value: float) -> float:
        if value != -1 and not 0 < value <= 100:
            raise ValueError("BROKER_MARKET_PROTECTION: -1 (automatic) or a percentage above 0, at most 100")
        return value

    @field_validator(
        "login_rate_per_address",
        "login_failures_per_address_email",
        "login_failures_per_account",
        "register_rate_per_address",
    )
    @classmethod
    def _rate_limits(cls, value: str, info: ValidationInfo) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            name = (info.field_name or "").upper()
            raise ValueError(f'{name}: expected rates like "5/minute;20/hour" ({exc})') from None
        return value

    @property
    def egress_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ip_network(part.strip()) for part in self.egress_allowed_networks.split(",") if part.strip())

    @field_validator("egress_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ip_network(part)
            except ValueError:
                raise ValueError(f"{part!r} is not a network (for example 10.8.0.0/16)") from None
        return value

    @property
    def egress_required(self) -> bool:
        if self.broker_mode == "paper":
            return False  # paper orders never reach Kite
        if self.require_egress is not None:
            return self.require_egress
        return self.environment is Environment.PRODUCTION and not self.single_trader

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

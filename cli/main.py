"""The `algo` command: the whole stack on one machine (`algo up`), or each service alone for production."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli import entrypoints
from cli.errors import CliError, load_settings, one_line_errors
from core.health import COMPONENTS, ComponentHealth, all_up, check_dependencies, mask_url
from core.logs import configure_logging
from core.settings import Settings

app = typer.Typer(
    name="algo",
    help="Kafka-based algo-trading backend for Zerodha Kite Connect.",
    no_args_is_help=True,
    add_completion=False,
    # Operator errors are turned into one line by `one_line_errors`; anything else is a bug and keeps a
    # plain traceback: compact in service logs, and no locals (they could hold secrets).
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create or list the Kafka topics.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schemas of the events and API models, for analysts.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")

console = Console(highlight=False)


def _configure_logging(settings: Settings, service: str) -> None:
    # httpx logs every request at INFO: the broker calls are logged by the project where they matter. It is
    # one of the libraries core.logs keeps at LIBRARY_LOG_LEVEL.
    configure_logging(settings, service)


class _WithoutHealthChecks(logging.Filter):
    """Drops access-log lines of GET /health and /metrics: polled every few seconds by `algo up`, load balancers
    and Prometheus."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) >= 3 and args[2] in {"/health", "/health/ready", "/metrics"})


def _preflight(settings: Settings, *components: str) -> None:
    """Refuse to start a service whose dependencies are down, naming the one to fix."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the line below says why Kafka is down
    results = asyncio.run(check_dependencies(settings, only=components))
    down = [f"{name} is down: {result.detail}" for name, result in results.items() if result.status == "down"]
    if down:
        raise CliError("; ".join(down))
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)


def _service_settings(*needs: str, service: str = "algo") -> Settings:
    settings = load_settings()
    if needs:
        _preflight(settings, *needs)  # before logging is configured: a refusal is one line, nothing else
    _configure_logging(settings, service)
    return settings


# --- the whole stack ----------------------------------------------------------------------------------


@app.command()
@one_line_errors
def up(
    demo: Annotated[bool, typer.Option("--demo", help="Register a demo user and start demo strategies.")] = False,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, max=32, help="Faust workers.")] = 1,
    duration: Annotated[
        float | None,
        typer.Option("--for", min=1, metavar="SECONDS", help="Shut down this many seconds after the stack is ready."),
    ] = None,
    health_table: Annotated[
        bool | None,
        typer.Option("--health-table/--no-health-table", help="Live health table (default: on when a terminal)."),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Restart a service that dies, with backoff (announced).")
    ] = False,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="Also run Prometheus (where installed) scraping every service.")
    ] = False,
) -> None:
    """Run the whole stack on this machine: Kafka (Tansu), Redis, SQLite, simulator, API, workers."""
    from cli.launcher import Launcher, UpOptions

    load_settings()  # a bad setting fails here, in one line, before anything starts
    options = UpOptions(
        demo=demo, workers=workers, duration=duration, health_table=health_table, restart=restart, prometheus=prometheus
    )
    raise typer.Exit(Launcher(options).run())


# --- one service each, for production -----------------------------------------------------------------


@app.command()
@one_line_errors
def api() -> None:
    """Serve the REST API (uvicorn) on API_HOST:API_PORT."""
    import uvicorn

    settings = _service_settings("database", "redis", "kafka", service="api")
    application = entrypoints.resolve("api")(settings)
    # No logging set-up of uvicorn's own: its lines go through core.logs like every other (text or JSON).
    config = uvicorn.Config(
        application, host=settings.api_host, port=settings.api_port, log_config=None, log_level=None
    )
    logging.getLogger("uvicorn.access").addFilter(_WithoutHealthChecks())
    uvicorn.Server(config).run()


@app.command()
@one_line_errors
def worker() -> None:
    """Run one Faust worker (stop-loss and execution agents). Run several to scale."""
    settings = _service_settings("kafka", "redis", "database", service="worker")
    entrypoints.run("worker", settings)


@app.command()
@one_line_errors
def scheduler() -> None:
    """Publish BUY/SELL time events at each strategy's buy_time and sell_time."""
    settings = _service_settings("kafka", "redis", "database", service="scheduler")
    entrypoints.run("scheduler", settings)


@app.command()
@one_line_errors
def ticker() -> None:
    """Stream broker ticks (KiteTicker) into the `ticks` topic."""
    settings = _service_settings("kafka", "redis", "database", service="ticker")
    entrypoints.run("ticker", settings)


@app.command()
@one_line_errors
def sim() -> None:
    """Serve the Kite Connect simulator (REST + ticker websocket) on SIM_HOST:SIM_PORT."""
    settings = _service_settings(service="sim")
    entrypoints.run("sim", settings)


@app.command()
@one_line_errors
def replay(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Recorded ticks file.")],
    speed: Annotated[float, typer.Option(min=0.001, help="Times real time (1 = as recorded).")] = 1.0,
    as_fast_as_possible: Annotated[
        bool, typer.Option("--max", help="No pacing: publish as fast as Kafka takes them.")
    ] = False,
) -> None:
    """Replay recorded ticks through the real pipeline, faster than real time if asked."""
    settings = _service_settings("kafka", service="replay")
    # speed=None is the entry point's "as fast as possible".
    entrypoints.run("replay", settings, file, None if as_fast_as_possible else speed)


@app.command()
@one_line_errors
def recover(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if Redis and Kafka look intact.")] = False,
) -> None:
    """Rebuild Redis and the streams' state from the database, reconcile with the broker (sequence 10)."""
    import asyncio

    from manager.recovery import run_recovery

    settings = _service_settings("kafka", "redis", "database")
    report = asyncio.run(run_recovery(settings, force=force))
    if report is None:
        typer.echo("nothing to recover: Redis and Kafka hold the running strategies")
    else:
        typer.echo(
            f"Recovery Complete: {report.strategies} strategies, {report.open_positions} open positions, "
            f"{report.reconciled_intents} intents reconciled, {report.stoploss_exits} stop-loss exits "
            f"in {report.seconds:.2f}s"
        )


@app.command()
@one_line_errors
def migrate() -> None:
    """Bring the database at DATABASE_URL to the newest schema (Alembic)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from storage.migrate import upgrade

    settings = _service_settings()
    try:
        where = make_url(settings.database_url).render_as_string(hide_password=True)
    except ArgumentError:
        raise CliError(
            f"DATABASE_URL: cannot parse {settings.database_url!r}; "
            "use e.g. postgresql+asyncpg://user:pass@host/db or sqlite+aiosqlite:///var/algo.db"
        ) from None
    try:
        upgrade(settings.database_url)
    except ImportError as exc:
        raise CliError(f"DATABASE_URL: the driver '{exc.name}' is not installed; fix DATABASE_URL") from None
    except (SQLAlchemyError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"DATABASE_URL: cannot migrate {where} ({reason}); check the database is up") from None
    console.print(f"database {where} is at the newest schema")


@topics_app.command("create")
@one_line_errors
def topics_create() -> None:
    """Create every topic with its partition count (idempotent)."""
    from core.kafka import ensure_topics

    settings = _service_settings()
    _require_kafka(settings)
    counts = asyncio.run(ensure_topics(settings))
    _print_topics(settings, counts)


@topics_app.command("list")
@one_line_errors
def topics_list() -> None:
    """Show each project topic, its key and its partitions as the broker reports them."""
    settings = _service_settings()
    _require_kafka(settings)
    _print_topics(settings, asyncio.run(_describe_topics(settings)))


def _require_kafka(settings: Settings) -> None:
    from core.health import kafka_unreachable_reason

    if (reason := asyncio.run(kafka_unreachable_reason(settings.kafka_bootstrap))) is not None:
        raise CliError(
            f"KAFKA_BOOTSTRAP: no Kafka broker answers at {settings.kafka_bootstrap} ({reason}); "
            "start Kafka or fix KAFKA_BOOTSTRAP"
        )


async def _describe_topics(settings: Settings) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.topics import topic_specs

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [spec.name for spec in topic_specs(settings) if spec.name in existing]
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


def _print_topics(settings: Settings, counts: dict[str, int]) -> None:
    from streams.topics import topic_specs

    table = Table("topic", "key", "value", "partitions", "settings say", title=settings.kafka_bootstrap)
    for spec in topic_specs(settings):
        actual = counts.get(spec.name)
        shown = "[red]missing[/]" if actual is None else str(actual)
        if actual is not None and actual != spec.partitions:
            shown = f"[red]{actual}[/]"
        table.add_row(spec.name, spec.key, spec.value.__name__, shown, str(spec.partitions))
    console.print(table)


@schemas_app.command("export")
@one_line_errors
def schemas_export(
    directory: Annotated[Path, typer.Argument(file_okay=False, help="Where to write the *.json files.")],
) -> None:
    """Write the JSON Schema of every event (and every API model, if present) as DIR/<kind>/<Model>.json."""
    from schemas.events import EVENT_MODELS

    written = _write_schemas(directory / "events", EVENT_MODELS, mode="serialization")
    api_models = _api_models()
    if api_models:
        written += _write_schemas(directory / "api", api_models, mode="validation")
    console.print(f"wrote {written} schemas under {directory}")


def _write_schemas(directory: Path, models: dict[str, Any], mode: str) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in sorted(models.items()):
        schema = model.model_json_schema(mode=mode)
        (directory / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    return len(models)


def _api_models() -> dict[str, Any]:
    """Every pydantic model defined in schemas/api.py (not the ones it imports), if that module exists."""
    import importlib
    import importlib.util

    from pydantic import BaseModel

    if importlib.util.find_spec("schemas.api") is None:
        return {}
    module = importlib.import_module("schemas.api")
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and value.__module__ == module.__name__
        and not value.__pydantic_generic_metadata__["parameters"]
    }


# --- operations -----------------------------------------------------------------------------------------


@app.command()
@one_line_errors
def health() -> None:
    """Check Kafka, Redis, the database and the broker; exit code 0 when all are up, else 1."""
    settings = load_settings()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the table says why Kafka is down
    results = asyncio.run(check_dependencies(settings))
    console.print(health_table(results))
    raise typer.Exit(0 if all_up(results) else 1)


def health_table(results: dict[str, ComponentHealth]) -> Table:
    table = Table("component", "status", "latency", "detail", title="dependencies")
    for name in [*COMPONENTS, *(n for n in results if n not in COMPONENTS)]:
        if name not in results:
            continue
        result = results[name]
        status = "[green]up[/]" if result.status == "up" else "[red]down[/]"
        latency = "" if result.latency_ms is None else f"{result.latency_ms:.0f} ms"
        table.add_row(name, status, latency, result.detail)
    return table


@app.command("settings")
@one_line_errors
def show_settings() -> None:
    """Print the effective settings (environment + .env + defaults), secrets masked."""
    settings = load_settings()
    values = settings.model_dump(mode="json")  # SecretStr fields dump as '**********'
    for url_field in ("database_url", "redis_url"):
        values[url_field] = mask_url(values[url_field])
    table = Table("environment variable", "value")
    for name, value in values.items():
        table.add_row(name.upper(), "" if value is None else str(value))
    console.print(table)


if __name__ == "__main__":
    app()

"""Operator-facing failures: one line naming the setting and what to do, exit code 2, never a traceback.

A traceback is for bugs. A wrong environment variable, an unreachable Redis or a database URL that
does not parse is the operator's to fix, and they should read exactly what to fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from core.settings import Settings

EXIT_CONFIG = 2

P = ParamSpec("P")
R = TypeVar("R")

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """An error the operator can act on; its message is the one line they read."""


class NotAvailable(CliError):
    """A service whose module is not in this build yet."""


def settings_error_line(exc: ValidationError) -> str:
    """The settings' validation errors as one line: `NAME: problem (got 'value')`, names as env vars."""
    secret_fields = {name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)}
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = [str(item) for item in error["loc"]]
        if not loc:
            # Model-level validators (default secrets in production) already start with the setting's name.
            parts.append(message)
            continue
        field = loc[0]
        got = "" if field in secret_fields else f" (got {error['input']!r})"
        parts.append(f"{field.upper()}: {message}{got}")
    return "; ".join(parts) + "; fix the environment variable or .env entry"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise CliError(settings_error_line(exc)) from None


def fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    _stderr.print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Wrap a CLI command so settings and operator errors end it with one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CliError as exc:
            fail(str(exc))
        except ValidationError as exc:
            # Settings built elsewhere (e.g. get_settings() deep in a service) fail the same way.
            if exc.title == Settings.__name__:
                fail(settings_error_line(exc))
            raise

    return wrapper

"""Each service's entry point, imported only when its command runs.

Services are built by different people at different times; the CLI must work for the ones that exist and
say plainly which do not, rather than failing to import as a whole.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

from cli.errors import CliError, NotAvailable

# command -> "module:function"; the function takes the Settings first and may be sync or async.
SERVICES: dict[str, str] = {
    "api": "api.main:create_app",
    "worker": "streams.worker:run_worker",
    "scheduler": "streams.scheduler:run_scheduler",
    "ticker": "connectors.ticker:run_ticker",
    "sim": "connectors.kite_sim:run_simulator",
    "replay": "connectors.replay:run_replay",
}


def _split(target: str) -> tuple[str, str]:
    module, _, function = target.partition(":")
    return module, function


def module_present(command: str) -> bool:
    """Cheap check (no import) that a service's module is in this build; the launcher uses it."""
    module, _ = _split(SERVICES[command])
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def resolve(command: str) -> Callable[..., Any]:
    target = SERVICES[command]
    module_name, function_name = _split(target)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise NotAvailable(f"`algo {command}` is not available yet: {module_name} is not in this build") from None
        raise CliError(
            f"`algo {command}` needs the package '{exc.name}', which is not installed: pip install -e ."
        ) from None
    function: Callable[..., Any] | None = getattr(module, function_name, None)
    if function is None:
        raise NotAvailable(f"`algo {command}` is not available yet: {target} is not in this build")
    return function


def run(command: str, *args: Any, **kwargs: Any) -> Any:
    """Call a service's entry point, driving it on a fresh event loop if it is a coroutine function."""
    result = resolve(command)(*args, **kwargs)
    if inspect.iscoroutine(result):
        return asyncio.run(result)
    return result

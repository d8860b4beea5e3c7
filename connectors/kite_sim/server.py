"""Running the simulator: `serve()` (async), `run_simulator(settings)` (the `algo sim` command) and
`RunningSimulator`, an in-process harness for tests (uvicorn on 127.0.0.1, a free port, its own thread)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import uvicorn

from connectors.kite_sim.app import create_app
from connectors.kite_sim.state import AccountCredentials, SimConfig, SimulatorState
from core.clock import Clock, clock_from_settings
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoAccount:
    """The account `algo sim` starts with, so the demo can trade at once (override through the env)."""

    api_key: str = "sim_demo_key"
    api_secret: str = "sim_demo_secret"  # noqa: S105 - a paper-trading simulator's demo login
    access_token: str = "sim_demo_access_token"  # noqa: S105
    user_id: str = "DM0001"
    user_name: str = "Demo Trader"
    balance: float = 1_000_000.0
    redirect_url: str | None = None

    @classmethod
    def from_env(cls) -> DemoAccount:
        env = os.environ
        default = cls()
        return cls(
            api_key=env.get("KITE_SIM_DEMO_API_KEY", default.api_key),
            api_secret=env.get("KITE_SIM_DEMO_API_SECRET", default.api_secret),
            access_token=env.get("KITE_SIM_DEMO_ACCESS_TOKEN", default.access_token),
            user_id=env.get("KITE_SIM_DEMO_USER_ID", default.user_id),
            user_name=env.get("KITE_SIM_DEMO_USER_NAME", default.user_name),
            balance=float(env.get("KITE_SIM_DEMO_BALANCE", default.balance)),
            redirect_url=env.get("KITE_SIM_DEMO_REDIRECT_URL") or None,
        )

    def install(self, state: SimulatorState) -> AccountCredentials:
        return state.create_account(
            api_key=self.api_key,
            api_secret=self.api_secret,
            user_id=self.user_id,
            user_name=self.user_name,
            balance=self.balance,
            access_token=self.access_token,
            redirect_url=self.redirect_url,
        )


def build_state(
    clock: Clock | None = None,
    demo: DemoAccount | None = None,
    config: SimConfig | None = None,
    seed: int = 20240101,
    walk: bool = True,
    settings: Settings | None = None,
) -> SimulatorState:
    state = SimulatorState(clock=clock, config=config, seed=seed, walk=walk, settings=settings)
    if demo is not None:
        demo.install(state)
    return state


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # no per-request logging: placement is benchmarked at thousands per second
        lifespan="on",
        timeout_graceful_shutdown=2,
        ws_max_size=1 << 20,
    )


async def serve(
    host: str = "127.0.0.1",
    port: int = 8100,
    state: SimulatorState | None = None,
    clock: Clock | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the simulator until cancelled (in a process of its own: it tunes the garbage collector)."""
    app = create_app(state, clock)
    # Every order leaves a handful of long-lived objects (order, history, trade, audit record); with the
    # default thresholds the cyclic GC rescans them ever more often as the book grows and placement
    # throughput sags. Nothing here builds reference cycles worth collecting promptly.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    await uvicorn.Server(_uvicorn_config(app, host, port, log_level)).serve()


def run_simulator(settings: Settings) -> None:
    """Blocking entry point for `algo sim`: serve on settings.sim_host:sim_port with the demo account."""
    clock = clock_from_settings(settings)
    demo = DemoAccount.from_env()
    state = build_state(clock=clock, demo=demo, settings=settings)
    log.warning(
        "Kite simulator on http://%s:%d (ticker ws://%s:%d/ws); demo api_key=%s (secret and access token "
        "from KITE_SIM_DEMO_* or their documented defaults)",
        settings.sim_host,
        settings.sim_port,
        settings.sim_host,
        settings.sim_port,
        demo.api_key,
    )
    asyncio.run(serve(settings.sim_host, settings.sim_port, state, clock, settings.log_level.lower()))


class RunningSimulator:
    """The simulator on 127.0.0.1:<free port>, in a background thread with its own event loop.

    Usable as `async with RunningSimulator() as sim:` or `with RunningSimulator() as sim:`; the
    official client then talks to `KiteConnect(api_key, root=sim.rest_root)` and
    `KiteTicker(api_key, token, root=sim.ticker_root)`. `sim.state` is the live `SimulatorState`.
    """

    def __init__(
        self,
        state: SimulatorState | None = None,
        clock: Clock | None = None,
        config: SimConfig | None = None,
        demo: DemoAccount | None = None,
        seed: int = 20240101,
        walk: bool = True,
        log_level: str = "warning",
    ) -> None:
        self.state = state or build_state(clock=clock, demo=demo, config=config, seed=seed, walk=walk)
        self.host = "127.0.0.1"
        self.port = 0
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def rest_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ticker_root(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def control_root(self) -> str:
        return f"http://{self.host}:{self.port}/_sim"

    def start(self, timeout: float = 10.0) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        app = create_app(self.state)
        server = uvicorn.Server(_uvicorn_config(app, self.host, self.port, self._log_level))
        self._server = server

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # surfaced by start()/stop()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"kite-sim-{self.port}", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"simulator failed to start: {self._error!r}")
            if waited >= timeout:
                raise TimeoutError("simulator did not start in time")
            deadline.wait(0.01)
            waited += 0.01
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self.state.release_held()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

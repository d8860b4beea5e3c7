"""A Kite Connect v3 compatible exchange simulator (REST + KiteTicker websocket + a control API).

The unmodified official client talks to it: `KiteConnect(api_key, root=sim.rest_root)` and
`KiteTicker(api_key, access_token, root=sim.ticker_root)`.
"""

from connectors.kite_sim.app import create_app
from connectors.kite_sim.audit import AuditRecord
from connectors.kite_sim.faults import Fault, FaultKind, FaultScope
from connectors.kite_sim.instruments import Instrument, InstrumentMaster, default_master
from connectors.kite_sim.prices import ReplaySource
from connectors.kite_sim.server import DemoAccount, RunningSimulator, build_state, run_simulator, serve
from connectors.kite_sim.state import AccountCredentials, SimConfig, SimulatorState

__all__ = [
    "AccountCredentials",
    "AuditRecord",
    "DemoAccount",
    "Fault",
    "FaultKind",
    "FaultScope",
    "Instrument",
    "InstrumentMaster",
    "ReplaySource",
    "RunningSimulator",
    "SimConfig",
    "SimulatorState",
    "build_state",
    "create_app",
    "default_master",
    "run_simulator",
    "serve",
]

"""Order execution: intents in, broker orders out, each order a state machine persisted in the order log.

- `order_lifecycle`: the states of one broker order and the transition table; the strategy's derived state
- `ledger`: the order log as the engine reads (each order's state) and writes it (each transition, durably)
- `reconcile`: asking the broker about an order by its tag; every path that must know goes through it
- `placement`: attempts, retries, the per-user rate budget, a BUY held until its time
- `outcomes`: what a settled order changes (result, runtime, notice, lifecycle), and the auto-stop
- `protective`: the optional SL-M at the broker while the system is down
- `limits`, `lanes`: priority and back-pressure; one lane per strategy, its intents strictly in order
- `engine`: the `Executor` that wires them, one intent at a time under the strategy's lock
"""

from streams.execution.engine import ExecutionStalled, Executor

__all__ = ["ExecutionStalled", "Executor"]

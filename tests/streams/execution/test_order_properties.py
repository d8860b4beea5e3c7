"""Property: whatever the broker answers, however often the worker dies and intents are redelivered, the engine
never makes two filled orders for one decision, never exits more than it bought, and a filled BUY always has a
way out (once the broker answers again, the position is exited).

The real engine on SQLite and Redis; the broker is a fake whose every call follows a script drawn by hypothesis:
an answer, a timeout before or after the order was taken, a refusal, or the worker's death mid-call.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.broker import BrokerCallLate, BrokerRejected, BrokerUnavailable
from connectors.orders import BrokerOrder
from schemas.events import Action, OrderIntent, broker_tag_for
from storage.runtime import lock_key
from streams.execution.reconcile import Reconciler
from tests.streams.execution.engine_bench import Engine, make_engine, sqlite_only


class WorkerDied(BaseException):
    """The worker process ends here: no handler of the engine's runs (a BaseException, like a kill)."""


# "rest" fills on the next look; "rest-chased" rests until the engine modifies or cancels it (a protected market
# exit in a fast move), and "rest-chased-die" is such an order whose worker died before hearing of it.
PLACE_STEPS = (
    "fill",
    "rest",
    "lost-before",
    "late",
    "lost-after",
    "refuse",
    "die-before",
    "die-after",
    "rest-chased",
    "rest-chased-die",
)
READ_STEPS = ("answer", "unavailable", "die")


@dataclass
class ChaosBroker:
    """An order book whose calls follow `script` (then answer normally): the engine's broker gateway."""

    script: list[str]
    orders: dict[str, BrokerOrder] = field(default_factory=dict)
    resting: set[str] = field(default_factory=set)  # open until modified (then filled) or cancelled
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _next(self, allowed: tuple[str, ...]) -> str:
        while self.script:
            step = self.script.pop(0)
            if step in allowed:
                return step
        return allowed[0]

    def _add(self, tag: str, status: str) -> BrokerOrder:
        order_id = str(next(self._ids))
        filled = status == "COMPLETE"
        order = BrokerOrder(order_id, status, tag, 100.0 if filled else None, 5 if filled else 0, None)
        self.orders[order_id] = order
        return order

    async def place_market_order(
        self, *, exchange: str, tradingsymbol: str, side: str, quantity: int, product: str, tag: str,
        leave_by: float | None = None,
    ) -> str:  # fmt: skip
        step = self._next(PLACE_STEPS)
        if step == "die-before":
            raise WorkerDied
        if step == "lost-before":
            raise BrokerUnavailable("connection reset before the broker read the request")
        if step == "late":  # the call could not start in its attempt's window: never made
            raise BrokerCallLate("not sent: the call could not start in its window")
        if step == "refuse":
            raise BrokerRejected("RMS: insufficient margin")
        order = self._add(tag, "OPEN" if step.startswith("rest") else "COMPLETE")
        if step.startswith("rest-chased"):
            self.resting.add(order.order_id)
        if step == "rest-chased-die":
            raise WorkerDied
        if step == "lost-after":
            raise BrokerUnavailable("broker did not answer in time")
        if step == "die-after":
            raise WorkerDied
        return order.order_id

    async def order_status(self, order_id: str) -> BrokerOrder:
        self._read_fault()
        order = self.orders[order_id]
        if order.status == "OPEN" and order_id not in self.resting:  # a resting MARKET order fills on the next look
            order = self.orders[order_id] = BrokerOrder(order_id, "COMPLETE", order.tag, 100.0, 5, None)
        return order

    async def last_price(self, instrument: str) -> float:
        return 100.0

    async def modify_order(self, order_id: str, *, price: float) -> None:
        order = self.orders[order_id]
        if order.status == "OPEN":  # re-priced at the price now: it fills
            self.resting.discard(order_id)
            self.orders[order_id] = BrokerOrder(order_id, "COMPLETE", order.tag, price, 5, None)

    async def cancel_order(self, order_id: str) -> BrokerOrder:
        order = self.orders[order_id]
        if order.status == "OPEN":
            self.resting.discard(order_id)
            order = self.orders[order_id] = BrokerOrder(order_id, "CANCELLED", order.tag, None, 0, None)
        return order

    async def find_by_tag(self, tag: str) -> BrokerOrder | None:
        self._read_fault()
        return next((o for o in self.orders.values() if o.tag == tag), None)

    async def place_stop_order(self, **_: object) -> str:  # pragma: no cover - no protective stops here
        raise AssertionError("not used")

    def _read_fault(self) -> None:
        step = self._next(READ_STEPS)
        if step == "die":
            raise WorkerDied
        if step == "unavailable":
            raise BrokerUnavailable("read timed out")

    def filled(self, tag: str) -> int:
        return sum(1 for o in self.orders.values() if o.tag == tag and o.status == "COMPLETE")


class Worker:
    """Delivers intents to the engine as the worker's lanes would: a delivery that died or failed unexpectedly
    is delivered again later; the intents the engine itself publishes (the auto-stop's square-off) are queued."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending: list[OrderIntent] = []
        self.seen = 0

    async def deliver(self, intent: OrderIntent) -> None:
        try:
            await self.engine.executor.execute(intent)
        except WorkerDied:
            # A dead holder's lock is taken over once its lease lapses: here, at once.
            await self.engine.redis.delete(lock_key(intent.strategy_id))
            self.pending.append(intent)
        except Exception:  # the lane retries an intent that failed unexpectedly (a lookup that stayed unanswered)
            self.pending.append(intent)
        self.collect_published()

    def collect_published(self) -> None:
        sent = self.engine.publisher.sent
        for _, _, event in sent[self.seen :]:
            if isinstance(event, OrderIntent):
                self.pending.append(event)
        self.seen = len(sent)

    async def drain(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            pending, self.pending = self.pending, []
            for intent in pending:
                await self.deliver(intent)


@pytest.fixture
def quick_confirm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resting order is followed for 50 ms, not the broker's 5 s, before it is chased or cancelled."""
    monkeypatch.setattr(Reconciler, "confirm_timeout", property(lambda _: 0.05))


# What happens before the sell time, in order: a (re)delivered BUY, a STOPLOSS crossing (the stop-loss agent fires
# only once the BUY's fill was announced), the trader's STOP.
steps = st.lists(st.sampled_from(["buy", "stoploss", "stop"]), max_size=5)
scripts = st.lists(st.sampled_from(PLACE_STEPS + READ_STEPS[1:]), max_size=10)


@sqlite_only
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=steps, script=scripts, sell_copies=st.integers(1, 2))
async def test_no_decision_is_filled_twice_and_a_filled_buy_always_has_a_way_out(
    db_engine: AsyncEngine, redis: Redis, plan: list[str], script: list[str], sell_copies: int, quick_confirm: None
) -> None:
    engine = await make_engine(
        db_engine,
        redis,
        broker_timeout_seconds=0.01,
        order_max_attempts=3,
        exit_chase_interval_seconds=0.001,
        buy_rest_seconds=0.01,
    )
    broker = ChaosBroker(list(script))

    async def gateways(user_id: int) -> ChaosBroker:
        return broker

    engine.executor.context.gateways = gateways  # type: ignore[assignment]
    worker = Worker(engine)
    await worker.deliver(engine.intent(Action.BUY))
    for step in plan:
        if step == "buy":
            await worker.deliver(engine.intent(Action.BUY))
        elif step == "stoploss" and engine.publisher.lifecycle():
            await worker.deliver(engine.intent(Action.STOPLOSS))
        elif step == "stop":
            await engine.executor.manager.stop(engine.strategy_id, square_off=True)
            worker.collect_published()
        await worker.drain(rounds=1)  # the worker restarted: what was left unfinished comes again
    engine.clock.advance(4 * 3600)  # the sell time (14:30: inside market hours, before the MIS cut-off)
    for _ in range(sell_copies):
        await worker.deliver(engine.intent(Action.SELL))
    # The broker answers again: what was left unfinished is redelivered, the overdue-SELL net sends the SELL once
    # more, and the trader's STOP squares off whatever is still held.
    broker.script.clear()
    await worker.drain()
    await worker.deliver(engine.intent(Action.SELL))
    await engine.executor.manager.stop(engine.strategy_id, square_off=True)
    worker.collect_published()
    await worker.drain()

    exit_tags = {
        broker_tag_for(engine.intent(action).intent_id, seq)
        for action in (Action.SELL, Action.STOPLOSS, Action.EXIT)
        for seq in range(1, 9)  # a chased exit is placed anew under its intent's next tag
    }
    per_tag = Counter(o.tag for o in broker.orders.values())
    assert max(per_tag.values(), default=0) <= 1, f"two orders for one decision: {per_tag}"
    bought = broker.filled(engine.intent(Action.BUY).broker_tag)
    sold = sum(broker.filled(tag) for tag in exit_tags)
    live = sum(1 for o in broker.orders.values() if o.tag in exit_tags and o.status == "OPEN")
    assert sold + live <= bought, f"sold {sold} and {live} exit(s) still live after buying {bought}"
    assert sold == bought, "a filled BUY was left without an exit"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_bench_notices_a_second_order(db_engine: AsyncEngine, redis: Redis) -> None:
    """The property's checks can fail: an order placed twice under one tag is counted."""
    broker = ChaosBroker([])
    tag = "abc"
    await broker.place_market_order(exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=5, product="MIS",
                                    tag=tag)  # fmt: skip
    await broker.place_market_order(exchange="NSE", tradingsymbol="INFY", side="BUY", quantity=5, product="MIS",
                                    tag=tag)  # fmt: skip
    assert broker.filled(tag) == 2

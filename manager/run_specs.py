"""What a strategy's run carries: the spec that travels with its lifecycle events, the ARMED event, the price exit
an armed position is already through, and the runtime hash a new run starts from."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime

from core.exit_prices import EXIT_FIELDS
from core.reentry import ReentryMode, loss_left
from schemas.events import (
    Action,
    ExitKind,
    LifecycleKind,
    OrderIntent,
    Product,
    Repeat,
    StrategyLifecycle,
    StrategySpec,
    Trigger,
    intent_id_for,
)
from storage.models import Strategy, StrategyStatus
from storage.runtime import RuntimeState


def spec_for(strategy: Strategy) -> StrategySpec:
    """The spec that travels with every lifecycle event (consumers need no database lookup)."""
    return StrategySpec(
        strategy_id=strategy.id,
        user_id=strategy.user_id,
        exchange=strategy.exchange,
        tradingsymbol=strategy.tradingsymbol,
        instrument_token=strategy.instrument_token,
        quantity=strategy.quantity,
        buy_time=strategy.buy_time,
        sell_time=strategy.sell_time,
        **{name: getattr(strategy.exits, name) for name in EXIT_FIELDS},
        product=Product(strategy.product),
        protective_stop=bool(strategy.protective_stop),
        reentry_max=strategy.reentry_max or 0,
        reentry_until=strategy.reentry_until,
        reentry_mode=ReentryMode(strategy.reentry_mode or ReentryMode.IMMEDIATE.value),
        repeat=Repeat(strategy.repeat),
    )


def armed_event(
    spec: StrategySpec, run: int, trading_day: date, occurred_at: datetime, entry_price: float | None,
    opened_at: datetime | None, reason: str | None = None, *, cycle: int = 1, realised: float = 0.0,
) -> StrategyLifecycle:  # fmt: skip
    """ARMED: the position is open; its stop and target travel as prices, resolved from this entry. A later
    cycle's loss limit is what the earlier cycles' realised loss (`realised`, rupees) left of max_loss."""
    exits = spec.exits
    if cycle > 1 and exits.max_loss is not None:
        exits = replace(exits, max_loss=loss_left(exits.max_loss, realised))
    return StrategyLifecycle(
        kind=LifecycleKind.ARMED, spec=spec, run=run, cycle=cycle, trading_day=trading_day, occurred_at=occurred_at,
        entry_price=entry_price, opened_at=opened_at, reason=reason,
        stop_price=exits.stop_price(entry_price), target_price=exits.target_price(entry_price),
        trail_activation_price=exits.trail_activation_price(entry_price),
        move_to_cost_price=exits.move_to_cost_price(entry_price),
        loss_limit_price=exits.loss_limit_price(entry_price, spec.quantity),
    )  # fmt: skip


def price_exit(
    armed: StrategyLifecycle, price: float, stop: float | None, now: datetime, trigger: Trigger
) -> OrderIntent | None:
    """The STOPLOSS or TARGET intent of a position armed so (`armed`: its ARMED event) that `price` is through
    already, None if it is through neither. `stop`: the stop as it stands (risen, for a trailing stop or one moved
    to cost); the cycle's loss limit counts where it is higher."""
    target, kind = armed.target_price, ExitKind.STOP
    if armed.loss_limit_price is not None and (stop is None or armed.loss_limit_price > stop):
        stop, kind = armed.loss_limit_price, ExitKind.LOSS_LIMIT
    if stop is not None and price <= stop:
        action, level = Action.STOPLOSS, stop
    elif target is not None and price >= target:
        action, kind, level = Action.TARGET, ExitKind.TARGET, target
    else:
        return None
    spec = armed.spec
    return OrderIntent(
        intent_id=intent_id_for(spec.strategy_id, armed.trading_day, armed.run, action, armed.cycle),
        strategy_id=spec.strategy_id, user_id=spec.user_id, run=armed.run, cycle=armed.cycle, action=action,
        trigger=trigger, trading_day=armed.trading_day, instrument=spec.instrument, quantity=spec.quantity,
        due_at=now, created_at=now, trigger_price=price, exit_kind=kind, exit_level=level,
    )  # fmt: skip


def initial_runtime(
    run: int, trading_day: date, started_at: datetime, next_run_day: date | None = None
) -> dict[str, str]:
    return {
        "next_run_day": next_run_day.isoformat() if next_run_day else "",
        "state": RuntimeState.IDLE.value,
        "strategy_status": StrategyStatus.RUNNING.value,
        "position": "none",
        "last_action": "",
        "cycle": "1",
        "run": str(run),
        "trading_day": trading_day.isoformat(),
        "started_at": started_at.isoformat(),
    }

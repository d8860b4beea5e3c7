"""The order log, as the engine reads and writes it: each order's state persisted before its effects.

An intent's rows: one attempt row per broker call, written *before* the call and updated with what came of it,
and at most one result row once the intent is settled (unique per intent, so a redelivery can never settle it
twice). Read back, the rows give each order's state (`RunHistory.order`) and the run's position.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

from sqlalchemy import DateTime, Integer, String, Table, Text, bindparam, exists, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from connectors.broker import BrokerNotSent, BrokerThrottled
from core.coalesce import Coalesced
from schemas.events import (
    Action,
    NotificationKind,
    OrderIntent,
    OrderResult,
    OrderStatus,
    OrderTransition,
    UserNotification,
)
from storage.db import aware
from storage.journal import AtCommit, Rows
from storage.models import Notification, OrderLog, OrderLogKind, Strategy, StrategyStatus, StrategyStatusChange
from storage.positions import RunPosition, fold
from streams.execution.context import NOTIFICATIONS_TOPIC, ORDER_RESULTS_TOPIC, EngineContext
from streams.execution.order_lifecycle import (
    ATTEMPT_STATES,
    RESULT_STATES,
    OrderEvent,
    OrderState,
    TrackedOrder,
)

log = logging.getLogger(__name__)

# An attempt's call must start within this share of the broker timeout after its row's date. Another process that
# finds the row unanswered waits out the whole timeout from that date before asking the broker (`Reconciler.
# let_settle`); the rest of the timeout is the request's own transit. Started later (a busy event loop, a full
# thread pool, a slow commit), a call reached the broker after that process had asked, found nothing, and sent
# the same BUY again (crash matrix, three workers).
SEND_WINDOW = 0.5

ORDER_LOGS = cast(Table, OrderLog.__table__)
NOTIFICATIONS = cast(Table, Notification.__table__)
# Core statements on the tables, not the ORM's unit of work: nothing reads these rows back through a session,
# and object state, flush and identity map were about a tenth of the worker's CPU per order. Shared objects, so
# the group commit runs each once (executemany) for every order in its batch.
INSERT_ORDER_LOG = insert(ORDER_LOGS)
INSERT_NOTIFICATION = insert(NOTIFICATIONS)
# A run's end: the status change is recorded, then made, only while the strategy is still running that run. Two
# plain statements rather than an UPDATE ... RETURNING per strategy, so that a burst's exits share them: one
# statement each ran inside the batch's transaction, and 86 stops ending their strategies held the database's
# writer for 190 ms while the next exits' attempt rows waited behind it.
STRATEGIES = cast(Table, Strategy.__table__)
_RUNNING_THE_RUN = (
    STRATEGIES.c.id == bindparam("end_id", type_=Integer),
    STRATEGIES.c.run == bindparam("end_run", type_=Integer),
    STRATEGIES.c.status == StrategyStatus.RUNNING.value,
)
RECORD_END = insert(cast(Table, StrategyStatusChange.__table__)).from_select(
    ["strategy_id", "status", "reason", "at"],
    select(
        bindparam("end_id", type_=Integer), bindparam("end_status", type_=String),
        bindparam("end_reason", type_=Text), bindparam("end_at", type_=DateTime(timezone=True)),
    ).where(exists().where(*_RUNNING_THE_RUN)),
)  # fmt: skip
END_RUN = (
    update(STRATEGIES)
    .where(*_RUNNING_THE_RUN)
    .values(status=bindparam("end_status"), status_reason=bindparam("end_reason"), updated_at=bindparam("end_at"))
)
# One attempt row of an intent (the update is generative: each statement below adds its own values).
_ATTEMPT_ROW = update(ORDER_LOGS).where(
    ORDER_LOGS.c.intent_id == bindparam("match_intent_id"),
    ORDER_LOGS.c.kind == OrderLogKind.ATTEMPT.value,
    ORDER_LOGS.c.attempt == bindparam("match_attempt"),
)
UPDATE_ATTEMPT = _ATTEMPT_ROW.values(
    status=bindparam("new_status"), broker_order_id=bindparam("new_order_id"), message=bindparam("new_message")
)
UPDATE_MODIFY = _ATTEMPT_ROW.values(
    status=bindparam("new_status"), price=bindparam("new_price"), message=bindparam("new_message")
)
# A failed result the broker contradicts (an exit given up whose order did arrive): the one result row is corrected.
CORRECT_RESULT = (
    update(ORDER_LOGS)
    .where(ORDER_LOGS.c.intent_id == bindparam("match_intent_id"), ORDER_LOGS.c.kind == OrderLogKind.RESULT.value)
    .values(
        status=bindparam("new_status"),
        broker_order_id=bindparam("new_order_id"),
        price=bindparam("new_price"),
        message=bindparam("new_message"),
    )
)

# The attempt row's word for the state an event left its order in. Once the broker has settled the order, its
# attempt row just says it was placed: the intent's result row holds the outcome.
_ATTEMPT_WORDS = {
    **{state: word for word, state in ATTEMPT_STATES.items()},
    OrderState.FILLED: "placed",
    OrderState.GIVEN_UP: "unclear",
    OrderState.REJECTED: "refused",  # "expired" where the session was the reason (`_attempt_word`)
}


def _attempt_word(order: TrackedOrder) -> str:
    if order.state is OrderState.REJECTED and order.session_expired:
        return "expired"
    if order.history and order.history[-1][1] is OrderEvent.UNSENT:
        return "unsent"
    return _ATTEMPT_WORDS[order.state]


@dataclass(frozen=True)
class RunHistory:
    """Every order-log row of one strategy run, oldest first, read at once: the intent's own order, the run's
    other orders whose fate is unclear, and the position."""

    rows: tuple[OrderLog, ...]

    @property
    def position(self) -> RunPosition:
        return fold(
            (row.action, row.status, row.price, row.broker_order_id)
            for row in self.rows
            if row.kind == OrderLogKind.RESULT.value
        )

    def order(self, intent_id: str, action: Action, tag: str) -> TrackedOrder:
        """The intent's order as the log leaves it (INTENDED if it has no rows)."""
        order = TrackedOrder(intent_id, action, tag)
        rows = [row for row in self.rows if row.intent_id == intent_id]
        attempts = [row for row in rows if row.kind == OrderLogKind.ATTEMPT.value]
        last = max(attempts, key=lambda row: row.attempt, default=None)
        if last is not None:
            order.attempts, order.tag, order.order_id = last.attempt, last.broker_tag, last.broker_order_id
            order.seq = len({row.broker_tag for row in attempts})
            order.state = ATTEMPT_STATES.get(last.status, OrderState.UNKNOWN)
            order.session_expired = last.status == "expired"
            if order.state is OrderState.SENDING:
                order.sent_at = aware(last.created_at)
        result = next((row for row in rows if row.kind == OrderLogKind.RESULT.value), None)
        if result is not None:
            order.recorded = True
            order.state = RESULT_STATES.get(result.status, OrderState.UNKNOWN)
            order.order_id = result.broker_order_id or order.order_id
        return order

    def orders(self) -> dict[str, TrackedOrder]:
        """Every order of the run, by intent id."""
        seen: dict[str, tuple[Action, str]] = {}
        for row in self.rows:
            seen.setdefault(row.intent_id, (Action(row.action), row.broker_tag))
        return {intent_id: self.order(intent_id, action, tag) for intent_id, (action, tag) in seen.items()}


RUN_READS_PER_BATCH = 200  # (strategy, run) pairs per query: well inside what SQLite and PostgreSQL take


@dataclass(frozen=True)
class Told:
    """What an outcome wrote for the first time, and so is still to be published."""

    result: OrderResult | None
    notice: UserNotification | None


class Ledger:
    def __init__(self, context: EngineContext) -> None:
        self.context = context
        self._runs: Coalesced[tuple[int, int], tuple[Strategy | None, RunHistory]] = Coalesced(
            self._read_runs, RUN_READS_PER_BATCH
        )

    async def read_run(self, strategy_id: int, run: int) -> tuple[Strategy | None, RunHistory]:
        """The strategy and its run's order log, as one intent needs them to be decided. Intents deciding at
        once (an exits burst) share two queries, not two each: in a 300-exit burst those reads took 240 to 280
        ms. A read asked for while one is on the wire goes in the next, so it sees every write before it."""
        return await self._runs((strategy_id, run))

    async def _read_runs(self, keys: list[tuple[int, int]]) -> list[tuple[Strategy | None, RunHistory]]:
        ids = {strategy_id for strategy_id, _ in keys}
        async with self.context.sessions() as session:
            strategies = {s.id: s for s in (await session.scalars(select(Strategy).where(Strategy.id.in_(ids))))}
            rows = await session.scalars(
                select(OrderLog).where(tuple_(OrderLog.strategy_id, OrderLog.run).in_(set(keys))).order_by(OrderLog.id)
            )
            by_run: dict[tuple[int, int], list[OrderLog]] = {}
            for row in rows:
                by_run.setdefault((row.strategy_id, row.run), []).append(row)
        return [(strategies.get(sid), RunHistory(tuple(by_run.get((sid, run), ())))) for sid, run in keys]

    # ------------------------------------------------------------------------------------- order states

    async def sent(
        self, intent: OrderIntent, order: TrackedOrder, at: datetime | None = None, *, price: float | None = None
    ) -> int:
        """SEND: a new attempt row, durable before the broker call (`price`: a stop order's trigger), dated `at`, or
        by default as it is committed (`AtCommit`): another process gives the order the broker timeout from that
        date to arrive before it asks the broker about it. So the call must leave well within that: by
        `order.leave_by`, SEND_WINDOW of the timeout after the row's date, or not at all (`KiteBroker.call`).
        Returns the attempt's number."""
        order.apply(OrderEvent.SEND)
        order.attempts += 1
        row = self.row(intent, OrderLogKind.ATTEMPT, order.attempts, _attempt_word(order), None, price, None,
                       at=at, tag=order.tag)  # fmt: skip
        clock, window = self.context.clock, self.context.settings.broker_timeout_seconds * SEND_WINDOW

        def dated_now() -> datetime:
            order.leave_by = time.monotonic() + window
            return clock.now().astimezone(UTC)

        if at is None:
            row["created_at"] = committed = AtCommit(dated_now)
        else:
            order.leave_by = time.monotonic() + clock.seconds_until(at) + window
        await self.context.journal.write(Rows(INSERT_ORDER_LOG, row))
        order.sent_at = at if at is not None else committed.value
        return order.attempts

    async def modifying(self, intent: OrderIntent, order: TrackedOrder, trigger: float, message: str) -> None:
        """MODIFY: a new attempt row for the order (its tag, its order id) asking for `trigger`, durable before the
        broker call; the row's price is then the trigger the order holds (`settled_modify`)."""
        order.apply(OrderEvent.MODIFY)
        order.attempts += 1
        row = self.row(intent, OrderLogKind.ATTEMPT, order.attempts, _attempt_word(order), order.order_id,
                       trigger, message, tag=order.tag)  # fmt: skip
        await self.context.journal.write(Rows(INSERT_ORDER_LOG, row))

    async def settled_modify(
        self, intent: OrderIntent, order: TrackedOrder, event: OrderEvent, trigger: float | None, message: str
    ) -> None:
        """The broker's answer to a modification: the order's state, and the trigger it holds now."""
        order.apply(event)
        await self.context.journal.write(Rows(UPDATE_MODIFY, {
            "match_intent_id": intent.intent_id, "match_attempt": order.attempts,
            "new_status": _attempt_word(order), "new_price": money(trigger), "new_message": message,
        }))  # fmt: skip

    async def moved(
        self, intent: OrderIntent, order: TrackedOrder, event: OrderEvent, *, message: str | None = None
    ) -> None:
        """Apply `event` to the order and persist the state it leads to on its last attempt row."""
        order.apply(event)
        await self.context.journal.write(self.attempt_update(intent, order, message))

    async def not_sent(self, intent: OrderIntent, order: TrackedOrder, refused: BrokerNotSent) -> None:
        """The attempt's call placed nothing (a 429, or a call that could not start in its window): back to
        INTENDED, to be sent again with nothing to ask the broker about."""
        event = OrderEvent.THROTTLED if isinstance(refused, BrokerThrottled) else OrderEvent.UNSENT
        await self.moved(intent, order, event, message=refused.message)

    def attempt_update(self, intent: OrderIntent, order: TrackedOrder, message: str | None = None) -> Rows:
        """The last attempt row's state. Its message is set too (None once placed): one statement for every kind
        of update, so a batch of them is one executemany."""
        return Rows(UPDATE_ATTEMPT, {
            "match_intent_id": intent.intent_id, "match_attempt": order.attempts,
            "new_status": _attempt_word(order), "new_order_id": order.order_id, "new_message": message,
        })  # fmt: skip

    # ------------------------------------------------------------------------------------------ results

    def result(
        self,
        intent: OrderIntent,
        order: TrackedOrder,
        status: OrderStatus,
        *,
        broker_order_id: str | None = None,
        price: float | None = None,
        message: str | None = None,
    ) -> OrderResult:
        """The intent's result, with the path its order took in this delivery."""
        path = [OrderTransition(before=b.value, event=e.value, after=a.value) for b, e, a in order.history]
        return OrderResult(
            intent_id=intent.intent_id, strategy_id=intent.strategy_id, user_id=intent.user_id, action=intent.action,
            cycle=intent.cycle, status=status, broker_order_id=broker_order_id, broker_tag=intent.broker_tag,
            price=price, quantity=intent.quantity, attempts=order.attempts, message=message,
            occurred_at=self.context.clock.now(), transitions=path,
        )  # fmt: skip

    def result_row(self, intent: OrderIntent, result: OrderResult) -> Rows:
        return Rows(INSERT_ORDER_LOG, self.row(
            intent, OrderLogKind.RESULT, 0, result.status.value, result.broker_order_id, result.price, result.message
        ))  # fmt: skip

    async def record_result(self, result: OrderResult, intent: OrderIntent) -> bool:
        """The result row (at most one per intent), then the event analysts and the app consume. False if the
        intent was settled already."""
        try:
            await self.context.journal.write(self.result_row(intent, result))
        except IntegrityError:
            log.info("intent %s result already recorded", intent.intent_id)
            return False
        await self.context.publisher.publish(ORDER_RESULTS_TOPIC, intent.strategy_id, result)
        return True

    async def correct_result(self, intent: OrderIntent, result: OrderResult) -> None:
        """A given-up intent whose order the broker had after all: its one result row now says so."""
        await self.context.journal.write(Rows(CORRECT_RESULT, {
            "match_intent_id": intent.intent_id, "new_status": result.status.value,
            "new_order_id": result.broker_order_id, "new_price": money(result.price), "new_message": result.message,
        }))  # fmt: skip
        await self.context.publisher.publish(ORDER_RESULTS_TOPIC, intent.strategy_id, result)

    def row(
        self,
        intent: OrderIntent,
        kind: OrderLogKind,
        attempt: int,
        status: str,
        order_id: str | None,
        price: float | None,
        message: str | None,
        *,
        at: datetime | None = None,
        tag: str | None = None,
    ) -> dict[str, object]:
        return {
            "intent_id": intent.intent_id, "strategy_id": intent.strategy_id, "user_id": intent.user_id,
            "run": intent.run, "action": intent.action.value, "kind": kind.value, "attempt": attempt,
            "status": status, "broker_tag": tag or intent.broker_tag, "broker_order_id": order_id,
            "price": money(price), "quantity": intent.quantity, "message": message,
            # In UTC: SQLite keeps no offset, and a time event's due instant is in exchange time.
            "created_at": (at or self.context.clock.now()).astimezone(UTC),
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------ notices

    def notice(self, intent: OrderIntent, kind: NotificationKind, title: str, message: str) -> UserNotification:
        return UserNotification(
            notification_id=f"{intent.intent_id}:{kind.value}", user_id=intent.user_id,
            strategy_id=intent.strategy_id, kind=kind, title=title, message=message,
            occurred_at=self.context.clock.now(),
        )  # fmt: skip

    def end_rows(self, strategy: Strategy, status: StrategyStatus, reason: str) -> tuple[Rows, Rows]:
        """The strategy's run ends with `status`, if it is still running that run: its history row, then the change."""
        params = {"end_id": strategy.id, "end_run": strategy.run, "end_status": status.value, "end_reason": reason,
                  "end_at": self.context.clock.now()}  # fmt: skip
        return Rows(RECORD_END, params), Rows(END_RUN, params)

    @staticmethod
    def notice_row(notice: UserNotification) -> Rows:
        return Rows(INSERT_NOTIFICATION, {
            "notification_id": notice.notification_id, "user_id": notice.user_id, "strategy_id": notice.strategy_id,
            "kind": notice.kind.value, "title": notice.title, "message": notice.message,
            "created_at": notice.occurred_at,
        })  # fmt: skip

    async def notify(self, intent: OrderIntent, kind: NotificationKind, title: str, message: str) -> None:
        notice = self.notice(intent, kind, title, message)
        try:
            await self.context.journal.write(self.notice_row(notice))
        except IntegrityError:
            return  # already told
        await self.context.publisher.publish(NOTIFICATIONS_TOPIC, intent.user_id, notice)


def money(price: float | None) -> Decimal | None:
    return Decimal(f"{price:.2f}") if price is not None else None

"""The database: source of truth for users, broker accounts, strategies and the order log."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.exit_prices import EXIT_FIELDS, ExitRule
from core.reentry import ReentryMode, ReentryRule

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class StrategyStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    COMPLETED = "completed"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Every access token carries the generation it was issued in; moving it on revokes them all at once.
    token_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Closed accounts keep their row (and broker account) until their square-off orders are done, then are
    # purged; meanwhile nobody can log in to them and their email is free again.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    # The trading day (exchange date) the trader's kill switch holds: no START that day until released.
    kill_switch_day: Mapped[date | None] = mapped_column(Date)
    # The trader's daily loss limit across all strategies (rupees, realised + unrealised); reached, the kill switch.
    daily_max_loss: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))

    broker_account: Mapped[BrokerAccount | None] = relationship(back_populates="user", uselist=False)


class RefreshToken(Base):
    """One refresh token of a login (`family_id`). Only its SHA-256 is stored; it is used once (rotation), and
    a second use of a used one revokes its whole family (it was stolen, or the app replayed it)."""

    __tablename__ = "refresh_tokens"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(String(64), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BrokerAccount(Base):
    """One Kite account per user. Every credential is Fernet-encrypted; nothing here is plain text."""

    __tablename__ = "broker_accounts"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    api_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    api_secret_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    access_token_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    # The trader's egress proxy URL (credentials included), encrypted; its host and port without credentials
    # apart, for the status. Both null: order calls leave directly.
    egress_url_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    egress_display: Mapped[str | None] = mapped_column(String(300), nullable=True)
    broker_user_id: Mapped[str] = mapped_column(String(64))
    broker_user_name: Mapped[str | None] = mapped_column(String(255))
    # The exchange-issued id of the trader's registered algo (SEBI, 2026): sent on every order when set.
    algo_id: Mapped[str | None] = mapped_column(String(64))
    token_issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    token_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="broker_account")


class Strategy(Base):
    __tablename__ = "strategies"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    exchange: Mapped[str] = mapped_column(String(8))
    tradingsymbol: Mapped[str] = mapped_column(String(64))
    instrument_token: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(Integer)
    buy_time: Mapped[time] = mapped_column(Time)
    sell_time: Mapped[time] = mapped_column(Time)
    # Exactly one of the three stop forms; at most one of each other group (core/exit_prices.py).
    stop_loss: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    stop_loss_points: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    stop_loss_percent: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    target: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    target_points: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    target_percent: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    trail_points: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    trail_percent: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    trail_activation_points: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    trail_activation_percent: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    move_to_cost_points: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    move_to_cost_percent: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    max_loss: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    product: Mapped[str] = mapped_column(String(8), default="MIS")
    # Also keep an SL-M order at the broker while in a position: protected even while this system is down.
    protective_stop: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Re-entry after a stop-loss exit (core/reentry.py): how many times, until when, and how.
    reentry_max: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reentry_until: Mapped[time | None] = mapped_column(Time)
    reentry_mode: Mapped[str] = mapped_column(String(16), default="immediate", server_default="immediate")
    status: Mapped[str] = mapped_column(String(16), default=StrategyStatus.CREATED.value, index=True)
    # Each START begins a new run; intent ids include it so a restarted strategy can trade again.
    run: Mapped[int] = mapped_column(Integer, default=0)
    trading_day: Mapped[date | None] = mapped_column(Date)
    # "once" or "daily": a daily strategy starts a new run on each NSE trading day until the trader stops it.
    repeat: Mapped[str] = mapped_column(String(8), default="once", server_default="once")
    # A daily strategy's next trading day to run; null once the repetition ended (or for "once").
    next_run_day: Mapped[date | None] = mapped_column(Date, index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Set: archived by the trader, out of the default list and never started again; its orders are kept.
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    history: Mapped[list[StrategyStatusChange]] = relationship(
        back_populates="strategy", order_by="StrategyStatusChange.id", cascade="all, delete-orphan"
    )

    @property
    def instrument(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"

    @property
    def exits(self) -> ExitRule:
        return ExitRule(*(None if (v := getattr(self, name)) is None else float(v) for name in EXIT_FIELDS))

    @property
    def reentry(self) -> ReentryRule:
        return ReentryRule(self.reentry_max or 0, self.reentry_until, ReentryMode(self.reentry_mode or "immediate"))


class StrategyStatusChange(Base):
    __tablename__ = "strategy_status_history"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    strategy_id: Mapped[int] = mapped_column(ForeignKey("strategies.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    strategy: Mapped[Strategy] = relationship(back_populates="history")


class OrderLogKind(StrEnum):
    ATTEMPT = "attempt"
    RESULT = "result"


class OrderLog(Base):
    """One row per broker attempt and one per final result of an intent.

    Unique on (intent_id, kind, attempt): a result row has attempt 0, so an intent has at most one result
    and a redelivered attempt cannot be logged twice.
    """

    __tablename__ = "order_logs"
    __table_args__ = (
        UniqueConstraint("intent_id", "kind", "attempt", name="uq_order_logs_intent"),
        Index("ix_order_logs_strategy", "strategy_id", "id"),
        Index("ix_order_logs_tag", "broker_tag"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    intent_id: Mapped[str] = mapped_column(String(96))
    strategy_id: Mapped[int] = mapped_column(ForeignKey("strategies.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(8))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    broker_tag: Mapped[str] = mapped_column(String(20))
    broker_order_id: Mapped[str | None] = mapped_column(String(64))
    price: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    quantity: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_user", "user_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    notification_id: Mapped[str] = mapped_column(String(96), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    strategy_id: Mapped[int | None] = mapped_column(ForeignKey("strategies.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TopicMark(Base):
    """The highest end offset seen of each partition of a topic the system depends on (the lifecycle topic).

    Offsets only grow in a living topic, so an end below its mark means the broker lost the data or the topic
    was recreated (`manager.broker_loss`). Kept here, not in Redis: a Redis lost with the broker must not take
    the evidence with it."""

    __tablename__ = "topic_marks"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    end_offset: Mapped[int] = mapped_column(BigInteger)

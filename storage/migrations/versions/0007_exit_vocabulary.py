"""exit vocabulary: stop-loss in points or percent of the entry, a target, a trailing stop, move to cost,
and the trader's kill switch

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW = (
    ("stop_loss_points", sa.Numeric(12, 2)),
    ("stop_loss_percent", sa.Numeric(6, 2)),
    ("target", sa.Numeric(12, 2)),
    ("target_points", sa.Numeric(12, 2)),
    ("target_percent", sa.Numeric(6, 2)),
    ("trail_points", sa.Numeric(12, 2)),
    ("trail_percent", sa.Numeric(6, 2)),
    ("trail_activation_points", sa.Numeric(12, 2)),
    ("trail_activation_percent", sa.Numeric(6, 2)),
    ("move_to_cost_points", sa.Numeric(12, 2)),
    ("move_to_cost_percent", sa.Numeric(6, 2)),
    ("max_loss", sa.Numeric(12, 2)),
)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("kill_switch_day", sa.Date(), nullable=True))
        batch.add_column(sa.Column("daily_max_loss", sa.Numeric(12, 2), nullable=True))
    with op.batch_alter_table("strategies") as batch:
        # A stop given relative to the entry has no price until the BUY fills.
        batch.alter_column("stop_loss", existing_type=sa.Numeric(12, 2), nullable=True)
        for name, kind in _NEW:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("strategies") as batch:
        for name, _ in _NEW:
            batch.drop_column(name)
        batch.alter_column("stop_loss", existing_type=sa.Numeric(12, 2), nullable=False)
    with op.batch_alter_table("users") as batch:
        batch.drop_column("kill_switch_day")
        batch.drop_column("daily_max_loss")

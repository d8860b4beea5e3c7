"""daily runs: a strategy may repeat on each NSE trading day (`repeat`), and the day its next run starts

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("strategies") as batch:
        batch.add_column(sa.Column("repeat", sa.String(8), nullable=False, server_default="once"))
        batch.add_column(sa.Column("next_run_day", sa.Date(), nullable=True))
        batch.create_index("ix_strategies_next_run_day", ["next_run_day"])


def downgrade() -> None:
    with op.batch_alter_table("strategies") as batch:
        batch.drop_index("ix_strategies_next_run_day")
        batch.drop_column("next_run_day")
        batch.drop_column("repeat")

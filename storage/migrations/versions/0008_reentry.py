"""re-entry after a stop-loss exit: how many times, until when, and how

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("strategies") as batch:
        batch.add_column(sa.Column("reentry_max", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("reentry_until", sa.Time(), nullable=True))
        batch.add_column(sa.Column("reentry_mode", sa.String(16), nullable=False, server_default="immediate"))


def downgrade() -> None:
    with op.batch_alter_table("strategies") as batch:
        batch.drop_column("reentry_mode")
        batch.drop_column("reentry_until")
        batch.drop_column("reentry_max")

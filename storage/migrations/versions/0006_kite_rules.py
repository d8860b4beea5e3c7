"""kite rules: the exchange-issued algo id a trader's orders carry

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("broker_accounts") as batch:
        batch.add_column(sa.Column("algo_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("broker_accounts") as batch:
        batch.drop_column("algo_id")

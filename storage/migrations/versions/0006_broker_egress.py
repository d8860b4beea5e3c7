"""broker egress: the proxy a trader's order calls leave through (encrypted URL, display host)

Revision ID: 0006
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("broker_accounts") as batch:
        batch.add_column(sa.Column("egress_url_encrypted", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("egress_display", sa.String(300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("broker_accounts") as batch:
        batch.drop_column("egress_display")
        batch.drop_column("egress_url_encrypted")

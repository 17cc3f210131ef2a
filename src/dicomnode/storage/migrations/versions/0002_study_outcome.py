"""study outcome: every accepted study ends in a terminal state with a reason

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("outcome", sa.String(length=24), nullable=False, server_default="receiving")
        )
        batch_op.add_column(sa.Column("outcome_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("outcome_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("run", sa.Integer(), nullable=False, server_default="1"))
        batch_op.create_index("ix_study_outcome", ["outcome"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_outcome")
        batch_op.drop_column("run")
        batch_op.drop_column("outcome_at")
        batch_op.drop_column("outcome_reason")
        batch_op.drop_column("outcome")

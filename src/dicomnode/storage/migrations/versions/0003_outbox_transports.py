"""outbox for every transport: worklist notifications (per study, no inference result)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("kind", existing_type=sa.String(length=8),
                              type_=sa.String(length=16), existing_nullable=False)
        batch_op.alter_column("result_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM outbox WHERE result_id IS NULL OR length(kind) > 8")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("result_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("kind", existing_type=sa.String(length=16),
                              type_=sa.String(length=8), existing_nullable=False)

"""per-instance de-identification deadline

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

``instance.deid_due_at``: when the instance must be de-identified at the latest
(received_at + deid.max_delay_s, fixed at receipt), read by the de-identification
sweep through a partial index over the instances still identified. Instances already
waiting get their receipt time: the sweep takes them at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deid_due_at", sa.Float(), nullable=True))
    op.execute("UPDATE instance SET deid_due_at = received_at WHERE state = 'received'")
    op.create_index(
        "ix_instance_deid_due",
        "instance",
        ["deid_due_at"],
        unique=False,
        sqlite_where=sa.text("state = 'received'"),
        postgresql_where=sa.text("state = 'received'"),
    )


def downgrade() -> None:
    op.drop_index("ix_instance_deid_due", table_name="instance")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("deid_due_at")

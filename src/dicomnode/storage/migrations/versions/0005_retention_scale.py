"""indexes that keep pages and sweeps flat, and trigger-kept row counts (tally)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Indexes for what the studies page, start-up, the sweeps and retention filter and sort
on (studies by last received time, unhooked studies, instances by study and state,
kept spool files, jobs and outbox rows by status and age). ``tally`` holds +1/-1 rows
written by triggers on job, outbox and study in the same transaction as the change,
seeded here with the current counts: ``/metrics`` sums it instead of counting tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, expression of k1, column of k2): what each tally kind counts by.
_COUNTED = (("job", "queue", "status"), ("outbox", "''", "status"), ("study", "''", "state"))


def _sqlite_triggers(table: str, k1: str, k2: str) -> list[str]:
    new_k1 = k1 if k1 == "''" else f"NEW.{k1}"
    old_k1 = k1 if k1 == "''" else f"OLD.{k1}"
    ins = f"INSERT INTO tally (kind, k1, k2, n) VALUES ('{table}', "
    changed = f"OLD.{k2} IS NOT NEW.{k2}" + ("" if k1 == "''" else f" OR OLD.{k1} IS NOT NEW.{k1}")
    cols = k2 if k1 == "''" else f"{k2}, {k1}"
    return [
        f"CREATE TRIGGER tally_{table}_ins AFTER INSERT ON {table} BEGIN"
        f" {ins}{new_k1}, NEW.{k2}, 1); END",
        f"CREATE TRIGGER tally_{table}_del AFTER DELETE ON {table} BEGIN"
        f" {ins}{old_k1}, OLD.{k2}, -1); END",
        f"CREATE TRIGGER tally_{table}_upd AFTER UPDATE OF {cols} ON {table}"
        f" WHEN {changed} BEGIN {ins}{old_k1}, OLD.{k2}, -1); {ins}{new_k1}, NEW.{k2}, 1); END",
    ]


def _pg_triggers(table: str, k1: str, k2: str) -> list[str]:
    new_k1 = k1 if k1 == "''" else f"NEW.{k1}"
    old_k1 = k1 if k1 == "''" else f"OLD.{k1}"
    ins = f"INSERT INTO tally (kind, k1, k2, n) VALUES ('{table}', "
    changed = (f"OLD.{k2} IS DISTINCT FROM NEW.{k2}"
               + ("" if k1 == "''" else f" OR OLD.{k1} IS DISTINCT FROM NEW.{k1}"))
    cols = k2 if k1 == "''" else f"{k2}, {k1}"
    return [
        f"CREATE FUNCTION tally_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF TG_OP <> 'INSERT' THEN {ins}{old_k1}, OLD.{k2}, -1); END IF;"
        f" IF TG_OP <> 'DELETE' THEN {ins}{new_k1}, NEW.{k2}, 1); END IF;"
        " RETURN NULL; END $$",
        f"CREATE TRIGGER tally_{table}_insdel AFTER INSERT OR DELETE ON {table}"
        f" FOR EACH ROW EXECUTE FUNCTION tally_{table}()",
        f"CREATE TRIGGER tally_{table}_upd AFTER UPDATE OF {cols} ON {table}"
        f" FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION tally_{table}()",
    ]


def upgrade() -> None:
    op.create_index("ix_study_last_received", "study", ["last_received_at", "id"])
    op.create_index(
        "ix_study_unhooked", "study", ["id"],
        sqlite_where=sa.text("hooked_version < completed_version"),
        postgresql_where=sa.text("hooked_version < completed_version"),
    )
    op.create_index("ix_study_completed_at", "study", ["completed_at"])
    op.create_index("ix_instance_study_state", "instance", ["study_id", "state", "deidentified_at"])
    op.create_index(
        "ix_instance_spool", "instance", ["spool_path"],
        sqlite_where=sa.text("spool_path IS NOT NULL"),
        postgresql_where=sa.text("spool_path IS NOT NULL"),
    )
    op.create_index("ix_job_status_updated", "job", ["status", "updated_at"])
    op.create_index("ix_outbox_status_created", "outbox", ["status", "created_at"])
    op.create_table(
        "tally",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("k1", sa.String(length=64), nullable=False),
        sa.Column("k2", sa.String(length=24), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tally")),
    )
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, k1, k2 in _COUNTED:
        op.execute(f"INSERT INTO tally (kind, k1, k2, n) SELECT '{table}', {k1}, {k2}, count(*)"
                   f" FROM {table} GROUP BY {k1}, {k2}" if k1 != "''" else
                   f"INSERT INTO tally (kind, k1, k2, n) SELECT '{table}', '', {k2}, count(*)"
                   f" FROM {table} GROUP BY {k2}")
        for ddl in (_sqlite_triggers if sqlite else _pg_triggers)(table, k1, k2):
            op.execute(ddl)


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, _k1, _k2 in _COUNTED:
        if sqlite:
            for suffix in ("ins", "del", "upd"):
                op.execute(f"DROP TRIGGER IF EXISTS tally_{table}_{suffix}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS tally_{table}_insdel ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS tally_{table}_upd ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS tally_{table}()")
    op.drop_table("tally")
    for name, table in (("ix_outbox_status_created", "outbox"), ("ix_job_status_updated", "job"),
                        ("ix_instance_spool", "instance"), ("ix_instance_study_state", "instance"),
                        ("ix_study_completed_at", "study"), ("ix_study_unhooked", "study"),
                        ("ix_study_last_received", "study")):
        op.drop_index(name, table_name=table)

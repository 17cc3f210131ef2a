"""Row counts by status from the trigger-kept ``tally`` table (migration 0005).

Counting ``job``, ``outbox`` or ``study`` by status reads every row of the table, and
those tables grow with every study received. The triggers of migration 0005 append a
+1/-1 row to ``tally`` in the same transaction as each insert, delete or status change,
so the counts are exact whichever process made the change. :func:`compact` folds the
rows into one per (kind, k1, k2) with ``DELETE ... RETURNING`` (exactly the rows it
removed are summed, so a concurrent writer's rows are never lost nor counted twice).
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from dicomnode.storage.models import Tally

__all__ = ["COMPACT_ABOVE", "compact", "counts"]

COMPACT_ABOVE = 2000
"""Rows in ``tally`` above which a reader folds it (a scrape then reads at most this)."""


def counts(session: Session, kind: str) -> dict[tuple[str, str], int]:
    """(k1, k2) -> count for ``kind`` (job: (queue, status); outbox, study: ('', status))."""
    rows = session.execute(
        select(Tally.k1, Tally.k2, func.sum(Tally.n)).where(Tally.kind == kind)
        .group_by(Tally.k1, Tally.k2)).all()
    return {(str(k1), str(k2)): int(n or 0) for k1, k2, n in rows if n}


def size(session: Session) -> int:
    """How many rows ``tally`` holds (an upper bound from the id range: no scan)."""
    lo, hi = session.execute(select(func.min(Tally.id), func.max(Tally.id))).one()
    return 0 if lo is None else int(hi) - int(lo) + 1


def compact(session: Session) -> int:
    """Fold the tally into one row per key in ``session``'s transaction; rows removed."""
    gone = session.execute(delete(Tally).returning(Tally.kind, Tally.k1, Tally.k2, Tally.n)).all()
    sums: dict[tuple[str, str, str], int] = defaultdict(int)
    for kind, k1, k2, n in gone:
        sums[(kind, k1, k2)] += int(n)
    rows = [{"kind": k, "k1": a, "k2": b, "n": n} for (k, a, b), n in sums.items() if n]
    if rows:
        session.execute(insert(Tally), rows)
    return len(gone)

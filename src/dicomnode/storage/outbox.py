"""The outbox: result objects recorded before they are sent, and their delivery state.

Every object is written to ``results/`` and recorded here before the first send
attempt, so nothing is lost while a PACS is down; each row carries its own
attempt count and next attempt time, so delivery state survives restarts.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.storage.models import OutboxItem

__all__ = ["Outbox"]


class Outbox:
    """Outbox rows of one node."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def add(self, **values: Any) -> tuple[OutboxItem, bool]:
        """Record an object for a destination; (row, created). Idempotent per
        (SOP Instance UID, destination): a rerun finds the existing row, and so does a
        concurrent caller that lost the race to insert it (two deliveries settling the
        same study both record its notification)."""
        try:
            return self._add(dict(values))
        except IntegrityError:
            return self._add(values)

    def _add(self, values: dict[str, Any]) -> tuple[OutboxItem, bool]:
        with self.sessions.begin() as s:
            row = s.execute(
                select(OutboxItem).where(
                    OutboxItem.sop_instance_uid == values["sop_instance_uid"],
                    OutboxItem.destination == values["destination"],
                )
            ).scalar()
            if row is not None:
                return row, False
            row = OutboxItem(
                status=values.pop("status", "pending"), attempts=0, created_at=time.time(), **values
            )
            s.add(row)
            s.flush()
            return row, True

    def get(self, item_id: int) -> OutboxItem | None:
        with self.sessions() as s:
            return s.get(OutboxItem, item_id)

    def list(self, status: str | None = None, study_id: int | None = None) -> list[OutboxItem]:
        q = select(OutboxItem).order_by(OutboxItem.id)
        if status is not None:
            q = q.where(OutboxItem.status == status)
        if study_id is not None:
            q = q.where(OutboxItem.study_id == study_id)
        with self.sessions() as s:
            return list(s.execute(q).scalars())

    def for_result(self, result_id: int) -> list[OutboxItem]:
        """The outbox items of one inference result (every kind and destination)."""
        with self.sessions() as s:
            return list(
                s.execute(
                    select(OutboxItem)
                    .where(OutboxItem.result_id == result_id)
                    .order_by(OutboxItem.id)
                ).scalars()
            )

    def previous(
        self, study_id: int, model_name: str, kind: str, before_version: int, destination: str
    ) -> OutboxItem | None:
        """The latest object of this kind and model from an earlier study version."""
        with self.sessions() as s:
            return s.execute(
                select(OutboxItem)
                .where(
                    OutboxItem.study_id == study_id,
                    OutboxItem.model_name == model_name,
                    OutboxItem.kind == kind,
                    OutboxItem.study_version < before_version,
                    OutboxItem.destination == destination,
                )
                .order_by(OutboxItem.study_version.desc())
                .limit(1)
            ).scalar()

    def own_uids(self, study_id: int) -> set[str]:
        """SOP and Series Instance UIDs of the node's own result objects for a study."""
        with self.sessions() as s:
            rows = s.execute(
                select(OutboxItem.sop_instance_uid, OutboxItem.series_instance_uid).where(
                    OutboxItem.study_id == study_id
                )
            ).all()
        return {u for r in rows for u in r}

    def update(self, item_id: int, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(**values))

    def mark_sent(self, item_id: int, *, attempts: int, timings: dict[str, Any]) -> None:
        """Record a delivered item; one a commitment report already settled stays so."""
        with self.sessions.begin() as s:
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id)
                .values(
                    attempts=attempts,
                    sent_at=time.time(),
                    last_error=None,
                    next_attempt_at=None,
                    timings=timings,
                )
            )
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.status == "pending")
                .values(status="sent")
            )

    def commitment_report(
        self, transaction_uid: str, committed: set[str], failed: dict[str, int]
    ) -> int:
        """Apply a storage commitment report; return how many items it settled.

        Items of the transaction whose SOP Instance UID is in ``committed`` become
        ``confirmed``; those in ``failed`` (UID -> Failure Reason) become ``dead``.
        """
        now = time.time()
        n = 0
        with self.sessions.begin() as s:
            rows = s.execute(
                select(OutboxItem).where(OutboxItem.commitment_uid == transaction_uid)
            ).scalars()
            for row in rows:
                if row.status not in ("pending", "sent"):
                    continue  # dropped by an operator meanwhile
                if row.sop_instance_uid in committed:
                    row.status, row.confirmed_at = "confirmed", now
                    n += 1
                elif row.sop_instance_uid in failed:
                    row.status = "dead"
                    row.last_error = (
                        f"storage commitment failed (reason 0x{failed[row.sop_instance_uid]:04X})"
                    )
                    n += 1
        return n

    def claim_send(self, item_id: int) -> OutboxItem | None:
        """The row if it is still pending (a dropped or sent item is not sent again)."""
        row = self.get(item_id)
        return row if row is not None and row.status == "pending" else None

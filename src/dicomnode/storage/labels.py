"""Ground truths from annotators, drift records and training runs."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.storage.models import DriftRecord, GroundTruth, TrainingRun
from dicomnode.storage.spool import FileStore

__all__ = ["LabelStore"]


class LabelStore:
    """Labels (masks under ``labels/``), drift and training-run records."""

    def __init__(self, sessions: sessionmaker[Session], files: FileStore) -> None:
        self.sessions = sessions
        self.files = files

    # -- ground truth ---------------------------------------------------------------------

    def save(
        self,
        *,
        study_id: int,
        study_key: str,
        annotator: str,
        seg_instance_id: int,
        series_key: str,
        mask: np.ndarray,
        sop_keys: list[str],
        labels: list[str],
    ) -> GroundTruth:
        """Store one annotator's label for a study (a newer one replaces theirs)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=mask, sop_keys=np.array(sop_keys))
        path = f"labels/{study_key}/{annotator}-{seg_instance_id}.npz"
        self.files.write(path, buf.getvalue())
        with self.sessions.begin() as s:
            row = s.execute(
                select(GroundTruth).where(
                    GroundTruth.study_id == study_id, GroundTruth.annotator == annotator
                )
            ).scalar()
            old = row.mask_path if row is not None else None
            if row is None:
                row = GroundTruth(study_id=study_id, annotator=annotator)
                s.add(row)
            row.seg_instance_id, row.series_key, row.mask_path = seg_instance_id, series_key, path
            row.labels, row.created_at = labels, time.time()
            s.flush()
        if old and old != path:
            self.files.delete(old)
        return row

    def for_study(self, study_id: int) -> list[GroundTruth]:
        with self.sessions() as s:
            return list(
                s.execute(
                    select(GroundTruth)
                    .where(GroundTruth.study_id == study_id)
                    .order_by(GroundTruth.annotator)
                ).scalars()
            )

    def labelled_studies(self) -> list[int]:
        with self.sessions() as s:
            return list(
                s.execute(
                    select(GroundTruth.study_id).distinct().order_by(GroundTruth.study_id)
                ).scalars()
            )

    def load(self, truth: GroundTruth) -> tuple[np.ndarray, list[str]]:
        with np.load(io.BytesIO(self.files.read(truth.mask_path))) as z:
            return z["mask"], [str(k) for k in z["sop_keys"]]

    def new_since_last_run(self, model_name: str) -> int:
        """Labels created or replaced since the start of the last finished training run."""
        with self.sessions() as s:
            last = s.execute(
                select(func.max(TrainingRun.started_at)).where(
                    TrainingRun.model_name == model_name,
                    TrainingRun.status.in_(["promoted", "rejected"]),
                )
            ).scalar()
            q = select(func.count()).select_from(GroundTruth)
            if last is not None:
                q = q.where(GroundTruth.created_at > last)
            return int(s.execute(q).scalar() or 0)

    # -- drift ----------------------------------------------------------------------------

    def add_drift(
        self, *, model_name: str, model_version: str, study_id: int, dice: dict[str, float]
    ) -> None:
        """Record (or update: one record per study and model version) a drift measurement."""
        with self.sessions.begin() as s:
            row = s.execute(
                select(DriftRecord).where(
                    DriftRecord.model_name == model_name,
                    DriftRecord.model_version == model_version,
                    DriftRecord.study_id == study_id,
                )
            ).scalar()
            if row is None:
                s.add(
                    DriftRecord(
                        model_name=model_name,
                        model_version=model_version,
                        study_id=study_id,
                        dice=dice,
                        at=time.time(),
                    )
                )
            else:
                row.dice, row.at = dice, time.time()

    def drift(self, model_name: str | None = None) -> list[DriftRecord]:
        q = select(DriftRecord).order_by(DriftRecord.at)
        if model_name is not None:
            q = q.where(DriftRecord.model_name == model_name)
        with self.sessions() as s:
            return list(s.execute(q).scalars())

    # -- training runs --------------------------------------------------------------------

    def start_run(self, model_name: str, tick: int | None = None) -> int:
        """Record a run as started; ``tick`` is the schedule's tick that fired it, if any."""
        with self.sessions.begin() as s:
            row = TrainingRun(
                model_name=model_name, started_at=time.time(), status="running", tick=tick
            )
            s.add(row)
            s.flush()
            return row.id

    def finish_run(self, run_id: int, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(finished_at=time.time(), **values)
            )

    def runs(self, model_name: str | None = None) -> list[TrainingRun]:
        q = select(TrainingRun).order_by(TrainingRun.id)
        if model_name is not None:
            q = q.where(TrainingRun.model_name == model_name)
        with self.sessions() as s:
            return list(s.execute(q).scalars())

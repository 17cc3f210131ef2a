"""Inference results: one row per (study version, model), the mask in a file."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.storage.models import InferenceResult
from dicomnode.storage.spool import FileStore

__all__ = ["ResultStore"]


class ResultStore:
    """Records what models produced; masks go to ``results/<study>/<model>-<version>.npz``."""

    def __init__(self, sessions: sessionmaker[Session], files: FileStore) -> None:
        self.sessions = sessions
        self.files = files

    def save(
        self,
        *,
        study_id: int,
        study_key: str,
        study_version: int,
        model_name: str,
        model_version: str,
        series_key: str,
        mask: np.ndarray,
        sop_keys: list[str],
        findings: list[dict[str, Any]],
        timings: dict[str, Any],
    ) -> InferenceResult:
        """Write the mask (with the source SOP keys in z order) and record the result.

        Idempotent per (study, version, model): a rerun replaces the earlier row.
        """
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=mask, sop_keys=np.array(sop_keys))
        path = f"results/{study_key}/v{study_version}-{model_name}-{model_version}.npz"
        self.files.write(path, buf.getvalue())
        return self._upsert(
            study_id=study_id,
            study_version=study_version,
            model_name=model_name,
            model_version=model_version,
            series_key=series_key,
            status="done",
            mask_path=path,
            findings=findings,
            timings=timings,
            error=None,
        )

    def save_maps(
        self,
        *,
        study_id: int,
        study_key: str,
        study_version: int,
        model_name: str,
        model_version: str,
        series_key: str,
        sop_keys: list[str],
        maps: dict[str, np.ndarray],
        findings: list[dict[str, Any]],
        timings: dict[str, Any],
    ) -> InferenceResult:
        """Record an image model's result: its findings, and its explanation maps (name ->
        (rows, columns) float32) with the classified images' SOP keys, in one file.
        Idempotent per (study, version, model), as :meth:`save`."""
        buf = io.BytesIO()
        np.savez_compressed(buf, sop_keys=np.array(sop_keys),
                            **{f"map:{name}": m for name, m in maps.items()})
        path = f"results/{study_key}/v{study_version}-{model_name}-{model_version}.npz"
        self.files.write(path, buf.getvalue())
        return self._upsert(
            study_id=study_id,
            study_version=study_version,
            model_name=model_name,
            model_version=model_version,
            series_key=series_key,
            status="done",
            mask_path=path,
            findings=findings,
            timings=timings,
            error=None,
        )

    def fail(
        self,
        *,
        study_id: int,
        study_version: int,
        model_name: str,
        model_version: str,
        series_key: str,
        error: str,
    ) -> InferenceResult:
        """Record that a model could not run on a study (the reason names no patient data)."""
        return self._upsert(
            study_id=study_id,
            study_version=study_version,
            model_name=model_name,
            model_version=model_version,
            series_key=series_key,
            status="failed",
            mask_path=None,
            findings=[],
            timings={},
            error=error,
        )

    def _upsert(self, **values: Any) -> InferenceResult:
        with self.sessions.begin() as s:
            row = s.execute(
                select(InferenceResult).where(
                    InferenceResult.study_id == values["study_id"],
                    InferenceResult.study_version == values["study_version"],
                    InferenceResult.model_name == values["model_name"],
                )
            ).scalar()
            if row is None:
                row = InferenceResult(created_at=time.time(), **values)
                s.add(row)
            else:
                for k, v in values.items():
                    setattr(row, k, v)
                row.created_at = time.time()
            s.flush()
            return row

    def clear_failed(self, study_id: int, study_version: int) -> int:
        """Delete the refused (failed) results of a study version, so their models run
        again on an operator retry; return how many."""
        with self.sessions.begin() as s:
            return int(
                s.execute(
                    delete(InferenceResult).where(
                        InferenceResult.study_id == study_id,
                        InferenceResult.study_version == study_version,
                        InferenceResult.status == "failed",
                    )
                ).rowcount
                or 0
            )

    def get(self, result_id: int) -> InferenceResult | None:
        with self.sessions() as s:
            return s.get(InferenceResult, result_id)

    def for_study(self, study_id: int) -> list[InferenceResult]:
        with self.sessions() as s:
            return list(
                s.execute(
                    select(InferenceResult)
                    .where(InferenceResult.study_id == study_id)
                    .order_by(InferenceResult.id)
                ).scalars()
            )

    def load_mask(self, result: InferenceResult) -> tuple[np.ndarray, list[str]]:
        """The saved mask and the source SOP keys in z order."""
        assert result.mask_path is not None
        with np.load(io.BytesIO(self.files.read(result.mask_path))) as z:
            return z["mask"], [str(k) for k in z["sop_keys"]]

    def load_maps(self, result: InferenceResult) -> tuple[dict[str, np.ndarray], list[str]]:
        """The explanation maps (name -> array) and image SOP keys of an image result."""
        assert result.mask_path is not None
        with np.load(io.BytesIO(self.files.read(result.mask_path))) as z:
            maps = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("map:")}
            return maps, [str(k) for k in z["sop_keys"]]

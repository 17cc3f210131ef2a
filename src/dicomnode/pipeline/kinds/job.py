"""What every encoder is given: one inference result and what it is about."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec, InstanceReference, derived_uid
from dicomnode.dicom.sources import (
    sanitized_header,
    sanitized_sources,
    surrogate_frame_of_reference,
)
from dicomnode.dicom.volume import plan_volume
from dicomnode.errors import InferenceError

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["EncodeJob", "VolumeSources"]


@dataclass(frozen=True)
class VolumeSources:
    """The sanitised source headers of a segmentation result and its mask on them."""

    datasets: list[Dataset]
    frame_numbers: list[int] | None
    """One multi-frame source: its frame numbers in mask order; else None."""
    modality: str
    mask: np.ndarray
    positions: np.ndarray | None = None
    """(frames, 3) Image Position (Patient) of every mask frame."""
    orientation: np.ndarray | None = None
    """Image Orientation (Patient): row direction, then column direction."""
    pixel_spacing: tuple[float, float] | None = None
    """(between rows, between columns) in mm."""


@dataclass
class EncodeJob:
    """One result being encoded (see :mod:`dicomnode.pipeline.kinds`)."""

    ctx: TaskContext
    result: Any
    study: Any
    package: Any
    device: DeviceSpec
    algorithm: AlgorithmSpec
    when: _dt.datetime
    previous: Callable[[str], InstanceReference | None]
    """The object of this kind an earlier study version sent (to supersede), or None."""
    built: dict[str, list[Dataset]] = field(default_factory=dict)
    """Objects built so far by kind (the SR about a segmentation needs the SEG)."""

    @property
    def key(self) -> tuple[Any, ...]:
        r = self.result
        return (self.study.study_key, r.study_version, r.model_name, r.model_version)

    def uid(self, *parts: object) -> str:
        """A UID derived from this result and ``parts`` (stable across reruns)."""
        return derived_uid(*parts, *self.key)

    def _headers(self, paths: list[str], *, pixels: bool) -> list[Dataset]:
        out = []
        for path in paths:
            with open(self.ctx.files.path(path), "rb") as fh:
                try:
                    out.append(dcmread(fh, stop_before_pixels=not pixels))
                except Exception:  # unreadable: inference left it out the same way
                    continue
        return out

    @cached_property
    def volume(self) -> VolumeSources:
        """The sources of a segmentation result.

        Raises
        ------
        InferenceError
            The series no longer matches the frames the result was made on.
        """
        ctx, result = self.ctx, self.result
        mask, refs = ctx.results.load_mask(result)
        files = ctx.index.series_files(result.study_id).get(result.series_key, [])
        headers = self._headers(files, pixels=False)
        # The same headers give the same plan as at inference (assembly is deterministic).
        plan = plan_volume(headers)
        if [f.ref for f in plan.frames] != list(refs):
            raise InferenceError(
                "the series' frames differ from those the result was made on "
                f"({len(plan.frames)} now, {len(refs)} then)"
            )
        used: list[int] = []
        for f in plan.frames:
            if f.dataset_index not in used:
                used.append(f.dataset_index)
        sanitized = sanitized_sources(
            [headers[i] for i in used],
            list(plan.frames),
            slice_thickness=plan.spacing[0],
            surrogate_frame_of_reference_uid=surrogate_frame_of_reference(
                plan.series_instance_uid),
        )
        geometry = {
            "positions": np.stack([np.asarray(f.position, float) for f in plan.frames]),
            "orientation": np.asarray(plan.orientation, float),
            "pixel_spacing": (float(plan.frames[0].pixel_spacing[0]),
                              float(plan.frames[0].pixel_spacing[1])),
        }
        if all(f.frame_number is None for f in plan.frames):
            by_uid = {str(ds.SOPInstanceUID): ds for ds in sanitized}
            return VolumeSources([by_uid[f.sop_instance_uid] for f in plan.frames], None,
                                 plan.modality, mask, **geometry)
        if len(sanitized) == 1:
            numbers = [int(f.frame_number or 1) for f in plan.frames]
            return VolumeSources(sanitized, numbers, plan.modality, mask, **geometry)
        raise InferenceError("the volume mixes multi-frame and single-frame objects")

    @cached_property
    def images(self) -> tuple[list[Dataset], dict[str, np.ndarray]]:
        """The classified images (with pixels, sanitised copies: the key image renders
        them) in the result's order, and the explanation maps by name.

        Raises
        ------
        InferenceError
            A classified image is gone.
        """
        maps, sop_keys = self.ctx.results.load_maps(self.result)
        wanted = set(sop_keys)
        found: dict[str, Dataset] = {}
        for paths in self.ctx.index.series_files(self.result.study_id).values():
            for ds in self._headers(paths, pixels=True):
                uid = str(ds.get("SOPInstanceUID", ""))
                if uid in wanted and uid not in found:
                    found[uid] = ds
        missing = [k for k in sop_keys if k not in found]
        if missing:
            raise InferenceError(f"{len(missing)} classified image(s) can no longer be read")
        return [_with_pixels(found[k]) for k in sop_keys], maps


def _with_pixels(ds: Dataset) -> Dataset:
    out = sanitized_header(ds)
    for elem in ds:
        if elem.tag.group == 0x7FE0:
            out.add(elem)
    return out

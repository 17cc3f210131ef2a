"""SEG: the segmentation of a segmentation model's result (``dicom.seg.build_seg``)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.dicom.seg import SegmentSpec, build_seg
from dicomnode.pipeline.kinds.job import EncodeJob

__all__ = ["encode"]

SERIES_NUMBER = 9001


def encode(job: EncodeJob) -> list[Dataset]:
    """One binary SEG, one segment per package label, on the result's source frames."""
    if job.package.task != "segmentation":
        return []
    src = job.volume
    segments = [
        SegmentSpec(
            number=lb.number,
            label=lb.name,
            category=(lb.category.scheme, lb.category.value, lb.category.meaning),
            type=(lb.type.scheme, lb.type.value, lb.type.meaning),
            rgb=lb.color,
        )
        for lb in job.package.labels
    ]
    seg = build_seg(
        src.datasets,
        src.mask,
        segments,
        job.algorithm,
        device=job.device,
        series_instance_uid=job.uid("seg-series"),
        sop_instance_uid=job.uid("seg"),
        series_number=SERIES_NUMBER,
        series_description=f"{job.package.name} {job.package.version} segmentation",
        supersedes=job.previous("SEG"),
        content_datetime=job.when,
        frame_numbers=src.frame_numbers,
    )
    return [seg]

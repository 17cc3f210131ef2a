"""PM: a Parametric Map per explanation map (positive label on an image), see
:func:`dicomnode.dicom.explain.build_explanation_map`."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.dicom.explain import build_explanation_map
from dicomnode.pipeline.kinds.job import EncodeJob

__all__ = ["encode", "explained"]

SERIES_NUMBER = 9003
_METHODS = {"occlusion": "occlusion sensitivity", "output": "model saliency"}


def explained(job: EncodeJob) -> list[tuple[dict, Dataset, object]]:
    """(finding, image, map) for every finding with an explanation map, in order."""
    if job.package.task != "classification":
        return []
    images, maps = job.images
    out = []
    for f in job.result.findings:
        name = (f.get("explanation") or {}).get("map")
        if name is not None and name in maps:
            out.append((f, images[int(f["image"])], maps[name]))
    return out


def encode(job: EncodeJob) -> list[Dataset]:
    """One map per explained (image, label); none when nothing is positive."""
    return [
        build_explanation_map(
            image,
            values,  # type: ignore[arg-type]
            label=str(f["label_name"]),
            method=_METHODS.get(str(f["explanation"].get("method")), "explanation"),
            algorithm=job.algorithm,
            device=job.device,
            series_instance_uid=job.uid("pm-series"),
            sop_instance_uid=job.uid("pm", f["image"], f["label"]),
            series_number=SERIES_NUMBER,
            content_datetime=job.when,
        )
        for f, image, values in explained(job)
    ]

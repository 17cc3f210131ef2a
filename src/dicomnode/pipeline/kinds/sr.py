"""SR: the TID 1500 Measurement Report of a result.

Segmentation: :func:`dicomnode.dicom.sr.build_measurement_report` about the SEG (built
first; built here when the SEG kind itself is switched off, so the SR can reference it).
Classification: :func:`dicomnode.dicom.classification.build_classification_report`, one
group per (image, label).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.dicom.classification import ClassifiedLabel, build_classification_report
from dicomnode.dicom.findings import Finding
from dicomnode.dicom.sr import build_measurement_report
from dicomnode.pipeline.kinds import seg as seg_kind
from dicomnode.pipeline.kinds.job import EncodeJob

__all__ = ["encode"]

SERIES_NUMBER = 9002


def _per_label(findings: list[dict], modality: str) -> list[Finding]:
    """One Finding per label, over all its components (what the SR reports)."""
    by_label: dict[int, list[dict]] = {}
    for f in findings:
        by_label.setdefault(int(f["label"]), []).append(f)
    out = []
    for label, comps in sorted(by_label.items()):
        voxels = sum(int(c["voxel_count"]) for c in comps)
        mean = None
        if modality == "CT":
            mean = float(
                sum(float(c["mean_value"]) * int(c["voxel_count"]) for c in comps)
                / max(1, voxels)
            )
        out.append(
            Finding(
                label_number=label,
                label=str(comps[0]["label_name"]),
                volume_mm3=float(sum(float(c["volume_mm3"]) for c in comps)),
                max_diameter_mm=float(max(float(c["max_diameter_mm"]) for c in comps)),
                mean_intensity=mean,
            )
        )
    return out


def _classification(job: EncodeJob) -> Dataset:
    images, _ = job.images
    labels = {lb.number: lb for lb in job.package.labels}
    entries = [
        ClassifiedLabel(
            image_index=int(f["image"]),
            label=str(f["label_name"]),
            finding_type=_triple(labels[int(f["label"])].type),
            finding_category=_triple(labels[int(f["label"])].category),
            probability=float(f["probability"]),
            threshold=float(f["threshold"]),
        )
        for f in job.result.findings
        if f.get("kind") == "classification"
    ]
    return build_classification_report(
        images,
        entries,
        job.algorithm,
        device=job.device,
        series_instance_uid=job.uid("sr-series"),
        sop_instance_uid=job.uid("sr"),
        series_number=SERIES_NUMBER,
        supersedes=job.previous("SR"),
        content_datetime=job.when,
    )


def _triple(code: object) -> tuple[str, str, str]:
    return (code.scheme, code.value, code.meaning)  # type: ignore[attr-defined]


def encode(job: EncodeJob) -> list[Dataset]:
    """One report per result."""
    if job.package.task == "classification":
        return [_classification(job)]
    segs = job.built.get("SEG") or seg_kind.encode(job)
    src = job.volume
    sr = build_measurement_report(
        src.datasets,
        segs[0],
        _per_label(job.result.findings, src.modality),
        job.algorithm,
        device=job.device,
        series_instance_uid=job.uid("sr-series"),
        sop_instance_uid=job.uid("sr"),
        series_number=SERIES_NUMBER,
        supersedes=job.previous("SR"),
        content_datetime=job.when,
    )
    return [sr]

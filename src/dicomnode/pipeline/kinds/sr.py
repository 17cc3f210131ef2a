"""SR: the TID 1500 Measurement Report of a result.

Segmentation: :func:`dicomnode.dicom.sr.build_measurement_report` about the SEG (built
first; built here when the SEG kind itself is switched off, so the SR can reference it):
one group per label (the totals), then one per finding (connected component) with the
tracking identity the inference step gave it (:mod:`dicomnode.pipeline.tracking`).
Classification: :func:`dicomnode.dicom.classification.build_classification_report`, one
group per (image, label).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.dicom.classification import ClassifiedLabel, build_classification_report
from dicomnode.dicom.findings import ComponentFinding, Finding
from dicomnode.dicom.sr import build_measurement_report
from dicomnode.inference.postprocess import connected_components
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


def _components(job: EncodeJob) -> list[ComponentFinding]:
    """The result's findings one by one, located on the source frames.

    Measurements and tracking come from the result (made on the model's grid); the
    frames a finding spans come from the connected component of the mask on the
    source frames whose centroid is nearest the finding's (same label): on an aligned
    series, the same component.
    """
    src = job.volume
    if src.positions is None or src.orientation is None or src.pixel_spacing is None:
        return []
    wanted = [
        f for f in job.result.findings
        if f.get("tracking_uid") and f.get("centroid_mm") is not None
    ]
    if not wanted:
        return []
    row_dir, col_dir = src.orientation[:3], src.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    dy, dx = src.pixel_spacing
    # on-frame components per label: (centroid in mm, frames)
    on_frames: dict[int, list[tuple[np.ndarray, tuple[int, ...]]]] = {}
    for label in sorted({int(f["label"]) for f in wanted}):
        comp, n = connected_components(src.mask == label)
        if n == 0:
            continue
        fz, ry, cx = np.nonzero(comp)
        ids = comp[fz, ry, cx]
        count = np.bincount(ids, minlength=n + 1)[1:]
        mean = [np.bincount(ids, weights=w, minlength=n + 1)[1:] / count for w in (ry, cx)]
        pos = np.stack(
            [np.bincount(ids, weights=src.positions[fz, k], minlength=n + 1)[1:] / count
             for k in range(3)], axis=1)
        centroids = pos + np.outer(mean[1] * dx, row_dir) + np.outer(mean[0] * dy, col_dir)
        frames = [tuple(np.unique(fz[ids == k + 1]).tolist()) for k in range(n)]
        on_frames[label] = list(zip(centroids, frames, strict=True))
    taken: set[tuple[int, int]] = set()
    out = []
    ct = src.modality == "CT"
    for f in wanted:
        label, c = int(f["label"]), np.asarray(f["centroid_mm"], float)
        depth = (src.positions - c) @ normal
        nearest = int(np.argmin(np.abs(depth)))
        offset = c - src.positions[nearest]
        pixel = (max(0.0, float(offset @ row_dir) / dx + 0.5),
                 max(0.0, float(offset @ col_dir) / dy + 0.5))
        frames: tuple[int, ...] = (nearest,)
        candidates = [
            (float(np.linalg.norm(cen - c)), k)
            for k, (cen, _) in enumerate(on_frames.get(label, []))
            if (label, k) not in taken
        ]
        if candidates:
            _, k = min(candidates)
            taken.add((label, k))
            frames = on_frames[label][k][1]
        long_axis = f.get("max_axial_diameter_mm")
        short = f.get("short_axis_mm")
        out.append(
            ComponentFinding(
                label_number=label,
                tracking_identifier=str(f["tracking_id"]),
                tracking_uid=str(f["tracking_uid"]),
                volume_mm3=float(f["volume_mm3"]),
                centroid_mm=(float(c[0]), float(c[1]), float(c[2])),
                frames=frames,
                centroid_frame=nearest,
                centroid_pixel=pixel,
                max_diameter_mm=f.get("max_diameter_mm"),
                long_axis_mm=long_axis,
                # a short axis of a finding one pixel across says nothing
                short_axis_mm=short if short is not None and long_axis else None,
                mean_intensity=float(f["mean_value"]) if ct else None,
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
        components=_components(job),
        frame_numbers=src.frame_numbers,
        series_instance_uid=job.uid("sr-series"),
        sop_instance_uid=job.uid("sr"),
        series_number=SERIES_NUMBER,
        supersedes=job.previous("SR"),
        content_datetime=job.when,
    )
    return [sr]

"""KEY: the rendered key image of every explanation map (the map over the image, RGB
Secondary Capture), see :func:`dicomnode.dicom.explain.build_key_image`."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.dicom.explain import build_key_image, render_overlay
from dicomnode.dicom.image import load_image
from dicomnode.pipeline.kinds.job import EncodeJob
from dicomnode.pipeline.kinds.pm import explained

__all__ = ["encode"]

SERIES_NUMBER = 9004


def encode(job: EncodeJob) -> list[Dataset]:
    """One key image per explained (image, label)."""
    out = []
    for f, image, values in explained(job):
        # displayed as a reader sees it: MONOCHROME1 inverted, the image's own window
        display = load_image(image, invert_monochrome1=True, voi="window").array
        rendered = render_overlay(display, values)  # type: ignore[arg-type]
        desc = f"{job.package.name}: {f['label_name']} {float(f['probability']):.2f}"
        out.append(build_key_image(
            image,
            rendered,
            description=desc,
            device=job.device,
            series_instance_uid=job.uid("key-series"),
            sop_instance_uid=job.uid("key", f["image"], f["label"]),
            series_number=SERIES_NUMBER,
            content_datetime=job.when,
        ))
    return out

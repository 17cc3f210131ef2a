"""Time volume assembly, SEG and SR building on a 300×512×512 CT phantom (not a test).

Run: ``.venv/bin/python tests/dicomcore/bench_seg_sr.py [--repeat N]``. Prints the
median wall time of each step; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from coretools import ALGORITHM, DEVICE, LESION
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode.dicom.findings import Finding, derived_uid
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.seg import build_seg, read_seg
from dicomnode.dicom.sr import build_measurement_report
from dicomnode.dicom.volume import assemble_volume


def timed(label: str, fn: Callable[[], Any], repeat: int) -> Any:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    print(f"{label:<44} {statistics.median(times):7.3f} s  (min {min(times):.3f}, n={repeat})")
    return result


def encode(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.repeat

    start = time.perf_counter()
    study = make_ct_study(
        n_slices=300,
        rows=512,
        columns=512,
        pixel_spacing_mm=0.7,
        slice_thickness_mm=1.0,
        n_lesions=4,
    )
    print(f"{'phantom (not timed further)':<44} {time.perf_counter() - start:7.3f} s")
    mask = study.mask
    print(
        f"mask: {mask.shape}, {len(study.lesions)} lesions, {int(mask.sum())} voxels, "
        f"{sum(bool(mask[k].any()) for k in range(mask.shape[0]))} non-empty slices"
    )
    volume = timed("assemble_volume (decode + rescale)", lambda: assemble_volume(study.datasets), n)
    uids = {
        "series_instance_uid": derived_uid("bench", "seg"),
        "sop_instance_uid": derived_uid("bench", "seg", 1),
    }
    common = {"device": DEVICE, "series_number": 901, **uids}

    for syntax, name in ((ExplicitVRLittleEndian, "EVRLE"), (JPEG2000Lossless, "J2K lossless")):
        seg = timed(
            f"build_seg 1 label, {name}",
            lambda syntax=syntax: build_seg(
                volume.headers, mask, [LESION], ALGORITHM, transfer_syntax_uid=syntax, **common
            ),
            n,
        )
        data = timed(f"  encode SEG ({name})", lambda seg=seg: encode(seg), n)
        print(f"  SEG size {len(data) / 1e6:.2f} MB, {seg.NumberOfFrames} frames")
        back = timed(
            f"  read_seg ({name})",
            lambda data=data: read_seg(dcmread(io.BytesIO(data)), volume.sop_instance_uids)[0],
            n,
        )
        assert np.array_equal(back, mask)

    empty = np.zeros_like(mask)
    timed(
        "build_seg empty mask, EVRLE",
        lambda: build_seg(volume.headers, empty, [LESION], ALGORITHM, **common),
        n,
    )

    seg = build_seg(volume.headers, mask, [LESION], ALGORITHM, **common)
    voxel_mm3 = float(np.prod(volume.spacing))
    finding = Finding(
        label_number=1,
        label="Lesion",
        volume_mm3=float(mask.sum()) * voxel_mm3,
        max_diameter_mm=24.0,
        mean_intensity=float(volume.array[mask > 0].mean()),
    )
    sr = timed(
        "build_measurement_report (1 finding)",
        lambda: build_measurement_report(
            volume.headers,
            seg,
            [finding],
            ALGORITHM,
            device=DEVICE,
            series_instance_uid=derived_uid("bench", "sr"),
            sop_instance_uid=derived_uid("bench", "sr", 1),
            series_number=902,
        ),
        n,
    )
    data = timed("  encode SR", lambda: encode(sr), n)
    print(f"  SR size {len(data) / 1e3:.1f} kB")


if __name__ == "__main__":
    main()

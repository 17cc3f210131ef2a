"""SEG objects on the sources real series arrive as: multi-frame objects, resampled stacks.

The node's mask lies on the volume's grid; :meth:`Volume.mask_on_frames` brings it back
onto the frames as sent, and the SEG references those. highdicom, an independent reader,
must read every SEG back aligned to its source, frame by frame.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from coretools import ALGORITHM, DEVICE, LESION, assert_valid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.dicom.findings import derived_uid
from dicomnode.dicom.phantom import PhantomStudy
from dicomnode.dicom.seg import build_seg
from dicomnode.dicom.sources import sanitized_sources, surrogate_frame_of_reference
from dicomnode.dicom.volume import Volume, assemble_volume


def _seg(volume: Volume, on_frames: np.ndarray, name: str) -> hd.seg.Segmentation:
    sources = sanitized_sources(
        volume.headers, list(volume.frames), slice_thickness=volume.spacing[0],
        surrogate_frame_of_reference_uid=surrogate_frame_of_reference(
            volume.series_instance_uid),
    )
    numbers = None
    if volume.frames[0].frame_number is not None:
        numbers = [int(f.frame_number or 0) for f in volume.frames]
    else:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
        sources = [by_uid[f.sop_instance_uid] for f in volume.frames]
    return build_seg(
        sources, on_frames, [LESION], ALGORITHM, device=DEVICE,
        series_instance_uid=derived_uid(name, "series"), sop_instance_uid=derived_uid(name),
        series_number=99, frame_numbers=numbers,
    )


def _lesion(study: PhantomStudy) -> np.ndarray:
    return (study.mask > 0).astype(np.uint8)


def test_seg_on_legacy_converted_enhanced_ct_reads_back_aligned(
    study: PhantomStudy, tmp_path: Path
) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    mf = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[copy.deepcopy(ds) for ds in study.datasets],
        series_instance_uid=derived_uid("lce series"), series_number=90,
        sop_instance_uid=derived_uid("lce"), instance_number=1,
    )
    volume = assemble_volume([mf])
    truth = _lesion(study)
    on_frames = volume.mask_on_frames(truth)

    seg = assert_valid(_seg(volume, on_frames, "lce-seg"), tmp_path / "seg.dcm")

    read = hd.seg.Segmentation.from_dataset(seg)
    numbers = [int(f.frame_number or 0) for f in volume.frames]
    pixels = read.get_pixels_by_source_frame(
        source_sop_instance_uid=str(mf.SOPInstanceUID), source_frame_numbers=numbers,
        segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels, truth)


def test_seg_on_4d_multi_frame_references_exactly_the_volume_frames(
    study: PhantomStudy, tmp_path: Path
) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    two_times = [copy.deepcopy(ds) for ds in study.datasets[:8]]
    for k, ds in enumerate(copy.deepcopy(study.datasets[:8])):
        ds.SOPInstanceUID = derived_uid("second time point", k)
        ds.InstanceNumber = 100 + k
        two_times.append(ds)
    mf = LegacyConvertedEnhancedCTImage(
        legacy_datasets=two_times, series_instance_uid=derived_uid("4d series"),
        series_number=91, sop_instance_uid=derived_uid("4d"), instance_number=1,
    )
    volume = assemble_volume([mf])
    assert volume.plan.n_volumes == 2 and len(volume.frames) == 8
    truth = _lesion(study)[:8]
    on_frames = volume.mask_on_frames(truth)

    seg = assert_valid(_seg(volume, on_frames, "4d-seg"), tmp_path / "seg.dcm")

    referenced = {
        int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for g in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {int(f.frame_number or 0) for f in volume.frames}
    assert len(referenced) == int((truth.reshape(8, -1).max(axis=1) > 0).sum())


def test_seg_on_tilted_stack_lies_on_the_frames_as_sent(
    study: PhantomStudy, tmp_path: Path
) -> None:
    # A gantry-tilted acquisition: slice k is shifted k rows (k * 1.5 mm) in y, and the
    # anonymiser dropped the Frame of Reference UID.
    datasets: list[Dataset] = [copy.deepcopy(ds) for ds in study.datasets]
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.5 * k, z]
        del ds.FrameOfReferenceUID
    volume = assemble_volume(datasets)
    assert not volume.aligned and volume.frame_of_reference_uid is None
    # the lesion as seen in each source slice (its own pixels), carried onto the grid
    truth = _lesion(study)
    grid = volume.grid_from_frames(truth)
    on_frames = volume.mask_on_frames(grid)

    seg = assert_valid(_seg(volume, on_frames, "tilt-seg"), tmp_path / "seg.dcm")

    # back on the frames as sent, nothing lost inside the field of view
    inside = np.ones_like(truth)
    for k in range(truth.shape[0]):
        inside[k, 128 - k:] = 0
    np.testing.assert_array_equal(on_frames * inside, truth * inside)
    read = hd.seg.Segmentation.from_dataset(seg)
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[f.sop_instance_uid for f in volume.frames],
        segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels, on_frames)
    assert seg.FrameOfReferenceUID == surrogate_frame_of_reference(volume.series_instance_uid)


@pytest.mark.parametrize(
    ("charset", "expected"),
    [("", None), ("ISO 2022 IR 13", "ISO_IR 192"), ("ISO_IR 100", "ISO_IR 192")],
    ids=["empty", "iso2022-alone", "latin1"],
)
def test_sanitized_sources_character_set(
    volume: Volume, charset: str, expected: str | None
) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    headers[0].SpecificCharacterSet = charset

    [out, *_] = sanitized_sources(
        headers, list(volume.frames), slice_thickness=3.0,
        surrogate_frame_of_reference_uid="1.2.3",
    )

    assert out.get("SpecificCharacterSet") == expected
    assert headers[0].SpecificCharacterSet == charset  # the original is untouched


def test_sanitized_sources_fill_what_highdicom_reads(volume: Volume) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        del h.SliceThickness, h.PatientSex, h.FrameOfReferenceUID
        # written so by a real scanner: not a valid AS (read lazily, as from a file)
        h._dict[Tag(0x00101010)] = RawDataElement(Tag(0x00101010), "AS", 2, b"0Y", 0, False, True)

    out = sanitized_sources(
        headers, list(volume.frames), slice_thickness=2.5000000001,
        surrogate_frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1",
    )

    assert all(str(ds.SliceThickness) == "2.5000000001" or float(ds.SliceThickness) == 2.5
               for ds in out)
    assert all(len(str(ds.SliceThickness)) <= 16 for ds in out)
    assert all(ds.PatientSex == "" and "PatientAge" not in ds for ds in out)
    assert {ds.FrameOfReferenceUID for ds in out} == {"1.2.826.0.1.3680043.8.498.1"}

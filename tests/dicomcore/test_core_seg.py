"""BINARY SEG building and reading (dicomnode.dicom.seg)."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from coretools import (
    ALGORITHM,
    DEVICE,
    LESION,
    ORGAN,
    VESSEL,
    assert_valid,
    dciodvfy,
    write,
    write_and_read,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, SegmentationStorage

from dicomnode.dicom.findings import InstanceReference, derived_uid
from dicomnode.dicom.phantom import PhantomStudy
from dicomnode.dicom.seg import SegmentAlgorithmTypeValues, SegmentSpec, build_seg, read_seg
from dicomnode.dicom.volume import Volume
from dicomnode.errors import DatasetError

WHEN = dt.datetime(2026, 3, 1, 12, 30, 15)
SEG_SERIES_UID = derived_uid("test", "seg series")
SEG_UID = derived_uid("test", "seg instance")

Build = Callable[..., hd.seg.Segmentation]


@pytest.fixture
def build(volume: Volume, study: PhantomStudy) -> Build:
    """``build(mask=..., segments=..., **overrides)`` with the test defaults."""

    def factory(mask: np.ndarray | None = None, segments: Any = (LESION,), **kw: Any) -> Any:
        args: dict[str, Any] = {
            "device": DEVICE,
            "series_instance_uid": SEG_SERIES_UID,
            "sop_instance_uid": SEG_UID,
            "series_number": 901,
            "content_datetime": WHEN,
        }
        args.update(kw)
        source = args.pop("source_datasets", volume.headers)
        return build_seg(
            source, study.mask if mask is None else mask, list(segments), ALGORITHM, **args
        )

    return factory


def _multi_label(study: PhantomStudy) -> np.ndarray:
    # Lesions 1, vessels 2 (where not lesion); label 3 (organ) declared but empty.
    return (study.mask + 2 * study.vessel_mask * (study.mask == 0)).astype(np.uint8)


def _frame_sources(ds: Dataset) -> list[tuple[int, str]]:
    # One segment: highdicom puts Segment Identification in the shared functional groups.
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for group in ds.PerFrameFunctionalGroupsSequence:
        ident = group if "SegmentIdentificationSequence" in group else shared
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out.append((number, str(source)))
    return out


# ----------------------------------------------------------------------------- construction


def test_construction(build: Build, volume: Volume, study: PhantomStudy, tmp_path: Path) -> None:
    seg = build()

    ds = assert_valid(seg, tmp_path / "seg.dcm")

    assert ds.SOPClassUID == SegmentationStorage  # classic, not Label Map (…66.7)
    assert ds.SegmentationType == "BINARY"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.Modality == "SEG"
    assert ds.SeriesInstanceUID == SEG_SERIES_UID
    assert ds.SOPInstanceUID == SEG_UID
    assert ds.SeriesNumber == 901
    assert ds.InstanceNumber == 1
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert ds.PatientID == study.spec.patient_id
    assert ds.SeriesDescription == "lesionnet 1.2.0 SEG"
    assert ds.ContentLabel == "AI_SEGMENTATION"
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("dicomnode project", "dicomnode")
    assert ds.DeviceSerialNumber == "node-test-1"
    assert ds.ContentDate == "20260301"
    assert ds.InstanceCreationTime.startswith("123015")


def test_construction_references_exact_source_instances(
    build: Build, volume: Volume, study: PhantomStudy
) -> None:
    seg = build()

    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    referenced = [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(volume.sop_instance_uids)
    lesion_slices = [k for k in range(volume.shape[0]) if study.mask[k].any()]
    assert seg.NumberOfFrames == len(lesion_slices)  # empty frames omitted
    assert sorted(_frame_sources(seg)) == sorted(
        (1, volume.sop_instance_uids[k]) for k in lesion_slices
    )


def test_construction_segment_description(build: Build) -> None:
    seg = build()

    (item,) = seg.SegmentSequence
    assert item.SegmentNumber == 1
    assert item.SegmentLabel == "Lesion"
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentAlgorithmName == "lesionnet"
    category = item.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    kind = item.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == (
        "SCT",
        "108369006",
        "Neoplasm",
    )
    assert hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb() == (
        255,
        64,
        0,
    )
    (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lesionnet", "1.2.0")
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
        "123110",
        "DCM",
        "Artificial Intelligence",
    )
    assert algorithm.AlgorithmSource == "dicomnode tests"
    assert item.TrackingUID == derived_uid(SEG_UID, "segment", 1)


def test_construction_read_back_equals_mask(
    build: Build, volume: Volume, study: PhantomStudy, tmp_path: Path
) -> None:
    ds = write_and_read(build(), tmp_path / "seg.dcm")

    mask, segments = read_seg(ds, volume.sop_instance_uids)

    np.testing.assert_array_equal(mask, study.mask)
    assert mask.dtype == np.uint8
    assert segments == (LESION,)


def test_construction_multiple_labels(
    build: Build, volume: Volume, study: PhantomStudy, tmp_path: Path
) -> None:
    labels = _multi_label(study)
    seg = build(labels, segments=(LESION, VESSEL, ORGAN))

    ds = assert_valid(seg, tmp_path / "seg.dcm")
    mask, segments = read_seg(ds, volume.sop_instance_uids)

    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3]  # empty 3 kept
    assert {n for n, _ in _frame_sources(ds)} == {1, 2}  # segment 3 has no frames
    np.testing.assert_array_equal(mask, labels)
    assert segments == (LESION, VESSEL, ORGAN)


def test_construction_empty_mask(build: Build, volume: Volume, tmp_path: Path) -> None:
    empty = np.zeros(volume.shape, dtype=np.uint8)
    seg = build(empty, segments=(LESION, VESSEL))

    ds = assert_valid(seg, tmp_path / "seg.dcm")
    mask, segments = read_seg(ds, volume.sop_instance_uids)

    assert ds.NumberOfFrames == 2  # one empty frame per segment
    assert _frame_sources(ds) == [
        (1, volume.sop_instance_uids[0]),
        (2, volume.sop_instance_uids[0]),
    ]
    referenced = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(referenced) == volume.shape[0]  # every examined image is still referenced
    assert not mask.any()
    assert mask.shape == volume.shape
    assert len(segments) == 2


@pytest.mark.parametrize("dtype", [np.bool_, np.uint16])
def test_construction_other_mask_dtypes(
    build: Build, volume: Volume, study: PhantomStudy, dtype: type
) -> None:
    seg = build(study.mask.astype(dtype))

    mask, _ = read_seg(seg, volume.sop_instance_uids)

    np.testing.assert_array_equal(mask, study.mask)


def test_construction_jpeg2000(
    build: Build, volume: Volume, study: PhantomStudy, tmp_path: Path
) -> None:
    labels = _multi_label(study)
    seg = build(labels, segments=(LESION, VESSEL), transfer_syntax_uid=JPEG2000Lossless)

    ds = assert_valid(seg, tmp_path / "seg.dcm")
    mask, _ = read_seg(ds, volume.sop_instance_uids)

    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(mask, labels)


def test_construction_deterministic(build: Build, tmp_path: Path) -> None:
    first = write_and_read(build(), tmp_path / "a.dcm")
    second = write_and_read(build(), tmp_path / "b.dcm")

    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (SEG_SERIES_UID, SEG_UID)
    assert (second.SeriesInstanceUID, second.SOPInstanceUID) == (SEG_SERIES_UID, SEG_UID)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_construction_supersedes(build: Build, study: PhantomStudy, tmp_path: Path) -> None:
    old = InstanceReference(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=derived_uid("test", "old seg series"),
        sop_class_uid=SegmentationStorage,
        sop_instance_uid=derived_uid("test", "old seg"),
    )
    seg = build(supersedes=old)

    ds = assert_valid(seg, tmp_path / "seg.dcm")

    (item,) = ds.ReferencedInstanceSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        SegmentationStorage,
        old.sop_instance_uid,
    )
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "121360")
    series = [str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence]
    assert series == [study.series_instance_uid, old.series_instance_uid]  # source series first
    mask, _ = read_seg(ds, [str(h.SOPInstanceUID) for h in study.datasets])
    np.testing.assert_array_equal(mask, study.mask)


def test_construction_manual_segment_has_no_algorithm(build: Build) -> None:
    manual = SegmentSpec(1, "Lesion", LESION.category, LESION.type, algorithm_type="MANUAL")

    seg = build(segments=(manual,))

    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in seg.SegmentSequence[0]


# ---------------------------------------------------------------------------- invalid input


def _with_study_uid(volume: Volume, k: int) -> list[Dataset]:
    headers = [copy.deepcopy(h) for h in volume.headers]
    headers[k].StudyInstanceUID = derived_uid("test", "other study")
    return headers


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask": np.zeros((3, 128, 128), np.uint8)}, r"mask has shape \(3, 128, 128\), expected"),
        ({"mask": np.zeros((32, 128, 128), np.int64)}, "dtype int64, expected an unsigned"),
        ({"mask": np.full((32, 128, 128), 2, np.uint8)}, "label 2, but only segments 1..1"),
        ({"segments": ()}, "segments is empty"),
        ({"segments": (VESSEL,)}, r"numbered 1..1 in order, got \[2\]"),
        ({"segments": (VESSEL, LESION)}, r"numbered 1..2 in order, got \[2, 1\]"),
        ({"series_instance_uid": "1.2.abc"}, "series_instance_uid is not a valid UID"),
        ({"sop_instance_uid": ""}, "sop_instance_uid is not a valid UID"),
        ({"series_number": 0}, "series_number must be an int"),
        ({"instance_number": True}, "instance_number must be an int"),
        ({"content_label": "ai seg"}, "content_label must be"),
        ({"content_description": "x" * 65}, "content_description has 65 characters"),
        ({"transfer_syntax_uid": JPEGLSLossless}, "not supported for BINARY SEG"),
        ({"source_datasets": []}, "source_datasets is empty"),
        ({"device": "node"}, "device must be a DeviceSpec"),
    ],
)
def test_construction_invalid(build: Build, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(**overrides)


def test_construction_sources_of_two_studies(build: Build, volume: Volume) -> None:
    with pytest.raises(ValueError, match="share one StudyInstanceUID"):
        build(source_datasets=_with_study_uid(volume, 3))


def test_construction_source_without_type2_attribute(build: Build, volume: Volume) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    del headers[0].PatientBirthDate

    with pytest.raises(ValueError, match="lacks PatientBirthDate .Type 2"):
        build(source_datasets=headers)


def test_construction_supersedes_other_study(build: Build) -> None:
    other = InstanceReference(
        derived_uid("x", "study"),
        derived_uid("x", "series"),
        SegmentationStorage,
        derived_uid("x", "sop"),
    )

    with pytest.raises(ValueError, match="same study"):
        build(supersedes=other)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"number": 0}, "number must be an int in 1..65535"),
        ({"label": ""}, "label must not be empty"),
        ({"category": ("SCT", "49755003")}, "category must be a .scheme, value, meaning."),
        ({"type": ("SCT", "", "Neoplasm")}, "type has an empty part"),
        ({"rgb": (256, 0, 0)}, "rgb must be three ints in 0..255"),
        ({"algorithm_type": "GUESSED"}, "algorithm_type must be AUTOMATIC"),
    ],
)
def test_segment_spec_invalid(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "number": 1,
        "label": "Lesion",
        "category": LESION.category,
        "type": LESION.type,
    }

    with pytest.raises(ValueError, match=message):
        SegmentSpec(**{**base, **fields})


def test_segment_spec_coerces_codes() -> None:
    spec = SegmentSpec(1, "Lesion", hd.sr.CodedConcept("49755003", "SCT", "Morph"), LESION.type)

    assert spec.category == ("SCT", "49755003", "Morph")
    assert spec.algorithm_type is SegmentAlgorithmTypeValues.AUTOMATIC


# ---------------------------------------------------------------------------------- reading


def _strip_references(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    for group in out.PerFrameFunctionalGroupsSequence:
        del group.DerivationImageSequence
    return out


def test_read_seg_by_position(build: Build, volume: Volume, study: PhantomStudy) -> None:
    ds = _strip_references(build())

    mask, _ = read_seg(ds, volume.sop_instance_uids, source_positions=volume.positions)

    np.testing.assert_array_equal(mask, study.mask)


def test_read_seg_by_position_needs_positions(build: Build, volume: Volume) -> None:
    ds = _strip_references(build())

    with pytest.raises(DatasetError, match="maps to none of the given source images"):
        read_seg(ds, volume.sop_instance_uids)


def test_read_seg_subset_of_sources(build: Build, volume: Volume, study: PhantomStudy) -> None:
    # Only the slices the caller asks for; frames of other slices must not be dropped silently.
    lesion_slices = [k for k in range(volume.shape[0]) if study.mask[k].any()]
    keep = [u for k, u in enumerate(volume.sop_instance_uids) if k != lesion_slices[0]]

    with pytest.raises(DatasetError, match="maps to none of the given source images"):
        read_seg(build(), keep)


def test_read_seg_other_order(build: Build, volume: Volume, study: PhantomStudy) -> None:
    reversed_uids = list(reversed(volume.sop_instance_uids))

    mask, _ = read_seg(build(), reversed_uids)

    np.testing.assert_array_equal(mask, study.mask[::-1])


def _overlapping_seg(volume: Volume) -> hd.seg.Segmentation:
    stacked = np.zeros((*volume.shape, 2), dtype=np.uint8)
    stacked[10, 20:40, 20:40, 0] = 1
    stacked[10, 30:50, 30:50, 1] = 1
    return hd.seg.Segmentation(
        source_images=list(volume.headers),
        pixel_array=stacked,
        segmentation_type="BINARY",
        segment_descriptions=[
            hd.seg.SegmentDescription(
                n, spec.label, spec.category.to_code(), spec.type.to_code(), "MANUAL"
            )
            for n, spec in ((1, LESION), (2, VESSEL))
        ],
        series_instance_uid=SEG_SERIES_UID,
        series_number=1,
        sop_instance_uid=SEG_UID,
        instance_number=1,
        manufacturer="x",
        manufacturer_model_name="x",
        software_versions="1",
        device_serial_number="1",
    )


def test_read_seg_overlap(volume: Volume) -> None:
    with pytest.raises(DatasetError, match=r"segments \[1, 2\] overlap"):
        read_seg(_overlapping_seg(volume), volume.sop_instance_uids)


def test_read_seg_overlap_allowed(volume: Volume) -> None:
    mask, segments = read_seg(
        _overlapping_seg(volume), volume.sop_instance_uids, allow_overlap=True
    )

    assert mask[10, 35, 35] == 2  # the higher number wins
    assert mask[10, 25, 25] == 1
    assert mask[10, 45, 45] == 2
    assert [s.algorithm_type for s in segments] == [SegmentAlgorithmTypeValues.MANUAL] * 2


def test_read_seg_fractional(volume: Volume, study: PhantomStudy) -> None:
    probabilities = study.mask.astype(np.float32) * 0.9 + 0.05  # 0.05 outside, 0.95 inside
    seg = hd.seg.Segmentation(
        source_images=list(volume.headers),
        pixel_array=probabilities,
        segmentation_type="FRACTIONAL",
        segment_descriptions=[
            hd.seg.SegmentDescription(
                1, "Lesion", LESION.category.to_code(), LESION.type.to_code(), "MANUAL"
            )
        ],
        series_instance_uid=SEG_SERIES_UID,
        series_number=1,
        sop_instance_uid=SEG_UID,
        instance_number=1,
        manufacturer="x",
        manufacturer_model_name="x",
        software_versions="1",
        device_serial_number="1",
    )

    mask, _ = read_seg(seg, volume.sop_instance_uids)

    np.testing.assert_array_equal(mask, study.mask)


def test_read_seg_not_a_segmentation(study: PhantomStudy) -> None:
    with pytest.raises(DatasetError, match="not a Segmentation"):
        read_seg(study.datasets[0], [str(study.datasets[0].SOPInstanceUID)])


def test_read_seg_duplicate_source_uids(build: Build, volume: Volume) -> None:
    with pytest.raises(ValueError, match="more than once"):
        read_seg(build(), [volume.sop_instance_uids[0]] * 2)


def test_read_seg_from_file_with_pydicom(build: Build, tmp_path: Path, volume: Volume) -> None:
    path = tmp_path / "seg.dcm"
    build().save_as(path, enforce_file_format=True)

    ds = dcmread(path)

    assert ds.pixel_array.shape == (ds.NumberOfFrames, 128, 128)
    assert read_seg(ds, volume.sop_instance_uids)[0].any()


def test_dciodvfy_harness_reports_errors(build: Build, tmp_path: Path) -> None:
    # The validator check is only worth something if it fails on a broken object.
    seg = build()
    del seg.SegmentSequence[0].SegmentLabel  # Type 1

    errors, _ = dciodvfy(write(seg, tmp_path / "broken.dcm"))

    assert any("SegmentLabel" in e for e in errors), errors

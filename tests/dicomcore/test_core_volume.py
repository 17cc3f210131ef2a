"""Volume assembly (dicomnode.dicom.volume.assemble_volume) and series selection."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicomnode.dicom.findings import derived_uid
from dicomnode.dicom.phantom import PhantomStudy, make_ct_study
from dicomnode.dicom.volume import (
    SeriesSummary,
    SlicePlane,
    Volume,
    assemble_volume,
    select_series,
    summarize_series,
)
from dicomnode.errors import InferenceError


def _copies(study: PhantomStudy) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in study.datasets]


def _stored_hu(study: PhantomStudy) -> np.ndarray:
    # What the phantom stores: HU quantised to 12-bit unsigned with intercept -1024.
    return (np.clip(np.round(study.hu + 1024.0), 0, 4095) - 1024.0).astype(np.float32)


# ----------------------------------------------------------------------------- construction


def test_construction(study: PhantomStudy) -> None:
    shuffled = list(study.datasets)
    random.Random(1).shuffle(shuffled)

    vol = assemble_volume(shuffled)

    assert vol.shape == (32, 128, 128)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, _stored_hu(study))
    assert vol.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in study.datasets)
    assert vol.spacing == (3.0, 1.5, 1.5)
    assert vol.origin == tuple(float(v) for v in study.datasets[0].ImagePositionPatient)
    assert vol.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert vol.normal == (0.0, 0.0, 1.0)
    assert vol.plane is SlicePlane.AXIAL
    assert vol.modality == "CT"
    assert vol.series_instance_uid == study.series_instance_uid
    assert vol.frame_of_reference_uid == str(study.datasets[0].FrameOfReferenceUID)


def test_construction_headers_in_volume_order_without_pixels(
    study: PhantomStudy, volume: Volume
) -> None:
    assert [h.SOPInstanceUID for h in volume.headers] == list(volume.sop_instance_uids)
    assert all("PixelData" not in h for h in volume.headers)
    assert (
        volume.headers[0].file_meta.TransferSyntaxUID
        == study.datasets[0].file_meta.TransferSyntaxUID
    )
    assert volume.headers[0].PatientID == study.datasets[0].PatientID
    assert "PixelData" in study.datasets[0]  # the input is not changed


def test_construction_array_is_read_only(volume: Volume) -> None:
    with pytest.raises(ValueError, match="read-only"):
        volume.array[0, 0, 0] = 1.0


def test_construction_affine_maps_indices_to_positions(volume: Volume) -> None:
    for k in (0, 5, 31):
        voxel = volume.affine @ np.array([k, 0, 0, 1.0])
        np.testing.assert_allclose(voxel[:3], volume.positions[k], atol=1e-6)
    corner = volume.affine @ np.array([0, 2, 3, 1.0])  # row 2, column 3
    np.testing.assert_allclose(corner[:3], volume.positions[0] + [3 * 1.5, 2 * 1.5, 0.0])


def test_construction_rescale_applied_per_slice(study: PhantomStudy) -> None:
    datasets = _copies(study)
    for k, ds in enumerate(datasets):
        ds.RescaleSlope = 2
        ds.RescaleIntercept = -2048 + k
    stored = np.stack([ds.pixel_array.astype(np.float32) for ds in study.datasets])

    vol = assemble_volume(datasets)

    expected = stored * 2 - 2048 + np.arange(32, dtype=np.float32)[:, None, None]
    np.testing.assert_array_equal(vol.array, expected)


def test_construction_without_rescale_keeps_stored_values(study: PhantomStudy) -> None:
    datasets = _copies(study)
    for ds in datasets:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType

    vol = assemble_volume(datasets)

    np.testing.assert_array_equal(vol.array, _stored_hu(study) + 1024.0)


def test_construction_exact_duplicates_deduplicated(study: PhantomStudy) -> None:
    datasets = [*study.datasets, study.datasets[4], copy.deepcopy(study.datasets[9])]

    vol = assemble_volume(datasets)

    assert vol.shape[0] == 32
    assert vol.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in study.datasets)


@pytest.mark.parametrize(
    "syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=["jpeg-ls", "j2k", "rle"]
)
def test_construction_compressed(study: PhantomStudy, volume: Volume, syntax: str) -> None:
    datasets = _copies(study)[:6]
    for ds in datasets:
        ds.compress(syntax)
    assert datasets[0].file_meta.TransferSyntaxUID == syntax

    vol = assemble_volume(datasets)

    np.testing.assert_array_equal(vol.array, volume.array[:6])


def test_construction_same_instance_in_two_transfer_syntaxes_deduplicated(
    study: PhantomStudy,
) -> None:
    datasets = _copies(study)
    recompressed = copy.deepcopy(study.datasets[3])
    recompressed.compress(JPEGLSLossless, generate_instance_uid=False)

    vol = assemble_volume([*datasets, recompressed])

    assert vol.shape[0] == 32


def test_construction_sagittal() -> None:
    # A sagittal stack: rows run anterior (+y), columns run inferior (-z), so the
    # normal is (0,1,0) x (0,0,-1) = (-1,0,0): positions ascend along -x.
    study = make_ct_study(seed=5, n_slices=12, rows=48, columns=40, n_lesions=0)
    datasets = _copies(study)
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [round(2.5 * k, 4), -30.0, 40.0]
        ds.PixelSpacing = [0.8, 0.9]
    random.Random(2).shuffle(datasets)

    vol = assemble_volume(datasets)

    assert vol.plane is SlicePlane.SAGITTAL
    assert vol.normal == (-1.0, 0.0, 0.0)
    assert vol.spacing == (2.5, 0.8, 0.9)
    assert vol.origin == (27.5, -30.0, 40.0)  # the largest x comes first along -x
    assert vol.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in reversed(study.datasets))
    assert vol.shape == (12, 48, 40)


def test_construction_single_slice_uses_slice_thickness(study: PhantomStudy) -> None:
    vol = assemble_volume(study.datasets[:1], min_slices=1)

    assert vol.spacing == (3.0, 1.5, 1.5)


# ------------------------------------------------- real-series quirks: made a volume, said so


def test_construction_duplicated_position_is_4d(study: PhantomStudy) -> None:
    other = copy.deepcopy(study.datasets[7])
    other.SOPInstanceUID = derived_uid("another", 7)
    other.InstanceNumber = 1000  # acquired after the first at that position
    other.PixelData = bytes(len(other.PixelData))

    vol = assemble_volume([*study.datasets, other])

    assert vol.shape == (32, 128, 128)  # the volume with a frame at every position
    assert str(other.SOPInstanceUID) not in vol.sop_instance_uids
    assert vol.plan.n_volumes == 2
    assert any("4D series: 2 volumes" in n for n in vol.notes)


def test_construction_4d_split_by_acquisition_order(study: PhantomStudy) -> None:
    # Two time points at the same 6 positions (fMRI-like), instance numbers interleaved.
    first = _copies(study)[:6]
    second = _copies(study)[:6]
    for k, (a, b) in enumerate(zip(first, second, strict=True)):
        a.InstanceNumber, b.InstanceNumber = 2 * k + 1, 2 * k + 2
        b.SOPInstanceUID = derived_uid("time point 2", k)
        b.TemporalPositionIdentifier = 2
        a.TemporalPositionIdentifier = 1

    vol = assemble_volume([*second, *first])

    assert vol.shape == (6, 128, 128)
    assert vol.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in first)


def test_construction_same_uid_twice_kept_once(study: PhantomStudy) -> None:
    changed = copy.deepcopy(study.datasets[7])
    changed.PixelData = bytes(len(changed.PixelData))

    vol = assemble_volume([*study.datasets, changed])

    assert vol.shape == (32, 128, 128)
    np.testing.assert_array_equal(vol.array, _stored_hu(study))


def test_construction_missing_slice_interpolated(study: PhantomStudy) -> None:
    datasets = [ds for k, ds in enumerate(study.datasets) if k != 12]

    vol = assemble_volume(datasets)

    assert vol.shape == (32, 128, 128) and not vol.aligned
    assert vol.spacing == (3.0, 1.5, 1.5)
    assert any("1 missing slice" in n for n in vol.notes)
    hu = _stored_hu(study)
    np.testing.assert_array_equal(vol.array[:12], hu[:12])
    np.testing.assert_array_equal(vol.array[13:], hu[13:])
    np.testing.assert_allclose(vol.array[12], (hu[11] + hu[13]) / 2, atol=1e-4)
    # results go back to the frames as sent: 31 frames, slot 12 skipped
    mask = np.zeros(vol.shape, np.uint8)
    mask[:, 5, 5] = np.arange(32) % 250 + 1
    on_frames = vol.mask_on_frames(mask)
    assert on_frames.shape == (31, 128, 128)
    assert [int(v) for v in on_frames[:, 5, 5]] == [k % 250 + 1 for k in range(32) if k != 12]
    np.testing.assert_array_equal(vol.grid_from_frames(on_frames)[13:], mask[13:])


def test_construction_mixed_orientation_uses_largest_stack(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a localizer slipped in

    vol = assemble_volume(datasets)

    assert str(datasets[5].SOPInstanceUID) not in vol.sop_instance_uids
    assert vol.shape[0] == 32  # slot 5 interpolated between its neighbours
    assert len(vol.frames) == 31
    assert any("mixes 2 orientations or pixel grids" in n for n in vol.notes)


@pytest.mark.parametrize(
    ("keyword", "value"), [("Columns", 64), ("PixelSpacing", [1.5, 1.6])], ids=["size", "spacing"]
)
def test_construction_mixed_grid_uses_largest_stack(
    study: PhantomStudy, keyword: str, value: object
) -> None:
    datasets = _copies(study)
    setattr(datasets[5], keyword, value)

    vol = assemble_volume(datasets)

    assert len(vol.frames) == 31
    assert any("mixes 2 orientations or pixel grids" in n for n in vol.notes)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_construction_instance_without_geometry_left_out(
    study: PhantomStudy, keyword: str
) -> None:
    datasets = _copies(study)
    delattr(datasets[3], keyword)

    vol = assemble_volume(datasets)

    assert len(vol.frames) == 31 and vol.shape[0] == 32
    assert any(f"instance 3: {keyword} is missing" in n for n in vol.notes)


def test_construction_no_instance_placeable(study: PhantomStudy) -> None:
    datasets = _copies(study)[:3]
    for ds in datasets:
        del ds.ImagePositionPatient

    with pytest.raises(InferenceError, match="no instance of the series can be placed"):
        assemble_volume(datasets)


def test_construction_without_frame_of_reference(study: PhantomStudy) -> None:
    datasets = _copies(study)
    for ds in datasets:
        del ds.FrameOfReferenceUID

    vol = assemble_volume(datasets)

    assert vol.aligned and vol.frame_of_reference_uid is None
    np.testing.assert_array_equal(vol.array, _stored_hu(study))
    assert any("no FrameOfReferenceUID" in n for n in vol.notes)


def test_construction_too_few_slices(study: PhantomStudy) -> None:
    with pytest.raises(InferenceError, match="3 slices, expected at least 10"):
        assemble_volume(study.datasets[:3], min_slices=10)


def test_construction_empty() -> None:
    with pytest.raises(InferenceError, match="no instances"):
        assemble_volume([])


def test_construction_mixed_series(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[0].SeriesInstanceUID = derived_uid("other series")

    with pytest.raises(InferenceError, match="do not share one SeriesInstanceUID"):
        assemble_volume(datasets)


def test_construction_scattered_positions_refused(study: PhantomStudy) -> None:
    datasets = [copy.deepcopy(study.datasets[k]) for k in (0, 1, 9, 10, 30)]

    with pytest.raises(InferenceError, match="too scattered"):
        assemble_volume(datasets)


def test_construction_sheared_stack_resampled(study: PhantomStudy) -> None:
    # Gantry tilt: each slice is shifted one row (1.5 mm) further in y than the last.
    datasets = _copies(study)
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.5 * k, z]

    vol = assemble_volume(datasets)

    assert not vol.aligned and vol.shape == (32, 128, 128)
    assert any("sheared stack" in n for n in vol.notes)
    hu = _stored_hu(study)
    # grid voxel (k, i, j) lies where source slice k has row i - k
    for k in (0, 5, 31):
        np.testing.assert_allclose(vol.array[k, k:], hu[k, : 128 - k], atol=1e-3)
    # a mask on the grid goes back onto every frame as sent
    mask = np.zeros(vol.shape, np.uint8)
    mask[10, 40:50, 60:70] = 1
    on_frames = vol.mask_on_frames(mask)
    assert on_frames[10, 30:40, 60:70].all() and on_frames[10].sum() == 100


def test_construction_multi_frame_legacy_converted(study: PhantomStudy) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    mf = LegacyConvertedEnhancedCTImage(
        legacy_datasets=_copies(study),
        series_instance_uid=derived_uid("mf series"),
        series_number=90,
        sop_instance_uid=derived_uid("mf"),
        instance_number=1,
    )

    vol = assemble_volume([mf])

    assert vol.aligned and vol.shape == (32, 128, 128)
    np.testing.assert_array_equal(vol.array, _stored_hu(study))
    assert vol.frame_refs[0].startswith(f"{mf.SOPInstanceUID}#")
    assert len(vol.headers) == 1


def test_construction_mosaic_refused(study: PhantomStudy) -> None:
    datasets = _copies(study)[:2]
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]

    with pytest.raises(InferenceError, match="MOSAIC"):
        assemble_volume(datasets)


def test_construction_malformed_number_of_frames_costs_the_instance(study: PhantomStudy) -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    datasets = _copies(study)
    # as a scanner wrote it: the value is only converted (and fails) when read
    datasets[4]._dict[Tag(0x00280008)] = RawDataElement(
        Tag(0x00280008), "IS", 2, b"1A", 0, False, True
    )

    vol = assemble_volume(datasets)

    assert len(vol.frames) == 31
    assert summarize_series(datasets).n_slices == 31


def test_construction_undecodable_pixels(study: PhantomStudy) -> None:
    datasets = _copies(study)[:4]
    for ds in datasets:
        ds.compress(JPEGLSLossless)
    # Valid encapsulation, but the fragment is no JPEG-LS codestream.
    datasets[2].PixelData = encapsulate([b"\x00" * 16])

    with pytest.raises(InferenceError, match="instance 2: pixel data in [0-9.]+ cannot be decoded"):
        assemble_volume(datasets)


def test_construction_messages_carry_no_patient_data(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[5].SeriesInstanceUID = derived_uid("other series")

    with pytest.raises(InferenceError) as info:
        assemble_volume(datasets)

    message = str(info.value)
    for value in (
        study.spec.patient_id,
        "Phantom",
        study.study_instance_uid,
        study.series_instance_uid,
    ):
        assert value not in message


def test_construction_invalid_min_slices(study: PhantomStudy) -> None:
    with pytest.raises(ValueError, match="min_slices"):
        assemble_volume(study.datasets, min_slices=0)


# ------------------------------------------------------------------------- series selection


@pytest.fixture(scope="module")
def candidates() -> dict[str, list[Dataset]]:
    """Four series of one study as header lists: CT 3 mm, CT 1 mm, MR 1 mm, CT coronal 0.5 mm."""
    uid = derived_uid("selection study")
    small = {"rows": 16, "columns": 16, "n_lesions": 0, "n_vessels": 0, "study_instance_uid": uid}
    ct3 = make_ct_study(series_number=2, n_slices=10, slice_thickness_mm=3.0, **small).datasets
    ct1 = make_ct_study(series_number=3, n_slices=30, slice_thickness_mm=1.0, **small).datasets
    mr1 = [
        copy.deepcopy(ds) for ds in make_ct_study(series_number=4, n_slices=30, **small).datasets
    ]
    for k, ds in enumerate(mr1):
        ds.Modality = "MR"
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
    cor = [
        copy.deepcopy(ds) for ds in make_ct_study(series_number=5, n_slices=40, **small).datasets
    ]
    for k, ds in enumerate(cor):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0.0, 0.5 * k, 0.0]
    return {"ct3": ct3, "ct1": ct1, "mr1": mr1, "cor": cor}


def test_select_series(candidates: dict[str, list[Dataset]]) -> None:
    order = [candidates[k] for k in ("mr1", "ct3", "cor", "ct1")]

    chosen = select_series(order, modality="CT", plane="AXIAL")

    assert chosen is candidates["ct1"]


def test_select_series_from_summaries(candidates: dict[str, list[Dataset]]) -> None:
    summaries = [summarize_series(candidates[k]) for k in ("ct3", "ct1", "mr1", "cor")]

    chosen = select_series(summaries, modality="CT", plane=None)

    assert chosen is summaries[3]  # the coronal 0.5 mm stack is thinnest when any plane goes
    assert chosen.plane is SlicePlane.CORONAL
    assert chosen.slice_spacing_mm == pytest.approx(0.5)


def test_select_series_summary(candidates: dict[str, list[Dataset]]) -> None:
    summary = summarize_series(candidates["ct1"])

    assert summary == SeriesSummary(
        series_instance_uid=str(candidates["ct1"][0].SeriesInstanceUID),
        modality="CT",
        n_instances=30,
        plane=SlicePlane.AXIAL,
        slice_spacing_mm=1.0,
        series_number=3,
        series_description="AXIAL 3MM",
        multi_frame=False,
        n_slices=30,
        volume_note="",
        sop_class_uid=str(candidates["ct1"][0].SOPClassUID),
        body_part="CHEST",
    )


def test_select_series_filters(candidates: dict[str, list[Dataset]]) -> None:
    order = [candidates[k] for k in ("ct3", "ct1", "mr1")]

    assert select_series(order, modality="MR") is candidates["mr1"]
    assert select_series(order, max_slice_spacing_mm=2.0) is candidates["ct1"]


def test_select_series_tie_break_is_deterministic(candidates: dict[str, list[Dataset]]) -> None:
    twin = [copy.deepcopy(ds) for ds in candidates["ct1"]]
    twin_uid = derived_uid("twin series")
    for ds in twin:
        ds.SeriesNumber = 9
        ds.SeriesInstanceUID = twin_uid

    assert select_series([twin, candidates["ct1"]]) is candidates["ct1"]
    assert select_series([candidates["ct1"], twin]) is candidates["ct1"]


def test_select_series_no_match(candidates: dict[str, list[Dataset]]) -> None:
    order = [candidates[k] for k in ("ct3", "mr1", "cor")]

    with pytest.raises(InferenceError, match=r"no series matches among 3") as info:
        select_series(order, modality="CT", plane="AXIAL", min_slices=20)

    message = str(info.value)
    assert "0: 10 slices, expected at least 20" in message
    assert "1: modality MR, expected CT" in message
    assert "2: plane CORONAL, expected AXIAL" in message
    assert "AXIAL 3MM" not in message  # descriptions are not echoed


def test_select_series_description_pattern(candidates: dict[str, list[Dataset]]) -> None:
    with pytest.raises(InferenceError, match="SeriesDescription does not match"):
        select_series([candidates["ct1"]], description_pattern=r"^SOFT TISSUE")


def test_select_series_invalid_plane(candidates: dict[str, list[Dataset]]) -> None:
    with pytest.raises(ValueError, match="TRANSVERSE"):
        select_series([candidates["ct1"]], plane="TRANSVERSE")

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


# ------------------------------------------------------------------------------- rejections


def test_construction_duplicated_position_different_pixels(study: PhantomStudy) -> None:
    other = copy.deepcopy(study.datasets[7])
    other.SOPInstanceUID = derived_uid("another", 7)
    other.PixelData = bytes(len(other.PixelData))

    with pytest.raises(InferenceError, match="same position"):
        assemble_volume([*study.datasets, other])


def test_construction_same_uid_different_pixels(study: PhantomStudy) -> None:
    changed = copy.deepcopy(study.datasets[7])
    changed.PixelData = bytes(len(changed.PixelData))

    with pytest.raises(InferenceError, match="same SOPInstanceUID but different pixel data"):
        assemble_volume([*study.datasets, changed])


def test_construction_missing_slice(study: PhantomStudy) -> None:
    datasets = [ds for k, ds in enumerate(study.datasets) if k != 12]

    with pytest.raises(InferenceError, match="not uniform.*missing slice"):
        assemble_volume(datasets)


def test_construction_mixed_orientation(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    with pytest.raises(InferenceError, match="mixes orientations"):
        assemble_volume(datasets)


def test_construction_mixed_rows_columns(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[5].Columns = 64

    with pytest.raises(InferenceError, match="image sizes"):
        assemble_volume(datasets)


def test_construction_mixed_pixel_spacing(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[5].PixelSpacing = [1.5, 1.6]

    with pytest.raises(InferenceError, match="pixel spacings"):
        assemble_volume(datasets)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_construction_missing_geometry(study: PhantomStudy, keyword: str) -> None:
    datasets = _copies(study)
    delattr(datasets[3], keyword)

    with pytest.raises(InferenceError, match=f"{keyword} is missing"):
        assemble_volume(datasets)


def test_construction_too_few_slices(study: PhantomStudy) -> None:
    with pytest.raises(InferenceError, match="3 slices, expected at least 10"):
        assemble_volume(study.datasets[:3], min_slices=10)


def test_construction_empty() -> None:
    with pytest.raises(InferenceError, match="no instances"):
        assemble_volume([])


def test_construction_mixed_series(study: PhantomStudy) -> None:
    datasets = _copies(study)
    datasets[0].SeriesInstanceUID = derived_uid("other series")

    with pytest.raises(InferenceError, match="mixes 2 different series"):
        assemble_volume(datasets)


def test_construction_sheared_stack(study: PhantomStudy) -> None:
    # Gantry tilt: each slice shifts in y as it moves in z.
    datasets = _copies(study)
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + 0.5 * k, 4), z]

    with pytest.raises(InferenceError, match="sheared stack"):
        assemble_volume(datasets)


def test_construction_multi_frame(study: PhantomStudy) -> None:
    enhanced = copy.deepcopy(study.datasets[0])
    enhanced.NumberOfFrames = 2
    enhanced.PixelData = enhanced.PixelData * 2

    with pytest.raises(InferenceError, match="multi-frame object .* not supported"):
        assemble_volume([enhanced])


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
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

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
    assert "0: 10 instances, expected at least 20" in message
    assert "1: modality MR, expected CT" in message
    assert "2: plane CORONAL, expected AXIAL" in message
    assert "AXIAL 3MM" not in message  # descriptions are not echoed


def test_select_series_description_pattern(candidates: dict[str, list[Dataset]]) -> None:
    with pytest.raises(InferenceError, match="SeriesDescription does not match"):
        select_series([candidates["ct1"]], description_pattern=r"^SOFT TISSUE")


def test_select_series_invalid_plane(candidates: dict[str, list[Dataset]]) -> None:
    with pytest.raises(ValueError, match="TRANSVERSE"):
        select_series([candidates["ct1"]], plane="TRANSVERSE")

"""Per-finding TID 1411 groups of the Measurement Report (IHE AI Results style): one group
per lesion of a three-lesion phantom, checked by dciodvfy, dcmqi's tid1500reader and
highdicom against the phantom's ground truth."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from coretools import ALGORITHM, DEVICE, LESION, assert_valid

from dicomnode.dicom.findings import ComponentFinding, Finding, derived_uid
from dicomnode.dicom.phantom import Lesion, PhantomStudy, make_ct_study
from dicomnode.dicom.seg import build_seg
from dicomnode.dicom.sr import CENTER_OF_MASS, build_measurement_report
from dicomnode.inference.postprocess import find_components, long_and_short_axis

TID1500READER = Path(sys.executable).with_name("tid1500reader")
WHEN = dt.datetime(2026, 3, 1, 12, 31, 0)
SPACING = (3.0, 1.5, 1.5)
LESIONS = (
    Lesion((8, 50, 45), (9.0, 10.0, 8.0)),
    Lesion((18, 80, 70), (12.0, 8.0, 9.0)),
    Lesion((22, 45, 85), (7.0, 7.0, 7.0)),
)


@pytest.fixture(scope="module")
def three() -> PhantomStudy:
    # no noise or distractors: the lesion mask is the ground truth exactly
    return make_ct_study(seed=11, lesions=LESIONS, n_vessels=0, noise_hu=0.0)


def _patient(study: PhantomStudy, zyx) -> np.ndarray:
    ipp = np.array(study.datasets[0].ImagePositionPatient, float)
    z, y, x = zyx
    return ipp + np.array([x * SPACING[2], y * SPACING[1], z * SPACING[0]])


@pytest.fixture(scope="module")
def built(three: PhantomStudy):
    mask, found = find_components(three.mask, three.hu, SPACING, {1: "Lesion"})
    seg = build_seg(three.datasets, mask, [LESION], ALGORITHM, device=DEVICE,
                    series_instance_uid=derived_uid("t", "seg series"),
                    sop_instance_uid=derived_uid("t", "seg"), series_number=901,
                    content_datetime=WHEN)
    components = []
    for f in found:
        z, y, x = f.centroid_voxel
        components.append(ComponentFinding(
            label_number=1, tracking_identifier=f"Lesion {f.index}",
            tracking_uid=derived_uid("t", "finding", f.index), volume_mm3=f.volume_mm3,
            centroid_mm=tuple(_patient(three, f.centroid_voxel)),
            frames=tuple(range(f.bbox[0], f.bbox[3])), centroid_frame=int(round(z)),
            centroid_pixel=(x + 0.5, y + 0.5), max_diameter_mm=f.max_diameter_mm,
            long_axis_mm=f.max_axial_diameter_mm, short_axis_mm=f.short_axis_mm,
            mean_intensity=f.mean_value))
    total = Finding(1, "Lesion", sum(f.volume_mm3 for f in found),
                    max(f.max_diameter_mm for f in found), 110.0)
    sr = build_measurement_report(three.datasets, seg, [total], ALGORITHM, device=DEVICE,
                                  components=components,
                                  series_instance_uid=derived_uid("t", "sr series"),
                                  sop_instance_uid=derived_uid("t", "sr"), series_number=902,
                                  content_datetime=WHEN)
    return seg, sr, components


def _ground_truth(lesion: Lesion) -> float:
    return 4 / 3 * np.pi * float(np.prod(lesion.radii_mm))


def _nearest(three: PhantomStudy, centroid_mm) -> Lesion:
    return min(LESIONS, key=lambda les: np.linalg.norm(_patient(three, les.center) - centroid_mm))


def test_three_lesions_give_three_groups_read_by_tid1500reader(
        built, three: PhantomStudy, tmp_path: Path) -> None:
    _, sr, _ = built
    assert_valid(sr, tmp_path / "sr.dcm")  # dciodvfy: no error, no warning
    out = tmp_path / "sr.json"
    proc = subprocess.run([str(TID1500READER), "--inputDICOM", str(tmp_path / "sr.dcm"),
                           "--outputMetadata", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(out.read_text())["Measurements"]
    assert [g["TrackingIdentifier"] for g in groups] == [
        "Lesion", "Lesion 1", "Lesion 2", "Lesion 3"]
    assert len({g["TrackingUniqueIdentifier"] for g in groups}) == 4
    assert {g["ReferencedSegment"] for g in groups} == {1}
    assert {g["segmentationSOPInstanceUID"] for g in groups} == {derived_uid("t", "seg")}
    seen = set()
    for g in groups[1:]:
        items = {m["quantity"]["CodeMeaning"]: float(m["value"]) for m in g["measurementItems"]}
        assert set(items) == {"Volume", "Diameter", "Long axis", "Short axis",
                              "Attenuation Coefficient"}
        # which lesion: the one whose ground-truth volume is nearest
        lesion = min(LESIONS, key=lambda les: abs(_ground_truth(les) - items["Volume"]))
        seen.add(lesion)
        assert items["Volume"] == pytest.approx(_ground_truth(lesion), rel=0.10)
        in_plane = 2 * max(lesion.radii_mm[1:])
        assert items["Long axis"] == pytest.approx(in_plane, abs=2 * SPACING[1])
        assert items["Short axis"] == pytest.approx(2 * min(lesion.radii_mm[1:]),
                                                    abs=2 * SPACING[1])
        assert items["Short axis"] <= items["Long axis"] <= items["Diameter"] + 1e-9
        assert items["Attenuation Coefficient"] == pytest.approx(110.0, abs=1.0)
    assert seen == set(LESIONS)
    # highdicom reads the same groups back (the location items do not get in its way)
    read = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    assert [(g.tracking_identifier, g.tracking_uid) for g in read] == [
        (g["TrackingIdentifier"], g["TrackingUniqueIdentifier"]) for g in groups]
    assert [len(g.get_measurements()) for g in read] == [3, 5, 5, 5]
    total = next(m for m in groups[0]["measurementItems"]
                 if m["quantity"]["CodeMeaning"] == "Volume")
    assert float(total["value"]) == pytest.approx(
        sum(float(m["value"]) for g in groups[1:] for m in g["measurementItems"]
            if m["quantity"]["CodeMeaning"] == "Volume"))


def _groups(sr) -> list:
    [imaging] = [i for i in sr.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(imaging.ContentSequence)


def _named(group, meaning: str) -> list:
    return [i for i in group.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_each_group_locates_its_lesion_and_references_its_region(
        built, three: PhantomStudy) -> None:
    seg, sr, components = built
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(three.datasets)}
    for group, comp in zip(_groups(sr)[1:], components, strict=True):
        lesion = _nearest(three, comp.centroid_mm)
        truth_mm = _patient(three, lesion.center)
        [point3d] = [i for i in _named(group, CENTER_OF_MASS.meaning) if i.ValueType == "SCOORD3D"]
        assert point3d.GraphicType == "POINT"
        assert point3d.ReferencedFrameOfReferenceUID == three.datasets[0].FrameOfReferenceUID
        assert np.linalg.norm(np.array(point3d.GraphicData, float) - truth_mm) < 1.0
        [point] = [i for i in _named(group, CENTER_OF_MASS.meaning) if i.ValueType == "SCOORD"]
        [image] = point.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        slice_k = by_uid[image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        assert slice_k == int(round(lesion.center[0]))
        col, row = point.GraphicData
        assert abs(col - 0.5 - lesion.center[2]) < 1.0 and abs(row - 0.5 - lesion.center[1]) < 1.0
        # the region: the lesion's segment on exactly the slices the lesion lies in
        [segment] = _named(group, "Referenced Segment")
        ref = segment.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSegmentNumber == 1
        sources = sorted(by_uid[i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
                         for i in _named(group, "Source Image for Segmentation"))
        zz, yy, xx = np.indices(three.mask.shape)
        own = (((zz - lesion.center[0]) * SPACING[0] / lesion.radii_mm[0]) ** 2
                  + ((yy - lesion.center[1]) * SPACING[1] / lesion.radii_mm[1]) ** 2
                  + ((xx - lesion.center[2]) * SPACING[2] / lesion.radii_mm[2]) ** 2) <= 1
        assert sources == sorted(np.flatnonzero(own.any(axis=(1, 2))).tolist())
        [uid] = _named(group, "Tracking Unique Identifier")
        assert uid.UID == comp.tracking_uid


def test_components_are_checked(built, three: PhantomStudy) -> None:
    seg, _, components = built
    base = components[0]

    def report(*comps):
        return build_measurement_report(three.datasets, seg, [], ALGORITHM, device=DEVICE,
                                        components=comps,
                                        series_instance_uid=derived_uid("t", "x series"),
                                        sop_instance_uid=derived_uid("t", "x"),
                                        series_number=903)

    with pytest.raises(ValueError, match="tracking_uid is used by another"):
        report(base, components[1].__class__(**{**base.__dict__,
                                                "tracking_identifier": "Lesion 9"}))
    with pytest.raises(ValueError, match="segments \\[1\\]"):
        report(ComponentFinding(**{**base.__dict__, "label_number": 2}))
    with pytest.raises(ValueError, match="beyond the 32 source frames"):
        report(ComponentFinding(**{**base.__dict__, "frames": (3, 32)}))
    with pytest.raises(ValueError, match="tracking_uid is not a valid UID"):
        ComponentFinding(**{**base.__dict__, "tracking_uid": "1.02.x"})


def test_long_and_short_axis_of_an_ellipse() -> None:
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    # rotated by 30 degrees: the axes do not depend on the pixel grid
    a, b, phi = 12.0, 5.0, np.pi / 6
    pts = np.stack([a * np.cos(t), b * np.sin(t)], axis=1) @ np.array(
        [[np.cos(phi), np.sin(phi)], [-np.sin(phi), np.cos(phi)]])
    long_axis, short_axis = long_and_short_axis(pts)
    assert long_axis == pytest.approx(2 * a, rel=1e-4)
    assert short_axis == pytest.approx(2 * b, rel=1e-3)
    assert long_and_short_axis(np.array([[1.0, 1.0]])) == (0.0, 0.0)


def test_multi_frame_source(built, three: PhantomStudy, tmp_path: Path) -> None:
    """One enhanced (multi-frame) source: the region and the location name its frames."""
    import copy

    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    _, _, components = built
    mf = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[copy.deepcopy(ds) for ds in three.datasets],
        series_instance_uid=derived_uid("t", "mf series"), series_number=90,
        sop_instance_uid=derived_uid("t", "mf"), instance_number=1)
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in mf.PerFrameFunctionalGroupsSequence]
    # mask slice k lies on the frame at z = 3 k (highdicom orders the frames its own way)
    numbers = [positions.index(k * SPACING[0]) + 1 for k in range(len(three.datasets))]
    seg = build_seg([mf], three.mask, [LESION], ALGORITHM, device=DEVICE,
                    series_instance_uid=derived_uid("t", "mf seg series"),
                    sop_instance_uid=derived_uid("t", "mf seg"), series_number=901,
                    content_datetime=WHEN, frame_numbers=numbers)
    sr = build_measurement_report([mf], seg, [], ALGORITHM, device=DEVICE,
                                  components=components, frame_numbers=numbers,
                                  series_instance_uid=derived_uid("t", "mf sr series"),
                                  sop_instance_uid=derived_uid("t", "mf sr"), series_number=902,
                                  content_datetime=WHEN)
    back = assert_valid(sr, tmp_path / "mf-sr.dcm")
    for group, comp in zip(_groups(back), components, strict=True):
        [source] = _named(group, "Source Image for Segmentation")
        ref = source.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        assert [int(f) for f in ref.ReferencedFrameNumber] == [numbers[k] for k in comp.frames]
        [point] = [i for i in _named(group, CENTER_OF_MASS.meaning) if i.ValueType == "SCOORD"]
        assert point.PixelOriginInterpretation == "FRAME"
        [image] = point.ContentSequence
        frame = int(image.ReferencedSOPSequence[0].ReferencedFrameNumber)
        assert frame == numbers[comp.centroid_frame]

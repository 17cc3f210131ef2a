"""TID 1500 Measurement Report building (dicomnode.dicom.sr)."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from coretools import ALGORITHM, DEVICE, LESION, ORGAN, VESSEL, assert_valid, write_and_read
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.dicom.findings import Finding, InstanceReference, derived_uid
from dicomnode.dicom.phantom import PhantomStudy
from dicomnode.dicom.seg import build_seg
from dicomnode.dicom.sr import ABSENT, PRESENT, QUALITATIVE_EVALUATIONS, build_measurement_report
from dicomnode.dicom.volume import Volume

WHEN = dt.datetime(2026, 3, 1, 12, 31, 0)
SR_SERIES_UID = derived_uid("test", "sr series")
SR_UID = derived_uid("test", "sr instance")
SEG_UID = derived_uid("test", "seg for sr")

LESION_FINDING = Finding(
    label_number=1,
    label="Lesion",
    volume_mm3=1234.5,
    max_diameter_mm=18.25,
    mean_intensity=109.75,
    centroid_mm=(1.0, -2.0, 40.5),
)
VESSEL_FINDING = Finding(label_number=2, label="Vessel", volume_mm3=88.0, max_diameter_mm=40.0)

Report = Callable[..., hd.sr.Comprehensive3DSR]


@pytest.fixture(scope="module")
def seg(volume: Volume, study: PhantomStudy) -> hd.seg.Segmentation:
    labels = (study.mask + 2 * study.vessel_mask * (study.mask == 0)).astype(np.uint8)
    return build_seg(
        volume.headers,
        labels,
        [LESION, VESSEL, ORGAN],
        ALGORITHM,
        device=DEVICE,
        series_instance_uid=derived_uid("test", "seg series for sr"),
        sop_instance_uid=SEG_UID,
        series_number=901,
        content_datetime=WHEN,
    )


@pytest.fixture
def report(volume: Volume, seg: hd.seg.Segmentation) -> Report:
    """``report(findings, **overrides)`` with the test defaults."""

    def factory(findings: Any = (LESION_FINDING, VESSEL_FINDING), **kw: Any) -> Any:
        args: dict[str, Any] = {
            "device": DEVICE,
            "series_instance_uid": SR_SERIES_UID,
            "sop_instance_uid": SR_UID,
            "series_number": 902,
            "content_datetime": WHEN,
        }
        args.update(kw)
        source = args.pop("source_datasets", volume.headers)
        segmentation = args.pop("segmentation", seg)
        return build_measurement_report(source, segmentation, list(findings), ALGORITHM, **args)

    return factory


def _read(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(ds)


def _measurement(group: Any, code: Any) -> hd.sr.Measurement:
    (found,) = group.get_measurements(name=code)
    return found


def _qualitative(ds: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    root = ds.ContentSequence
    (container,) = [
        item
        for item in root
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value
    ]
    out = {}
    for item in container.ContentSequence:
        name, value = item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]
        out[(name.CodingSchemeDesignator, name.CodeValue)] = (
            value.CodingSchemeDesignator,
            value.CodeValue,
        )
    return out


# ----------------------------------------------------------------------------- construction


def test_construction(report: Report, study: PhantomStudy, tmp_path: Path) -> None:
    ds = assert_valid(report(), tmp_path / "sr.dcm")

    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.Modality == "SR"
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (SR_SERIES_UID, SR_UID)
    assert ds.SeriesNumber == 902
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.PatientID == study.spec.patient_id
    assert ds.SeriesDescription == "lesionnet 1.2.0 SR"
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")


def test_construction_measurements_read_back(report: Report, tmp_path: Path) -> None:
    sr = _read(write_and_read(report(), tmp_path / "sr.dcm"))

    groups = sr.content.get_volumetric_roi_measurement_groups()

    assert [g.tracking_identifier for g in groups] == ["Lesion", "Vessel"]
    lesion, vessel = groups
    volume = _measurement(lesion, codes.SCT.Volume)
    assert (volume.value, volume.unit.value, volume.unit.scheme_designator) == (
        1234.5,
        "mm3",
        "UCUM",
    )
    diameter = _measurement(lesion, hd.sr.CodedConcept("81827009", "SCT", "Diameter"))
    assert (diameter.value, diameter.unit.value) == (18.25, "mm")
    assert diameter.derivation == codes.SCT.Maximum
    mean = _measurement(lesion, hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient"))
    assert (mean.value, mean.unit.value) == (109.75, "[hnsf'U]")
    assert mean.derivation == codes.SCT.Mean
    assert _measurement(vessel, codes.SCT.Volume).value == 88.0
    assert len(vessel.get_measurements()) == 2  # no mean intensity given
    assert lesion.finding_type == hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
    assert lesion.finding_category == hd.sr.CodedConcept(
        "49755003", "SCT", "Morphologically Abnormal Structure"
    )


def test_construction_references_seg_and_source_series(
    report: Report, seg: hd.seg.Segmentation, volume: Volume, tmp_path: Path
) -> None:
    ds = write_and_read(report(), tmp_path / "sr.dcm")
    lesion, vessel = _read(ds).content.get_volumetric_roi_measurement_groups()

    for group, number in ((lesion, 1), (vessel, 2)):
        ref = group.referenced_segment
        assert (ref.referenced_sop_class_uid, ref.referenced_sop_instance_uid) == (
            seg.SOPClassUID,
            SEG_UID,
        )
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == volume.series_instance_uid
    # The group tracks the SEG segment it measures (same Tracking UID).
    assert lesion.tracking_uid == seg.SegmentSequence[0].TrackingUID
    evidence = {
        str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence}
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    }
    assert evidence[volume.series_instance_uid] == set(volume.sop_instance_uids)
    assert evidence[str(seg.SeriesInstanceUID)] == {SEG_UID}


def test_construction_provenance(report: Report, tmp_path: Path) -> None:
    sr = _read(write_and_read(report(), tmp_path / "sr.dcm"))

    device = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)[0]
    attributes = device.observer_identifying_attributes
    assert attributes.uid == DEVICE.device_observer_uid
    assert (attributes.name, attributes.manufacturer_name, attributes.model_name) == (
        "dicomnode",
        "dicomnode project",
        "dicomnode",
    )
    assert attributes.serial_number == "node-test-1"
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    # highdicom 0.28 has no accessor for a group's Algorithm Identification (TID 4019).
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: getattr(item, "TextValue", None)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "lesionnet"
    assert texts["Algorithm Version"] == "1.2.0"


def test_construction_qualitative_summary(report: Report, tmp_path: Path) -> None:
    ds = write_and_read(report(), tmp_path / "sr.dcm")

    summary = _qualitative(ds)

    assert summary == {
        ("SCT", "108369006"): (PRESENT.scheme_designator, PRESENT.value),  # Neoplasm
        ("SCT", "59820001"): (PRESENT.scheme_designator, PRESENT.value),  # Blood vessel
        ("SCT", "10200004"): (ABSENT.scheme_designator, ABSENT.value),  # Liver: no finding
    }


def test_construction_no_findings(report: Report, tmp_path: Path) -> None:
    ds = assert_valid(report(findings=()), tmp_path / "sr.dcm")

    assert set(_qualitative(ds).values()) == {(ABSENT.scheme_designator, ABSENT.value)}
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in ds.ContentSequence]
    assert "126010" not in names  # no Imaging Measurements container
    assert _read(ds).content.get_volumetric_roi_measurement_groups() == []


def test_construction_zero_volume_finding_is_absent(report: Report, tmp_path: Path) -> None:
    empty = Finding(label_number=1, label="Lesion", volume_mm3=0.0)

    ds = assert_valid(report(findings=(empty,)), tmp_path / "sr.dcm")

    assert _qualitative(ds)[("SCT", "108369006")] == (ABSENT.scheme_designator, ABSENT.value)


def test_construction_supersedes(report: Report, study: PhantomStudy, tmp_path: Path) -> None:
    old = InstanceReference(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=derived_uid("test", "old sr series"),
        sop_class_uid=Comprehensive3DSRStorage,
        sop_instance_uid=derived_uid("test", "old sr"),
    )

    ds = assert_valid(report(supersedes=old), tmp_path / "sr.dcm")

    (study_item,) = ds.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study.study_instance_uid
    (series,) = study_item.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.series_instance_uid
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        Comprehensive3DSRStorage,
        old.sop_instance_uid,
    )
    purpose = sop.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue, purpose.CodeMeaning) == (
        "DCM",
        "121360",
        "Replaced report",
    )


def test_construction_deterministic(report: Report, tmp_path: Path) -> None:
    write_and_read(report(), tmp_path / "a.dcm")
    write_and_read(report(), tmp_path / "b.dcm")

    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_construction_procedure_reported(report: Report) -> None:
    sr = report(procedure_reported=("SCT", "363679005", "Imaging procedure"))

    (item,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert item.ConceptCodeSequence[0].CodeValue == "363679005"


# ---------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"findings": (Finding(4, "Nothing", 1.0),)},
            r"label_number is 4, but the segmentation has segments \[1, 2, 3\]",
        ),
        ({"findings": (LESION_FINDING, LESION_FINDING)}, "both refer to segment 1"),
        ({"findings": ("lesion",)}, r"findings\[0\] is a str, expected Finding"),
        ({"sop_instance_uid": "1..2"}, "sop_instance_uid is not a valid UID"),
        ({"series_number": -1}, "series_number must be an int"),
        ({"source_datasets": []}, "source_datasets is empty"),
        ({"segmentation": Dataset()}, "segmentation is not a Segmentation"),
        ({"series_description": "x" * 70}, "series_description has 70 characters"),
    ],
)
def test_construction_invalid(report: Report, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        report(**overrides)


def test_construction_mean_intensity_needs_ct(report: Report, volume: Volume) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        h.Modality = "MR"

    with pytest.raises(
        ValueError, match="mean_intensity is set, but the source Modality is not CT"
    ):
        report(source_datasets=headers)


def test_construction_seg_of_other_series(report: Report, volume: Volume) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        h.SeriesInstanceUID = derived_uid("test", "another series")

    with pytest.raises(ValueError, match="does not reference the series of source_datasets"):
        report(source_datasets=headers)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"label_number": 0}, "label_number must be an int in 1..65535"),
        ({"volume_mm3": -1.0}, "volume_mm3 must be >= 0"),
        ({"volume_mm3": float("nan")}, "volume_mm3 must be a finite number"),
        ({"max_diameter_mm": float("inf")}, "max_diameter_mm must be a finite number"),
        ({"label": "a\\b"}, "label contains a backslash"),
        ({"centroid_mm": (1.0, 2.0)}, "centroid_mm must have 3 values"),
    ],
)
def test_finding_invalid(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"label_number": 1, "label": "Lesion", "volume_mm3": 1.0}

    with pytest.raises(ValueError, match=message):
        Finding(**{**base, **fields})


def test_finding_accepts_numpy_scalars() -> None:
    finding = Finding(np.int64(2), "Lesion", np.float32(12.5), mean_intensity=np.float64(3.0))

    assert finding.label_number == 2 and type(finding.label_number) is int
    assert finding.volume_mm3 == 12.5 and type(finding.volume_mm3) is float


# The Basic Profile (PS3.15 E.1-1) empties Study ID; dciodvfy then warns that a
# DICOMDIR could not be built from the object. That comes from the source headers,
# not from the builders, so it is allowed here and only here.
DEIDENTIFIED_WARNINGS = ("needed to build DICOMDIR - Study ID",)


def test_construction_deidentified_sources(
    volume: Volume, study: PhantomStudy, tmp_path: Path
) -> None:
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        for keyword in (
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
        ):
            setattr(h, keyword, "")
    uids = {
        "series_instance_uid": derived_uid("deid", "seg"),
        "sop_instance_uid": derived_uid("deid", "seg", 1),
    }
    seg = build_seg(
        headers, study.mask, [LESION], ALGORITHM, device=DEVICE, series_number=1, **uids
    )
    sr = build_measurement_report(
        headers,
        seg,
        [LESION_FINDING],
        ALGORITHM,
        device=DEVICE,
        series_instance_uid=derived_uid("deid", "sr"),
        sop_instance_uid=derived_uid("deid", "sr", 1),
        series_number=2,
    )

    seg_ds = assert_valid(seg, tmp_path / "seg.dcm", allowed=DEIDENTIFIED_WARNINGS)
    sr_ds = assert_valid(sr, tmp_path / "sr.dcm", allowed=DEIDENTIFIED_WARNINGS)

    for ds in (seg_ds, sr_ds):
        assert (ds.PatientName, ds.PatientBirthDate, ds.PatientSex, ds.StudyID) == ("", "", "", "")
        assert ds.PatientID == study.spec.patient_id

"""The classification report (TID 1500, one TID 1501 group per image and label): valid for
dciodvfy, read back by dcmqi's tid1500reader and by highdicom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pytest
from coretools import ALGORITHM, DEVICE, assert_valid

from dicomnode.dicom.classification import PROBABILITY, ClassifiedLabel, build_classification_report
from dicomnode.dicom.findings import InstanceReference
from dicomnode.dicom.radiograph import make_chest_radiograph

TID1500READER = Path(sys.executable).with_name("tid1500reader")
NODULE = (("SCT", "786838002", "Pulmonary nodule"), ("SCT", "404684003", "Clinical finding"))
EFFUSION = (("SCT", "60046008", "Pleural effusion"), ("SCT", "404684003", "Clinical finding"))


def _report(images, labels, **kw):
    return build_classification_report(
        images, labels, ALGORITHM, device=DEVICE,
        series_instance_uid="1.2.826.0.1.3680043.10.511.9.1",
        sop_instance_uid="1.2.826.0.1.3680043.10.511.9.2", series_number=9002, **kw)


def test_one_group_per_image_and_label_read_by_dcmqi(tmp_path: Path) -> None:
    a = make_chest_radiograph(seed=19001, nodule=True).dataset
    b = make_chest_radiograph(seed=19002, nodule=False, view_position="AP").dataset
    b.StudyInstanceUID = a.StudyInstanceUID
    labels = [ClassifiedLabel(0, "Nodule", *NODULE, probability=0.91, threshold=0.5),
              ClassifiedLabel(0, "Effusion", *EFFUSION, probability=0.12, threshold=0.4),
              ClassifiedLabel(1, "Nodule", *NODULE, probability=0.08, threshold=0.5)]
    sr = assert_valid(_report([a, b], labels), tmp_path / "sr.dcm")
    out = tmp_path / "sr.json"
    proc = subprocess.run([str(TID1500READER), "--inputDICOM", str(tmp_path / "sr.dcm"),
                           "--outputMetadata", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(out.read_text())["Measurements"]
    assert [g["TrackingIdentifier"] for g in groups] == [
        "Nodule (image 1)", "Effusion (image 1)", "Nodule (image 2)"]
    assert len({g["TrackingUniqueIdentifier"] for g in groups}) == 3
    probs = [float(g["measurementItems"][0]["value"]) for g in groups]
    assert probs == pytest.approx([0.91, 0.12, 0.08])
    assert all(g["measurementItems"][0]["quantity"]["CodeValue"] == PROBABILITY.value
               for g in groups)
    # present / absent at the threshold, as highdicom reads the groups
    parsed = hd.sr.srread(tmp_path / "sr.dcm")
    evaluated = []
    for group in parsed.content.get_image_measurement_groups():
        [ev] = [e for e in group.get_qualitative_evaluations()
                if e.name.value == group.finding_type.value]
        evaluated.append(ev.value.meaning)
        [ref] = group.source_images  # the group names the image it is about
        assert ref.referenced_sop_instance_uid in (a.SOPInstanceUID, b.SOPInstanceUID)
    assert evaluated == ["Present", "Absent", "Absent"]
    assert {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for e in s.ReferencedSeriesSequence} == {a.SOPInstanceUID, b.SOPInstanceUID}


def test_rebuilding_gives_the_same_tracking_uids_and_a_successor_references_its_predecessor(
        tmp_path: Path) -> None:
    a = make_chest_radiograph(seed=19003).dataset
    lb = [ClassifiedLabel(0, "Nodule", *NODULE, probability=0.7, threshold=0.5)]
    first, again = _report([a], lb), _report([a], lb)

    def uids(sr):
        return [g.tracking_uid for g in sr.content.get_image_measurement_groups()]

    assert uids(hd.sr.Comprehensive3DSR.from_dataset(first)) == \
        uids(hd.sr.Comprehensive3DSR.from_dataset(again))
    prev = InstanceReference(str(a.StudyInstanceUID), str(first.SeriesInstanceUID),
                             str(first.SOPClassUID), str(first.SOPInstanceUID))
    successor = build_classification_report(
        [a], lb, ALGORITHM, device=DEVICE, series_instance_uid=str(first.SeriesInstanceUID),
        sop_instance_uid="1.2.826.0.1.3680043.10.511.9.3", series_number=9002, supersedes=prev)
    ds = assert_valid(successor, tmp_path / "next.dcm")
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_bad_arguments_are_refused_naming_them() -> None:
    a = make_chest_radiograph(seed=19004).dataset
    with pytest.raises(ValueError, match="probability"):
        ClassifiedLabel(0, "Nodule", *NODULE, probability=1.5, threshold=0.5)
    with pytest.raises(ValueError, match="image_index"):
        _report([a], [ClassifiedLabel(1, "Nodule", *NODULE, probability=0.5, threshold=0.5)])
    with pytest.raises(ValueError, match="labels is empty"):
        _report([a], [])

"""The node's consensus labels leave as an nnU-Net raw dataset and a MONAI datalist.

Studies and annotator SEGs go into a running node over DICOM (storescu); ``dicomnode
models export-labels`` then writes the dataset: nnU-Net's own reader gives back each
annotator mask on the node's (slice, row, column) grid, a patient's two studies share a
fold, and nothing but pseudonyms leaves the node.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, storescu, wait_for

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.seg import SegmentSpec, build_seg

pytest.importorskip("nnunetv2")
pytestmark = pytest.mark.slow

SPEC = {"n_slices": 12, "rows": 48, "columns": 48}


def _count(node: NodeProcess) -> int:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("select count(*) from ground_truth").fetchone()[0])
    finally:
        con.close()


def test_labels_export_as_nnunet_raw_dataset(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {
        "learning": {"annotation_aes": ["ANNOTATOR"], "enabled": False,
                     "model": "demo-lesion"},
        "results": {"destinations": []},
    })
    masks = {}
    with node:
        for n, (seed, patient) in enumerate([(301, "EXP-A"), (302, "EXP-B"), (303, "EXP-B")]):
            study = make_ct_study(seed=seed, patient_id=patient, patient_name="Exp^Ort", **SPEC)
            d = tmp_path / f"s{n}"
            d.mkdir()
            for i, ds in enumerate(study.datasets):
                ds.save_as(d / f"{i:03d}.dcm", enforce_file_format=True)
            assert storescu(node.port, sorted(d.glob("*.dcm"))).returncode == 0
            seg = build_seg(
                study.datasets, study.mask,
                [SegmentSpec(1, "Lesion", ("SCT", "49755003", "Morphologically abnormal "
                                           "structure"), ("SCT", "108369006", "Neoplasm"))],
                AlgorithmSpec("manual", "1"), device=DeviceSpec("V", "W", "1", "S"),
                series_instance_uid=f"2.25.{seed}01", sop_instance_uid=f"2.25.{seed}02",
                series_number=90)
            seg.save_as(d / "seg.dcm", enforce_file_format=True)
            assert storescu(node.port, [d / "seg.dcm"], "-R", aet="ANNOTATOR").returncode == 0
            masks[seed] = study.mask.astype(np.uint8)
        wait_for(lambda: _count(node) == 3, 120)
    res = node.cli("models", "export-labels", "--out", str(tmp_path / "raw"),
                   "--dataset-id", "903", "--name", "SiteLabels", "--folds", "2")
    folder = Path(res.stdout.strip().splitlines()[-1])
    assert folder.name == "Dataset903_SiteLabels"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "Lesion": 1} and dataset["numTraining"] == 3

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    got = sorted(
        (np.asarray(SimpleITKIO().read_seg(str(p))[0][0], np.uint8) for p in
         sorted((folder / "labelsTr").glob("*.nii.gz"))), key=lambda m: int(m.sum()))
    assert [m.shape for m in got] == [(12, 48, 48)] * 3
    expected = sorted(masks.values(), key=lambda m: int(m.sum()))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)

    index = json.loads((folder / "dicomnode_cases.json").read_text())
    text = "".join(p.read_text() for p in folder.glob("*.json"))
    assert "EXP-" not in text and "Exp^Ort" not in text  # pseudonyms only
    patients = {v["patient"] for v in index.values()}
    assert len(patients) == 2
    fold_of = {c: f for f, s in enumerate(json.loads((folder / "splits_final.json")
                                                     .read_text())) for c in s["val"]}
    by_patient: dict[str, set[int]] = {}
    for case, v in index.items():
        by_patient.setdefault(v["patient"], set()).add(fold_of[case])
    assert all(len(f) == 1 for f in by_patient.values())  # one fold per patient

"""Routing and inference through the running node, with the bundled demo model."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
from nodeutil import NodeProcess, storescu, wait_for, write_study
from pydicom.uid import MRImageStorage

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.pseudonym import Pseudonymizer
from dicomnode.inference.package import demo_model_paths


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_demo_model_finds_the_lesions_of_a_fresh_phantom(tmp_path: Path) -> None:
    study = make_ct_study(seed=4242, patient_id="PAT-INFER", n_lesions=3)
    assert study.mask.sum() > 0
    files = write_study(study, tmp_path / "src")
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, files).returncode == 0
        [(status, mask_path, findings, model, version)] = wait_for(lambda: rows(
            node, "select status, mask_path, findings, model_name, model_version "
                  "from inference_result"), 90)
        assert (status, model, version) == ("done", "demo-lesion", "1.0.0")
        with np.load(io.BytesIO((node.data_dir / mask_path).read_bytes())) as z:
            mask, sop_keys = z["mask"], [str(k) for k in z["sop_keys"]]
        p = Pseudonymizer((node.data_dir / "keys" / "node.key").read_bytes().strip())
        order = [p.uid(ds.SOPInstanceUID) for ds in study.datasets]
        truth = study.mask[[order.index(k) for k in sop_keys]]
        assert dice(mask, truth) >= 0.8
        assert len(json.loads(findings)) >= 1
        [(info,)] = rows(node, "select info from study")
        routing = json.loads(info)["routing"]
        assert routing["applicable"] and routing["routes"][0]["model"] == "demo-lesion"
        models = json.loads(node.cli("models", "list", "--json").stdout)
        # every bundled demo is registered and active; only demo-lesion is routed on CT
        assert sorted((m["name"], m["status"]) for m in models) == sorted(
            (p.name, "active") for p in demo_model_paths())
        assert ("demo-lesion", "1.0.0", "active") in [
            (m["name"], m["version"], m["status"]) for m in models]


def test_routing_picks_the_thinnest_axial_series_and_records_non_matching(tmp_path: Path) -> None:
    uid = "2.25.1234567890123456789"
    thick = make_ct_study(seed=10, study_instance_uid=uid, series_number=2, n_slices=10,
                          slice_thickness_mm=5.0, patient_id="PAT-ROUTE")
    thin = make_ct_study(seed=10, study_instance_uid=uid, series_number=3, n_slices=24,
                         slice_thickness_mm=1.5, patient_id="PAT-ROUTE")
    mr = make_ct_study(seed=11, n_slices=10, patient_id="PAT-MR")
    for ds in mr.datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    files = (write_study(thick, tmp_path / "thick") + write_study(thin, tmp_path / "thin")
             + write_study(mr, tmp_path / "mr"))
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: len([s for s in node.studies() if s["hooked_version"] == 1]) == 2, 60)
        wait_for(lambda: rows(node, "select status from inference_result"), 60)
        p = Pseudonymizer((node.data_dir / "keys" / "node.key").read_bytes().strip())
        by_key = {s["study_key"]: s for s in node.studies()}
        ct = by_key[p.uid(uid)]["info"]["routing"]
        assert ct["applicable"]
        assert ct["routes"][0]["series_key"] == p.uid(thin.series_instance_uid)
        mr_routing = by_key[p.uid(mr.study_instance_uid)]["info"]["routing"]
        assert not mr_routing["applicable"] and mr_routing["routes"] == []
        assert "modality MR, expected CT" in mr_routing["skipped"][0]["reason"]
        [(series_key,)] = rows(node, "select series_key from inference_result")
        assert series_key == p.uid(thin.series_instance_uid)

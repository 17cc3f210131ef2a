"""The learning loop through the running node: corrected SEGs in, a better model promoted."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, storescu, wait_for, write_study

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.seg import SegmentSpec, build_seg
from dicomnode.inference import OnnxModel
from dicomnode.training.data import phantom_cases
from dicomnode.training.demo import DEMO_CONTRACT, DEMO_LABEL
from dicomnode.training.evaluate import evaluate
from dicomnode.training.train import TrainConfig, train_package

NAME = "lesion-site"
SPEC = {"n_slices": 16, "rows": 64, "columns": 64}
CONFIG = TrainConfig(steps=200, batch_size=8, lr=5e-3, patch=32, base=8, levels=3,
                     val_every=25, patience=10, seed=0, threads=2, progress=False)


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 learned lesions on phantoms without vessels: it mistakes vessels for lesions."""
    out = tmp_path_factory.mktemp("weak") / "v1"
    plain = {**SPEC, "lesion_radius_mm": (5.0, 9.0), "n_vessels": 0}
    train_package(phantom_cases(range(9100, 9106), **plain),
                  phantom_cases(range(9110, 9112), **plain), out, name=NAME, version="1",
                  contract=DEMO_CONTRACT, labels=[replace(DEMO_LABEL)], config=CONFIG)
    return out


def _send_study_and_label(node: NodeProcess, work: Path, seed: int, patient: str) -> None:
    study = make_ct_study(seed=seed, patient_id=patient, patient_name=f"Site^{patient}", **SPEC)
    d = work / f"s{seed}"
    d.mkdir()
    for i, ds in enumerate(study.datasets):
        ds.save_as(d / f"{i:03d}.dcm", enforce_file_format=True)
    assert storescu(node.port, sorted(d.glob("*.dcm"))).returncode == 0
    # the radiologist's corrected segmentation, made on the original images
    seg = build_seg(
        study.datasets, study.mask,
        [SegmentSpec(1, "Lesion", ("SCT", "49755003", "Morphologically abnormal structure"),
                     ("SCT", "108369006", "Neoplasm"))],
        AlgorithmSpec("manual correction", "1"),
        device=DeviceSpec("Viewer Inc", "Workstation", "1.0", "WS-1"),
        series_instance_uid=f"2.25.{seed}01", sop_instance_uid=f"2.25.{seed}02",
        series_number=99,
    )
    seg.save_as(d / "seg.dcm", enforce_file_format=True)
    res = storescu(node.port, [d / "seg.dcm"], "-R", aet="ANNOTATOR")  # -R: propose SEG
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_corrected_segs_retrain_promote_and_rollback(weak_model: Path, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {
        "inference": {"demo_model": False},
        "routing": {"rules": [{"name": "ct", "models": [NAME], "modality": "CT",
                               "min_slices": 8}]},
        "results": {"destinations": []},
        "learning": {"annotation_aes": ["ANNOTATOR"], "model": NAME, "interval_s": 15.0,
                     "min_new_labels": 20, "train_steps": 300, "fractions": [0.5, 0.2, 0.3],
                     "margin": 0.05},
        # a fixed secret: fixed pseudonyms, hence the same patient split in every run
        "deid": {"secret": "learning-loop-test-secret-0123456789abcdef"},
    })
    node.cli("db", "upgrade")
    res = node.cli("models", "add", str(weak_model), "--activate")
    assert "registered lesion-site 1" in res.stdout
    node.start()
    try:
        for i in range(20):
            _send_study_and_label(node, tmp_path, 9500 + i, f"SITE-{i:02d}")
        # every label is stored, and each study was inferred once (the label did not rerun it)
        wait_for(lambda: rows(node, "select count(*) from ground_truth")[0][0] == 20, 180)
        wait_for(lambda: rows(node, "select count(*) from inference_result")[0][0] == 20, 120)
        wait_for(lambda: rows(node, "select count(*) from drift")[0][0] == 20, 120)
        time.sleep(2)
        assert rows(node, "select count(*) from inference_result")[0][0] == 20  # never rerun
        # the scheduled job trains, gates and promotes
        runs = wait_for(lambda: rows(node, "select status, reason, version from training_run "
                                           "where status in ('promoted', 'rejected', 'failed')"),
                        600, 1.0)
        assert runs[0][0] == "promoted", runs
        version = runs[0][2]
        models = {m["version"]: m for m in json.loads(node.cli("models", "list", "--json").stdout)}
        assert models[version]["status"] == "active" and models["1"]["status"] == "retired"
        assert models[version]["card"]["studies"]["test"] >= 3
        # never two runs at once: runs are sequential
        spans = rows(node, "select started_at, finished_at from training_run order by id")
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False) if a[1] is not None)
        # the key figure: better by >= 0.2 Dice on held-out phantoms
        held = phantom_cases(range(9900, 9906), **SPEC)
        old = evaluate(held, OnnxModel.load(node.data_dir / "models" / NAME / "1").predict_mask)
        new = evaluate(held, OnnxModel.load(
            node.data_dir / "models" / NAME / version).predict_mask)
        assert new.mean[1] - old.mean[1] >= 0.2, (old.mean, new.mean)
        assert "lesion-site" in node.cli("models", "stats").stdout

        # rollback restores version 1, and inference uses it again
        assert "is active again" in node.cli("models", "rollback", NAME).stdout
        study = make_ct_study(seed=9990, patient_id="SITE-NEW", **SPEC)
        d = tmp_path / "after"
        d.mkdir()
        for i, ds in enumerate(study.datasets):
            ds.save_as(d / f"{i:03d}.dcm", enforce_file_format=True)
        assert storescu(node.port, sorted(d.glob("*.dcm"))).returncode == 0
        wait_for(lambda: rows(node, "select count(*) from inference_result")[0][0] == 21, 120)
        [(used,)] = rows(node, "select model_version from inference_result order by id desc "
                               "limit 1")
        assert used == "1"
    finally:
        node.stop()


def test_schedule_is_persistent_across_restarts(tmp_path: Path) -> None:
    cfg = {"learning": {"schedule": "30 3 * * *", "model": "demo-lesion"}}
    node = NodeProcess(tmp_path / "node", cfg).start()
    node.stop()
    [(job_id, first)] = rows(node, "select id, next_run_time from apscheduler_jobs")
    assert job_id == "retrain"
    node.start()
    node.stop()
    assert rows(node, "select id, next_run_time from apscheduler_jobs") == [("retrain", first)]
    # a changed schedule replaces the stored job
    node2 = NodeProcess(tmp_path / "node", {"learning": {"schedule": "0 4 * * *"}})
    node2.start()
    node2.stop()
    [(_, second)] = rows(node2, "select id, next_run_time from apscheduler_jobs")
    assert second != first
    assert np.isfinite(second)


def test_two_annotators_who_disagree_flag_the_study(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {
        "learning": {"annotation_aes": ["RAD_A", "RAD_B"], "enabled": False,
                     "agreement_threshold": 0.7},
        "results": {"destinations": []},
    })
    study = make_ct_study(seed=4711, patient_id="PAT-DISAGREE", **SPEC)
    d = tmp_path / "src"
    d.mkdir()
    for i, ds in enumerate(study.datasets):
        ds.save_as(d / f"{i:03d}.dcm", enforce_file_format=True)
    # B outlines the vessels instead of the lesions: little overlap with A
    masks = {"RAD_A": study.mask, "RAD_B": study.vessel_mask}
    with node:
        assert storescu(node.port, sorted(d.glob("*.dcm"))).returncode == 0
        for n, (ae, mask) in enumerate(masks.items()):
            seg = build_seg(
                study.datasets, mask,
                [SegmentSpec(1, "Lesion", ("SCT", "49755003", "Morphologically abnormal structure"),
                             ("SCT", "108369006", "Neoplasm"))],
                AlgorithmSpec("manual", "1"), device=DeviceSpec("V", "W", "1", "S"),
                series_instance_uid=f"2.25.47110{n}1", sop_instance_uid=f"2.25.47110{n}2",
                series_number=90 + n,
            )
            seg.save_as(d / f"seg{n}.dcm", enforce_file_format=True)
            res = storescu(node.port, [d / f"seg{n}.dcm"], "-R", aet=ae)
            assert res.returncode == 0, res.stderr
        flagged = wait_for(lambda: [s["info"].get("labels") for s in node.studies()
                                    if s["info"].get("labels", {}).get("annotators") == 2], 60)
        [labels] = flagged
        assert labels["flagged"] is True and labels["agreement"] < 0.7
        assert rows(node, "select count(*) from ground_truth")[0][0] == 2


def test_export_to_annotate_and_the_correction_comes_back(tmp_path: Path) -> None:
    """The node's SEG goes to the radiologist's workstation as a pre-annotation, marked as
    made by an algorithm; the corrected SEG sent back from there becomes the label and
    scores the prediction (drift)."""
    from peers import start_storescp
    from pydicom import dcmread

    from dicomnode.dicom.seg import read_seg

    ws = start_storescp(tmp_path / "ws")  # the annotation workstation
    node = NodeProcess(tmp_path / "node", {
        "peers": {"ws": {"ae_title": "RAD_WS1", "host": "127.0.0.1", "port": ws.port}},
        "results": {"destinations": ["ws"], "sr": False},
        "learning": {"annotation_aes": ["RAD_WS1"], "enabled": False},
    })
    study = make_ct_study(seed=5301, patient_id="PAT-ANNOTATE", patient_name="Annot^Ann")
    files = write_study(study, tmp_path / "src")
    try:
        with node:
            assert storescu(node.port, files).returncode == 0
            [pre] = wait_for(lambda: [f for f in (ws.workdir / "out").iterdir()
                                      if f.is_file()], 120)
            seg = dcmread(pre)
            # on the original study, marked as a machine's work
            assert seg.Modality == "SEG" and seg.PatientID == "PAT-ANNOTATE"
            assert seg.StudyInstanceUID == study.study_instance_uid
            assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
            assert all(s.SegmentAlgorithmName for s in seg.SegmentSequence)
            source_uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
            predicted, _ = read_seg(seg, source_uids)
            assert predicted.shape[0] == len(source_uids)

            # the radiologist corrects it (here: to the phantom's truth) and sends it back
            corrected = build_seg(
                study.datasets, study.mask,
                [SegmentSpec(1, "Lesion", ("SCT", "49755003",
                                           "Morphologically abnormal structure"),
                             ("SCT", "108369006", "Neoplasm"),
                             algorithm_type="SEMIAUTOMATIC")],
                AlgorithmSpec("manual correction", "1"),
                device=DeviceSpec("Viewer Inc", "Workstation", "1.0", "WS-1"),
                series_instance_uid="2.25.530101", sop_instance_uid="2.25.530102",
                series_number=98,
            )
            corrected.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
            res = storescu(node.port, [tmp_path / "corrected.dcm"], "-R", aet="RAD_WS1")
            assert res.returncode == 0, res.stderr
            wait_for(lambda: rows(node, "select count(*) from drift")[0][0] == 1, 60)
            [(annotator,)] = rows(node, "select annotator from ground_truth")
            assert annotator == "RAD_WS1"
            [(version, dice)] = rows(node, "select model_version, dice from drift")
            assert version == "1.0.0"
            # the drift score is the Dice of the prediction the workstation got
            truth = study.mask.astype(bool)
            pred = np.asarray(predicted).astype(bool)
            if pred.ndim == 4:
                pred = pred[..., 0]
            expected = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
            assert expected > 0.5  # a useful pre-annotation, not an empty one
            [value] = json.loads(dice).values()
            assert abs(value - expected) < 0.02
    finally:
        ws.stop()

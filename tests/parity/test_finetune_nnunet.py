"""Retraining an imported nnU-Net model: nnU-Net's trainer fine-tunes the serving checkpoint,
the result is re-imported as a candidate version and the promotion gate decides.

A small real nnU-Net v2 model (nnunet_model.py: nnU-Net's PlainConvUNet from the plans,
checkpoint in nnU-Net's format) is imported and activated in a real registry (SQLite).
Labelled phantom studies of eight patients go through
:func:`~dicomnode.importers.nnunet_finetune.retrain_imported`: the non-test patients are
written as an nnU-Net raw dataset, preprocessed with the source plans and trained for a few
iterations on CPU with nnU-Net's own ``run_training``; the candidate is re-imported (its
golden case against nnU-Net's predictor must pass), scored with the serving model on the
held-out patients and promoted or rejected by the gate, with its metrics recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

import nnunet_model as nm  # noqa: E402
from test_parity_nnunet import PLAN, axial_affine, phantom  # noqa: E402

from dicomnode.app import model_registry, open_database  # noqa: E402
from dicomnode.config import load_settings  # noqa: E402
from dicomnode.importers.nnunet import import_nnunet  # noqa: E402
from dicomnode.importers.nnunet_finetune import (  # noqa: E402
    FinetuneSettings,
    retrain_imported,
)
from dicomnode.inference.golden import run_golden_cases  # noqa: E402
from dicomnode.modelpkg import read_model_package  # noqa: E402
from dicomnode.pipeline.learning import NodeRegistryOps  # noqa: E402
from dicomnode.training.dataset import StudyInfo  # noqa: E402
from dicomnode.training.gate import GatePolicy  # noqa: E402

pytestmark = pytest.mark.slow


def _studies() -> tuple[list[StudyInfo], dict[str, tuple[np.ndarray, ...]]]:
    infos, data = [], {}
    for n in range(8):
        volume = phantom((12, 32, 28), seed=20 + n)
        mask = (volume > -200).astype(np.uint8) + (volume > 250).astype(np.uint8)
        info = StudyInfo(study_key=f"S{n}", patient_pseudonym=f"p{n}", modality="CT",
                         labels=("organ", "lesion"))
        infos.append(info)
        data[info.study_key] = (volume, mask, axial_affine((3.0, 1.0, 1.1)))
    return infos, data


def test_finetune_candidate_is_registered_and_gated(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": str(tmp_path / "data")})
    engine, sessions = open_database(settings, upgrade=True)
    try:
        registry = model_registry(settings, sessions)
        folder = nm.write_model_folder(tmp_path / "results", nm.plans(**PLAN), folds=1,
                                       mirroring=(0, 1, 2))
        report = import_nnunet(folder, tmp_path / "pkg", axes="SPL", generic_codes=True)
        serving = registry.add(report.package, created_by="test")
        registry.activate(serving.name, serving.version, reason="imported")
        active = registry.active(serving.name)
        assert active is not None
        assert read_model_package(active.path).provenance["results_folder"] == str(
            folder.resolve())

        infos, data = _studies()
        ops = NodeRegistryOps(SimpleNamespace(registry=registry))
        result = retrain_imported(
            infos, lambda s: data[s.study_key], ops, name=active.name,
            active_dir=active.path, active_version=active.version, work_dir=tmp_path / "work",
            gate=GatePolicy(min_cases=1), settings=FinetuneSettings(
                epochs=1, iterations_per_epoch=3, val_iterations_per_epoch=1, device="cpu"))

        assert result.status in ("promoted", "rejected"), result.reason
        assert result.reason
        cand = registry.get(active.name, result.version)
        assert cand is not None and cand.version != active.version
        assert cand.status == ("active" if result.status == "promoted" else "rejected")
        assert cand.reason == result.reason
        test_cases = cand.metrics["test"]["candidate"]["per_case"]
        assert test_cases and set(test_cases) <= {i.study_key for i in infos}
        assert cand.metrics["gate"]["promote"] == (result.status == "promoted")
        # the gate compared against the serving version on the same held-out studies
        assert set(cand.metrics["test"]["active"]["per_case"]) == set(test_cases)
        assert cand.metrics["test"]["active_version"] == active.version
        # no held-out study was trained on
        index = json.loads(next((tmp_path / "work").rglob("dicomnode_cases.json")).read_text())
        assert not {v["study"] for v in index.values()} & set(test_cases)

        # the candidate: an nnU-Net import of the fine-tuned folder, golden case passing
        pkg = read_model_package(cand.path)
        assert run_golden_cases(cand.path)[0]["passed"]
        new_folder = Path(pkg.provenance["results_folder"])
        assert new_folder.is_relative_to(tmp_path / "work")
        assert [lb.type.value for lb in pkg.labels] == [
            lb.type.value for lb in read_model_package(active.path).labels]
        # nnU-Net trained from the serving weights: close to them, but changed
        old = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
        new = torch.load(new_folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
        assert new["trainer_name"] == "nnUNetTrainer"
        diffs = [float((new["network_weights"][k].float() - v.float()).abs().max())
                 for k, v in old["network_weights"].items()]
        assert max(diffs) > 0, "the fine-tune did not change the weights"
        rel = [float((new["network_weights"][k].float() - v.float()).norm()
                     / (v.float().norm() + 1e-8)) for k, v in old["network_weights"].items()
               if v.dtype.is_floating_point and v.numel() > 8]
        assert float(np.median(rel)) < 0.5, "weights are not the serving model's, fine-tuned"
    finally:
        engine.dispose()


def test_train_now_on_a_node_fine_tunes_the_imported_model(tmp_path: Path) -> None:
    """Through the node: studies and annotator SEGs arrive over DICOM, ``dicomnode train
    --now`` takes the nnU-Net path for the imported active model (by its provenance) and
    records the run with the gate's decision."""
    import sqlite3
    import subprocess
    import sys

    from nodeutil import NodeProcess, storescu, wait_for

    from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec
    from dicomnode.dicom.phantom import make_ct_study
    from dicomnode.dicom.seg import SegmentSpec, build_seg

    folder = nm.write_model_folder(tmp_path / "results", nm.plans(**PLAN), folds=1,
                                   mirroring=())
    report = import_nnunet(folder, tmp_path / "pkg", axes="SPL", generic_codes=True)
    name = read_model_package(report.package).name
    node = NodeProcess(tmp_path / "node", {
        "inference": {"demo_model": False},
        "results": {"destinations": []},
        "learning": {"annotation_aes": ["ANNOTATOR"], "model": name, "enabled": False,
                     "fractions": [0.5, 0.2, 0.3], "nnunet_epochs": 1,
                     "nnunet_iterations_per_epoch": 2},
        "deid": {"secret": "nnunet-finetune-test-secret-0123456789abcdef"},
    })
    node.cli("db", "upgrade")
    node.cli("models", "add", str(report.package), "--activate")

    def labelled() -> int:
        con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True)
        try:
            return int(con.execute("select count(*) from ground_truth").fetchone()[0])
        finally:
            con.close()

    with node:
        for n in range(8):
            study = make_ct_study(seed=700 + n, patient_id=f"FT-{n}", patient_name="Ft^Node",
                                  n_slices=12, rows=48, columns=48)
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
                series_instance_uid=f"2.25.{700 + n}01", sop_instance_uid=f"2.25.{700 + n}02",
                series_number=90)
            seg.save_as(d / "seg.dcm", enforce_file_format=True)
            assert storescu(node.port, [d / "seg.dcm"], "-R", aet="ANNOTATOR").returncode == 0
        wait_for(lambda: labelled() == 8, 180)
    run = subprocess.run([sys.executable, "-m", "dicomnode", "train", "--now", "--config",
                          str(node.config_path)], capture_output=True, text=True,
                         env=node.env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout)
    assert record["status"] in ("promoted", "rejected"), record
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True)
    try:
        [(status, reason, metrics)] = con.execute(
            "select status, reason, metrics from training_run").fetchall()
    finally:
        con.close()
    assert (status, reason) == (record["status"], record["reason"])
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    assert metrics["train"]["trainer"] == "nnU-Net"
    models = {m["version"]: m for m in json.loads(
        node.cli("models", "list", "--json").stdout)}
    assert models[record["version"]]["status"] in ("active", "rejected")

"""Format 2 packages through the running node: golden cases guard activation, and a volume
a model cannot take ends that model's step once, with the reason."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, storescu, wait_for, write_study

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.modelpkg.write import write_format2_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from test_format2 import axial, document, pointwise  # noqa: E402

pytestmark = pytest.mark.slow
FINAL = ("results_sent", "results_held", "not_applicable", "refused", "failed")


def _case(volume: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, volume=volume, affine=axial(), labels=labels)
    return buf.getvalue()


def test_failing_golden_case_refuses_activation_with_its_dice(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).uniform(-1, 1, (9, 20, 20)).astype(np.float32)
    wrong = np.flip(volume > 0.25, 1).astype(np.uint8)  # as if the axes were declared wrong
    doc = document()
    doc["name"] = "flipped"
    doc["validation"] = {"cases": [{"file": "golden/case0.npz", "min_dice": 0.95}]}
    write_format2_package(tmp_path / "pkg", {"m.onnx": pointwise([0, 1], [0, -0.25], 2,
                                                                   (8, 16, 16))},
                          doc, extra_files={"golden/case0.npz": _case(volume, wrong)})
    node = NodeProcess(tmp_path / "node")
    node.cli("db", "upgrade")
    res = node.cli("models", "add", str(tmp_path / "pkg"), "--activate", check=False)
    assert res.returncode != 0
    assert "golden case golden/case0.npz fails: Dice label 1:" in res.stderr
    [model] = [m for m in json.loads(node.cli("models", "list", "--json").stdout)
               if m["name"] == "flipped"]
    assert model["status"] == "rejected" and "Dice" in model["reason"]


def test_a_volume_the_model_cannot_take_ends_its_step_once(tmp_path: Path) -> None:
    graph = {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))}
    mr = document()
    mr["name"], mr["input"]["modality"] = "mr-only", ["MR"]
    write_format2_package(tmp_path / "mr", graph, mr)
    deep = document()
    deep["name"], deep["input"]["min_slices"] = "needs-50", 50
    write_format2_package(tmp_path / "deep", graph, deep)
    rules = [{"name": "all", "models": ["mr-only", "needs-50"], "modality": "*", "plane": "*",
              "min_slices": 1}]
    node = NodeProcess(tmp_path / "node", {"routing": {"rules": rules},
                                           "results": {"destinations": []}})
    node.cli("db", "upgrade")
    for pkg in ("mr", "deep"):
        node.cli("models", "add", str(tmp_path / pkg), "--activate")
    files = write_study(make_ct_study(n_slices=10, rows=32, columns=32, seed=7), tmp_path / "s")
    with node:
        assert storescu(node.port, files).returncode == 0

        def final() -> dict | None:
            [study] = node.studies()
            return study if study["outcome"] in FINAL else None

        study = wait_for(final, 120, 0.5)
        assert study["outcome"] == "refused"
        assert "series modality CT, model expects MR" in study["outcome_reason"]
        assert "model needs at least 50" in study["outcome_reason"]
        jobs = json.loads(node.cli("studies", "--json").stdout)
        assert jobs  # listing works while the node runs
    import sqlite3

    con = sqlite3.connect(node.data_dir / "dicomnode.db")
    infer_jobs = con.execute("select status, attempts from job where task = 'infer'").fetchall()
    con.close()
    assert sorted(infer_jobs) == [("done", 1), ("done", 1)]  # once each, no retries

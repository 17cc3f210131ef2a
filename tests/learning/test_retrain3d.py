"""retrain() on a format 2 volume package: the candidate is a 3D U-Net trained with the
active package's conventions, run by the sliding-window runtime for the gate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from learningtools import FakeRegistry, FakeSource, Version, labelled_phantom

from dicomnode.inference.runtime import RuntimeOptions, load_runner
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.modelpkg.format2 import ModelPackage2
from dicomnode.modelpkg.prepare import axial_affine
from dicomnode.training.demo3d import DEMO3D_INFERENCE, DEMO3D_SPEC, demo3d_document
from dicomnode.training.gate import GatePolicy
from dicomnode.training.retrain import RetrainSettings, RetrainStatusValues, retrain
from dicomnode.training.train3d import Train3dConfig, write_volume_package
from dicomnode.training.unet import UNet3d

NAME = "lesion3d"
PATCH = (16, 32, 32)


class _Runner:
    """``predict_mask`` of a format 2 volume package, as the node's predictor runs it."""

    def __init__(self, path: Path) -> None:
        self.runner = load_runner(read_model_package(path), RuntimeOptions(), None)

    def predict_mask(self, volume: np.ndarray, spacing: tuple[float, float, float]
                     ) -> np.ndarray:
        return np.asarray(self.runner.run(volume, axial_affine(spacing)).labels)


class VolumeRegistry(FakeRegistry):
    """The learning tests' fake registry, for format 2 packages."""

    def _model(self, path: Path) -> Any:
        if path not in self._models:
            self._models[path] = _Runner(path)  # type: ignore[assignment]
        return self._models[path]

    def add(self, package_dir: Path, status: str, reason: str = "") -> str:
        pkg = read_model_package(package_dir)
        dest = self.root / pkg.name / pkg.version
        shutil.copytree(package_dir, dest)
        self.versions[(pkg.name, pkg.version)] = Version(dest, status, reason)
        return pkg.version


def _template(out: Path) -> Path:
    """An untrained 3D network in a package with the 3D demo's conventions, smaller."""
    torch.manual_seed(0)
    doc = demo3d_document()
    doc["name"], doc["version"] = NAME, "1"
    doc["inference"] = {**doc["inference"], "patch": list(PATCH), "batch": 2}
    del doc["validation"]
    inference = type(DEMO3D_INFERENCE)(**{**DEMO3D_INFERENCE.__dict__, "patch": PATCH,
                                          "batch": 2})
    write_volume_package(UNet3d(1, 4, 2).eval(), out, doc, DEMO3D_SPEC, inference)
    return out


@pytest.mark.slow
def test_a_volume_model_is_retrained_as_3d_and_promoted(tmp_path: Path) -> None:
    registry = VolumeRegistry(tmp_path / "store")
    template = _template(tmp_path / "v1")
    registry.add(template, "active")
    # no vessel distractors: a few dozen steps learn the lesions
    studies = [labelled_phantom(9800 + i, f"P3D-{i:02d}", n_vessels=0) for i in range(10)]
    settings = RetrainSettings(
        name=NAME, contract=None, volume_template=registry.versions[(NAME, "1")].path,
        labels=read_model_package(template).labels, work_dir=tmp_path / "work",
        train3d_config=Train3dConfig(steps=60, batch_size=2, base=4, levels=2, val_every=20,
                                     patience=5, seed=0, threads=1, progress=False),
        gate=GatePolicy(margin=0.05, floor=0.3, min_cases=2), fractions=(0.6, 0.2, 0.2),
        min_new_labels=1)
    outcome = retrain(FakeSource(studies, new_labels=10), registry, settings)

    assert outcome.status is RetrainStatusValues.PROMOTED, outcome.reason
    assert (outcome.version, outcome.active_version) == ("2", "1")
    cand = read_model_package(registry.versions[(NAME, "2")].path)
    assert isinstance(cand, ModelPackage2) and cand.input == DEMO3D_SPEC
    assert cand.inference.patch == PATCH and cand.golden == ()
    assert cand.provenance["architecture"] == "UNet3d base 4 levels 2"
    ev_new = outcome.candidate_evaluation
    ev_old = outcome.active_evaluation
    assert ev_new is not None and ev_old is not None
    assert ev_new.mean[1] >= ev_old.mean[1] + 0.2, (ev_old.mean, ev_new.mean)


def test_settings_need_exactly_one_of_contract_and_template(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either contract"):
        RetrainSettings(name=NAME, contract=None, labels=(), work_dir=tmp_path)

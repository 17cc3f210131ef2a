"""The bundled 3D demo through the sliding-window runtime, on phantoms it never saw (seeds
9000+), at spacings off its network grid; its package, golden case and registration."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.config import RoutingSettings
from dicomnode.dicom.phantom import LESION_HU, make_ct_study
from dicomnode.inference.golden import run_golden_cases
from dicomnode.inference.package import DEMO_3D_MODEL, demo_model_paths
from dicomnode.inference.runtime import RuntimeOptions, load_runner
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.modelpkg.format2 import ModelPackage2
from dicomnode.modelpkg.prepare import axial_affine

OPTIONS = RuntimeOptions(providers=["CPUExecutionProvider"], intra_op_threads=1)


def _path():
    [path] = [p for p in demo_model_paths() if p.name == DEMO_3D_MODEL]
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def runner():
    return load_runner(read_model_package(_path()), OPTIONS, None)


def test_shipped_package() -> None:
    path = _path()
    pkg = read_model_package(path)
    assert isinstance(pkg, ModelPackage2) and pkg.task == "segmentation"
    assert pkg.input.axes == "SPL" and pkg.input.spacing_mm == (3.0, 1.5, 1.5)
    assert pkg.inference.mode == "sliding_window" and pkg.inference.patch == (16, 64, 64)
    (label,) = pkg.labels
    assert label.name == "Lesion"
    assert (label.category.scheme, label.category.value) == ("SCT", "49755003")
    assert (label.type.scheme, label.type.value) == ("SCT", "108369006")
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 10 * 2**20
    assert pkg.provenance["heldout_dice"] >= 0.8
    assert {"best_val_dice", "train_seconds", "parity_max_abs_diff"} <= set(pkg.provenance)


def test_package_declares_what_training_prepared() -> None:
    demo3d = pytest.importorskip("dicomnode.training.demo3d")  # the train extra (torch)
    pkg = read_model_package(_path())
    assert pkg.input == demo3d.DEMO3D_SPEC and pkg.inference == demo3d.DEMO3D_INFERENCE


def test_golden_case_passes_through_the_runtime() -> None:
    [result] = run_golden_cases(_path(), OPTIONS)
    assert result["passed"], result
    assert result["dice"]["1"] >= 0.95, result


@pytest.mark.parametrize(("seed", "spacing"), [(9311, (3.0, 1.5)), (9312, (2.5, 1.2)),
                                               (9314, (3.5, 1.3))])
def test_finds_lesions_in_fresh_studies(runner, seed: int, spacing: tuple[float, float]
                                        ) -> None:
    thick, pixel = spacing
    n = int(round(128 * 1.5 / pixel))
    st = make_ct_study(seed=seed, n_slices=int(round(96 / thick)), rows=n, columns=n,
                       pixel_spacing_mm=pixel, slice_thickness_mm=thick, n_lesions=3)
    labels = runner.run(st.hu, axial_affine((thick, pixel, pixel))).labels
    assert labels.shape == st.mask.shape
    d = _dice(labels, st.mask)
    assert d >= 0.8, (seed, spacing, d)
    # as bright as the lesions, but one to three slices thin: not lesions
    assert (labels[st.vessel_mask > 0] > 0).mean() < 0.05
    threshold = _dice(np.abs(st.hu - LESION_HU) < 40, st.mask)
    assert d > threshold + 0.2, (d, threshold)


def test_registered_but_not_routed_by_default() -> None:
    # one SEG per CT from the demos: the 2D demo keeps the default CT rule
    assert _path().is_dir()
    routed = {m for rule in RoutingSettings().rules for m in rule.models}
    assert DEMO_3D_MODEL not in routed and "demo-lesion" in routed

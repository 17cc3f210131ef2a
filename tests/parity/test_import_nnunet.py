"""``dicomnode models import-nnunet`` against nnU-Net v2's own predictor.

A small real nnU-Net v2 results folder is made in the test (nnunet_model.py: nnU-Net's
``PlainConvUNet`` built from the plans, fixed random weights, checkpoints in nnU-Net's
format, two folds, mirroring on). It is imported through the command line; the package
must reproduce ``nnUNetPredictor`` (same folds, mirroring, step) on held-out phantoms
given to the node as DICOM volumes (array + LPS affine): >= 99.9 % of voxels agree.
Configurations the package cannot express are refused with their reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

import nnunet_model as nm  # noqa: E402
from test_parity_nnunet import PLAN, axial_affine, phantom  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dicomnode.cli import app  # noqa: E402
from dicomnode.errors import ImportRefused  # noqa: E402
from dicomnode.importers.nnunet import import_nnunet  # noqa: E402
from dicomnode.inference.golden import run_golden_cases  # noqa: E402
from dicomnode.inference.sliding import SlidingWindowModel  # noqa: E402
from dicomnode.modelpkg.format1 import read_model_package  # noqa: E402

pytestmark = pytest.mark.slow

ORGAN_CODE = {"organ": {
    "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
    "color": [10, 20, 30]}}


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, str(tmp_path / key))


def _oracle(folder: Path, volume: np.ndarray, spacing: tuple[float, ...],
            folds: tuple[int, ...], mirroring: bool = True) -> np.ndarray:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return np.asarray(predictor.predict_single_npy_array(
        volume[None].astype(np.float32), {"spacing": list(spacing)}, None, None, False))


def test_import_through_the_cli_matches_nnunet_predictor(tmp_path: Path) -> None:
    nm.write_model_folder(tmp_path / "results", nm.plans(**PLAN), folds=2,
                          mirroring=(0, 1, 2))
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps(ORGAN_CODE))
    out = tmp_path / "pkg"
    result = CliRunner().invoke(app, [
        "models", "import-nnunet", str(tmp_path / "results" / "Dataset999_Parity"),
        "--out", str(out), "--axes", "SPL", "--codes", str(codes)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["members"] == ["fold_0.onnx", "fold_1.onnx"]
    assert max(report["max_abs_diff"]) < 1e-3
    assert report["golden"] and all(g["passed"] for g in report["golden"])

    pkg = read_model_package(out)
    assert pkg.inference.mirror_axes == (0, 1, 2)  # from the checkpoints
    assert [lb.type.value for lb in pkg.labels] == ["10200004", "52988006"]  # map; default
    assert pkg.input.axes == "SPL" and pkg.input.spacing_mm == PLAN["spacing"]
    assert run_golden_cases(out)[0]["passed"]  # as the registry runs it at activation

    folder = tmp_path / "results" / "Dataset999_Parity" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model = SlidingWindowModel.load(pkg)
    for shape, spacing, seed in [((22, 46, 38), (2.5, 1.1, 1.3), 5),
                                 ((12, 50, 44), (4.0, 0.9, 0.9), 6)]:
        volume = phantom(shape, seed)
        expected = _oracle(folder, volume, spacing, (0, 1))
        got = model.run(volume, axial_affine(spacing)).labels
        assert len(np.unique(expected)) >= 2, "the oracle's output must not be trivial"
        assert float((got == expected).mean()) >= 0.999


def test_transposed_plans_and_postprocessing(tmp_path: Path) -> None:
    plan = nm.plans(patch=(32, 16, 32), spacing=(1.5, 2.0, 1.5), transpose_forward=(2, 0, 1))
    folder = nm.write_model_folder(tmp_path / "results", plan, folds=1, mirroring=())
    (folder / "postprocessing.json").write_text(json.dumps({
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
        "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}]}))
    report = import_nnunet(folder, tmp_path / "pkg", axes="SPL", generic_codes=True)
    pkg = read_model_package(report.package)
    assert pkg.input.axes == "LSP"  # training axes SPL, transposed (2, 0, 1)
    assert pkg.inference.mirror_axes == ()  # the checkpoint allows none
    assert pkg.outputs.postprocess[0].together and pkg.outputs.postprocess[0].labels == (1, 2)
    assert "organ" in report.notes[0]  # the generic code is reported

    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    volume, spacing = phantom((20, 40, 36), 9), (2.5, 1.2, 1.2)
    expected = remove_all_but_largest_component_from_segmentation(
        _oracle(folder, volume, spacing, (0,), mirroring=False), [1, 2])
    got = SlidingWindowModel.load(pkg).run(volume, axial_affine(spacing)).labels
    assert float((got == expected).mean()) >= 0.999


def test_uncoded_labels_are_refused(tmp_path: Path) -> None:
    folder = nm.write_model_folder(tmp_path / "results", nm.plans(**PLAN), folds=1)
    with pytest.raises(ImportRefused, match="labels without a code: 'organ'"):
        import_nnunet(folder, tmp_path / "pkg", axes="SPL")
    assert not (tmp_path / "pkg").exists()


def _refusal(tmp_path: Path, edit: Any, match: str, **kwargs: Any) -> None:
    plan = nm.plans(**PLAN)
    folder = nm.write_model_folder(tmp_path / "results", plan, folds=1)
    edit(folder, plan)
    with pytest.raises(ImportRefused, match=match):
        import_nnunet(folder, tmp_path / "pkg", axes="SPL", generic_codes=True, **kwargs)
    assert not (tmp_path / "pkg").exists()


def test_cascade_is_refused(tmp_path: Path) -> None:
    def edit(folder: Path, plan: dict[str, Any]) -> None:
        cascade = copy.deepcopy(plan["configurations"]["3d_fullres"])
        cascade["previous_stage"] = "3d_lowres"
        plan["configurations"]["3d_cascade_fullres"] = cascade
        (folder / "plans.json").write_text(json.dumps(plan))

    _refusal(tmp_path, edit, "cascade stage", configuration="3d_cascade_fullres")


def test_unimportable_custom_trainer_is_refused(tmp_path: Path) -> None:
    def edit(folder: Path, plan: dict[str, Any]) -> None:
        path = folder / "fold_0" / "checkpoint_final.pth"
        ck = torch.load(path, weights_only=False)
        ck["trainer_name"] = "nnUNetTrainerSiteSpecialXYZ"
        torch.save(ck, path)

    _refusal(tmp_path, edit, "custom trainer 'nnUNetTrainerSiteSpecialXYZ'")


def test_several_input_channels_are_refused(tmp_path: Path) -> None:
    def edit(folder: Path, plan: dict[str, Any]) -> None:
        ds = json.loads((folder / "dataset.json").read_text())
        ds["channel_names"] = {"0": "T1", "1": "FLAIR"}
        (folder / "dataset.json").write_text(json.dumps(ds))

    _refusal(tmp_path, edit, "2 input channels")


def test_axes_are_required(tmp_path: Path) -> None:
    folder = nm.write_model_folder(tmp_path / "results", nm.plans(**PLAN), folds=1)
    with pytest.raises(ImportRefused, match="does not reorient"):
        import_nnunet(folder, tmp_path / "pkg", generic_codes=True)


def test_region_based_model(tmp_path: Path) -> None:
    # BraTS-style regions: one sigmoid per region, painted in regions_class_order
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plan = nm.plans(**PLAN)
    folder = nm.write_model_folder(tmp_path / "results", plan, folds=1, mirroring=(0, 1, 2))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "numTraining": 4, "file_ending": ".nii.gz",
        "labels": {"background": 0, "whole": [1, 2], "core": [2]},
        "regions_class_order": [1, 2]}))
    arch = plan["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(3)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                 arch["_kw_requires_import"], 1, 2, deep_supervision=False)
    with torch.no_grad():
        net.decoder.seg_layers[-1].bias.copy_(torch.tensor([0.3, -0.2]))  # both regions occur
    path = folder / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(path, weights_only=False)
    ck["network_weights"] = net.state_dict()
    torch.save(ck, path)

    report = import_nnunet(folder, tmp_path / "pkg", axes="SPL", generic_codes=True)
    pkg = read_model_package(report.package)
    assert pkg.outputs.activation == "sigmoid"
    assert [(r.channel, r.label) for r in pkg.outputs.regions] == [(0, 1), (1, 2)]
    volume, spacing = phantom((20, 40, 36), 12), (2.5, 1.2, 1.2)
    expected = _oracle(folder, volume, spacing, (0,))
    got = SlidingWindowModel.load(pkg).run(volume, axial_affine(spacing)).labels
    assert set(np.unique(expected).tolist()) >= {1, 2}, "both regions must occur"
    assert float((got == expected).mean()) >= 0.999

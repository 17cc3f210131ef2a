"""The node's sliding-window runtime against nnU-Net v2's own predictor, same weights and input.

A small real nnU-Net model folder is made in the test (nnunet_model.py): plans, dataset.json
and fold checkpoints with nnU-Net's own ``PlainConvUNet``. ``nnUNetPredictor`` loads it as
it loads any trained model and predicts a volume given as nnU-Net reads images (SimpleITK
axis order, spacing); the node runs the same weights exported to ONNX in a format 2
package written as an nnU-Net import maps the plans, on the same volume given as a DICOM
volume (array + LPS affine). Labels must agree on >= 99.9 % of voxels and the
probabilities (softmax of the logits resampled back) within 0.01.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

import nnunet_model as nm  # noqa: E402

from dicomnode.inference.sliding import SlidingWindowModel  # noqa: E402
from dicomnode.modelpkg.write import write_format2_package  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # nnU-Net reads these at import; the predictor does not use them
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, str(tmp_path / key))


def package_document(plan: dict[str, Any], mirror: tuple[int, ...],
                     training_axes: str = "SPL") -> dict[str, Any]:
    """The format 2 document an nnU-Net import writes for these plans."""
    cfg = plan["configurations"]["3d_fullres"]
    it = plan["foreground_intensity_properties_per_channel"]["0"]
    if cfg["normalization_schemes"][0] == "CTNormalization":
        norm = [{"kind": "clip", "lower": it["percentile_00_5"], "upper": it["percentile_99_5"]},
                {"kind": "zscore", "mean": it["mean"], "std": it["std"]}]
    else:
        norm = [{"kind": "zscore",
                 "mask": "nonzero_filled" if cfg["use_mask_for_norm"][0] else "all"}]
    return {
        "name": "parity", "version": "1", "task": "segmentation",
        "input": {
            "kind": "volume", "name": "input", "modality": ["CT"],
            # nnU-Net never reorients: its axes are the training images' axes, transposed
            "axes": "".join(training_axes[t] for t in plan["transpose_forward"]),
            "spacing_mm": cfg["spacing"], "allow_oblique": True,
            "resample": {"grid": "center", "order": 3, "anisotropic_order": 0,
                         "anisotropy_ratio": 3.0},
            "crop_to_nonzero": True, "normalize_stage": "before_resample",
            "normalization": norm,
        },
        "inference": {
            "mode": "sliding_window", "patch": cfg["patch_size"], "batch": 2,
            "tiling": {"flavour": "nnunet", "step": 0.5},
            "blend": {"kind": "gaussian", "flavour": "nnunet", "sigma_scale": 0.125},
            "pad": {"mode": "constant", "value": 0.0, "space": "normalized"},
            "mirror_axes": list(mirror), "accumulate": "float16",
        },
        "outputs": {
            "name": "logits", "kind": "logits", "activation": "softmax",
            "resample_back": "logits", "back_order": {"order": 1, "anisotropic_order": 0},
            "labels": [{"number": v, "name": k,
                        "category": {"scheme": "SCT", "value": "91723000",
                                     "meaning": "Anatomical Structure"},
                        "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                        "color": [200, 100, 50]} for k, v in nm.LABELS.items() if v],
        },
    }


def phantom(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = ((x**2 + y**2 + z**2) < 0.6) * 900.0
    lesion = (((x - 0.2) ** 2 + y**2 + (z + 0.1) ** 2) < 0.05) * 400.0
    return (-800 + body + lesion + rng.normal(0, 40, shape)).astype(np.float32)


def axial_affine(spacing: tuple[float, float, float], tilt_deg: float = 0.0) -> np.ndarray:
    """LPS affine of an axial stack (slices toward S, rows toward P, columns toward L),
    optionally rotated about the column axis (an oblique acquisition)."""
    sz, sy, sx = spacing
    a = np.radians(tilt_deg)
    normal = np.array([0.0, -np.sin(a), np.cos(a)])
    col = np.array([0.0, np.cos(a), np.sin(a)])
    row = np.array([1.0, 0.0, 0.0])
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2] = normal * sz, col * sy, row * sx
    return out


def compare(tmp_path: Path, volume: np.ndarray, spacing: tuple[float, float, float],
            plan: dict[str, Any], *, folds: int = 1, mirror: tuple[int, ...] = (),
            flip_axis: int | None = None, tilt_deg: float = 0.0) -> dict[str, float]:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = nm.write_model_folder(tmp_path, plan, folds=folds, mirroring=mirror or (0, 1, 2))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                use_mirroring=bool(mirror), perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(range(folds)))
    seg, probs = predictor.predict_single_npy_array(
        volume[None].astype(np.float32), {"spacing": list(spacing)}, None, None, True)

    patch = tuple(plan["configurations"]["3d_fullres"]["patch_size"])
    members = {f"fold_{f}.onnx": nm.onnx_bytes(nm.network(plan, 100 + f), 2, patch)
               for f in range(folds)}
    pkg = write_format2_package(tmp_path / "pkg", members, package_document(plan, mirror))
    model = SlidingWindowModel.load(pkg)
    array, affine = volume, axial_affine(spacing, tilt_deg)
    if flip_axis is not None:  # the same volume stored the other way round
        array = np.ascontiguousarray(np.flip(volume, flip_axis))
        affine = affine.copy()
        affine[:3, 3] = affine[:3, flip_axis] * (volume.shape[flip_axis] - 1)
        affine[:3, flip_axis] *= -1
    out = model.run(array, affine, keep_logits=True)
    labels, logits = out.labels, out.logits
    assert labels.shape == volume.shape and logits is not None
    if flip_axis is not None:
        labels, logits = np.flip(labels, flip_axis), np.flip(logits, flip_axis + 1)
    e = np.exp(logits - logits.max(0))
    ours = e / e.sum(0)
    assert len(np.unique(seg)) >= 2, "the oracle's output must not be trivial"
    return {"agree": float((labels == seg).mean()), "max_dprob": float(np.abs(ours - probs).max())}


PLAN = {"patch": (16, 32, 32), "spacing": (2.0, 1.5, 1.5)}


def _assert_parity(result: dict[str, float]) -> None:
    assert result["agree"] >= 0.999, result
    assert result["max_dprob"] <= 0.01, result


def test_two_folds_with_mirroring(tmp_path: Path) -> None:
    _assert_parity(compare(tmp_path, phantom((24, 44, 40)), (2.5, 1.2, 1.2), nm.plans(**PLAN),
                           folds=2, mirror=(0, 1, 2)))


def test_non_square_pixels_and_odd_sizes(tmp_path: Path) -> None:
    # 0.9 x 0.7 mm pixels; 37 x 53 is not divisible by the network's pooling (4)
    _assert_parity(compare(tmp_path, phantom((19, 37, 53)), (2.2, 0.9, 0.7), nm.plans(**PLAN)))


def test_anisotropic_5mm_slices(tmp_path: Path) -> None:
    # 5 mm over 0.8 mm: resampled with the coarse axis separate (order 0), as nnU-Net does
    _assert_parity(compare(tmp_path, phantom((10, 56, 48)), (5.0, 0.8, 0.8), nm.plans(**PLAN)))


def test_volume_smaller_than_the_patch(tmp_path: Path) -> None:
    _assert_parity(compare(tmp_path, phantom((6, 20, 18)), (2.0, 1.5, 1.5), nm.plans(**PLAN)))


def test_stored_the_other_way_round(tmp_path: Path) -> None:
    # rows running toward anterior (RAS-style storage) instead of posterior: the node
    # flips back to the network's axes and the mask onto the stored order
    _assert_parity(compare(tmp_path, phantom((20, 40, 36)), (2.5, 1.2, 1.2), nm.plans(**PLAN),
                           flip_axis=1))


def test_transposed_network_axes(tmp_path: Path) -> None:
    plan = nm.plans(patch=(32, 16, 32), spacing=(1.5, 2.0, 1.5), transpose_forward=(2, 0, 1))
    _assert_parity(compare(tmp_path, phantom((20, 40, 36)), (2.5, 1.2, 1.2), plan))


def test_oblique_series(tmp_path: Path) -> None:
    # 20 degrees off axial: nnU-Net does not reorient, nor does the node beyond the nearest
    # axes (the package allows oblique volumes, as an nnU-Net import does)
    _assert_parity(compare(tmp_path, phantom((20, 40, 36)), (2.5, 1.2, 1.2), nm.plans(**PLAN),
                           tilt_deg=20.0))


def test_mr_zscore_inside_the_nonzero_mask(tmp_path: Path) -> None:
    volume = phantom((20, 44, 40))
    volume[volume < -500] = 0.0  # MR-like: background exactly 0, cropped away by nnU-Net
    volume[volume != 0] += 900.0
    plan = nm.plans(**PLAN, normalization="ZScoreNormalization", use_mask_for_norm=True)
    _assert_parity(compare(tmp_path, volume, (2.5, 1.2, 1.2), plan))


def test_environment_keeps_torch_pinned() -> None:
    assert torch.__version__.startswith("2.13.0"), torch.__version__
    assert os.environ.get("nnUNet_results")

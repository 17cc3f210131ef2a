"""The node's sliding-window runtime against MONAI's own transforms and inferer.

MONAI runs its bundle-style pipeline (``Orientationd(RAS)``, ``Spacingd`` bilinear,
``ScaleIntensityRanged``, ``sliding_window_inference``, ``Activationsd`` softmax,
``Invertd`` back to the input) on a ``MetaTensor`` carrying the volume's RAS affine; the
node runs the same network exported to ONNX in a format 2 package with MONAI's
conventions (``corner`` grid, MONAI tiling and Gaussian, resampling probabilities back)
on the same volume with its LPS affine. Labels must agree on >= 99.9 % of voxels and the
probabilities within 0.01.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_parity_nnunet import axial_affine, phantom  # noqa: E402

from dicomnode.inference.sliding import SlidingWindowModel  # noqa: E402
from dicomnode.modelpkg.write import write_format2_package  # noqa: E402

pytestmark = pytest.mark.slow

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _network(batch: int, roi: tuple[int, int, int]) -> tuple[Any, bytes]:
    from monai.networks.nets import UNet

    torch.manual_seed(7)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32),
               strides=(2, 2), num_res_units=1).eval()
    from dicomnode.training.export import export_static

    return net, export_static(net, (batch, 1, *roi))


def _document(pixdim: tuple[float, ...], roi: tuple[int, ...], overlap: float, mode: str,
              batch: int, axcodes: str) -> dict[str, Any]:
    return {
        "name": "monai-parity", "version": "1", "task": "segmentation",
        "input": {
            "kind": "volume", "name": "input", "modality": ["CT"], "axes": axcodes,
            "spacing_mm": list(pixdim),
            "resample": {"grid": "corner", "order": 1, "anisotropic_order": -1},
            "normalize_stage": "after_resample",
            "normalization": [{"kind": "scale_range", "a_min": -1000.0, "a_max": 1000.0,
                               "b_min": 0.0, "b_max": 1.0, "clip": True}],
        },
        "inference": {
            "mode": "sliding_window", "patch": list(roi), "batch": batch,
            "tiling": {"flavour": "monai", "overlap": overlap},
            "blend": {"kind": mode, "flavour": "monai", "sigma_scale": 0.125},
            "pad": {"mode": "constant", "value": 0.0, "space": "normalized"},
        },
        "outputs": {
            "name": "logits", "kind": "logits", "activation": "softmax",
            "resample_back": "probabilities",
            "back_order": {"order": 1, "anisotropic_order": -1},
            "labels": [{"number": v, "name": f"Structure {v}",
                        "category": {"scheme": "SCT", "value": "91723000",
                                     "meaning": "Anatomical Structure"},
                        "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                        "color": [200, 100, 50]} for v in (1, 2)],
        },
    }


def compare(tmp_path: Path, volume: np.ndarray, lps_affine: np.ndarray, *,
            pixdim: tuple[float, float, float] = (1.5, 1.5, 2.0),
            roi: tuple[int, int, int] = (32, 32, 16), overlap: float = 0.5,
            mode: str = "gaussian", batch: int = 2, axcodes: str = "RAS") -> dict[str, float]:
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    net, onnx = _network(batch, roi)
    data = {"image": MetaTensor(torch.from_numpy(volume.copy()),
                                affine=torch.from_numpy(LPS_TO_RAS @ lps_affine))}
    pre = Compose([
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        Orientationd("image", axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=pixdim, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
    ])
    d = pre(data)
    with torch.no_grad():
        d["pred"] = sliding_window_inference(
            d["image"][None], roi, batch, net, overlap=overlap, mode=mode, sigma_scale=0.125,
            padding_mode="constant", cval=0.0)[0]
    post = Compose([Activationsd("pred", softmax=True),
                    Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)])
    probs = np.asarray(post(d)["pred"])

    pkg = write_format2_package(tmp_path / "pkg", {"model.onnx": onnx},
                                _document(pixdim, roi, overlap, mode, batch, axcodes))
    out = SlidingWindowModel.load(pkg).run(volume, lps_affine, keep_logits=True)
    assert out.logits is not None and out.labels.shape == volume.shape
    labels = probs.argmax(0)
    assert len(np.unique(labels)) >= 2, "the oracle's output must not be trivial"
    return {"agree": float((out.labels == labels).mean()),
            "max_dprob": float(np.abs(out.logits - probs).max())}


def _assert_parity(result: dict[str, float]) -> None:
    assert result["agree"] >= 0.999, result
    assert result["max_dprob"] <= 0.01, result


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_bundle_pipeline(tmp_path: Path, mode: str) -> None:
    _assert_parity(compare(tmp_path, phantom((24, 56, 48)), axial_affine((2.5, 0.9, 0.8)),
                           mode=mode))


def test_anisotropic_5mm_slices_and_non_square_pixels(tmp_path: Path) -> None:
    _assert_parity(compare(tmp_path, phantom((10, 60, 50)), axial_affine((5.0, 0.8, 0.7))))


def test_volume_smaller_than_the_roi(tmp_path: Path) -> None:
    _assert_parity(compare(tmp_path, phantom((6, 18, 20)), axial_affine((2.0, 1.5, 1.5))))


def test_lps_declared_orientation(tmp_path: Path) -> None:
    # Decathlon-trained bundles need LPS on DICOM input (Project-MONAI/model-zoo#766)
    _assert_parity(compare(tmp_path, phantom((16, 40, 36)), axial_affine((2.5, 1.2, 1.2)),
                           axcodes="LPS"))


def test_odd_sizes_and_sizes_not_divisible_by_pooling(tmp_path: Path) -> None:
    _assert_parity(compare(tmp_path, phantom((13, 41, 37)), axial_affine((2.5, 1.1, 0.9)),
                           overlap=0.25))

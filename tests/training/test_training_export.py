"""U-Net → ONNX: ONNX Runtime reproduces PyTorch; the package loads; parity failures are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import ModelError
from dicomnode.inference.runtime import OnnxModel
from dicomnode.modelpkg.format1 import Code, InputContract, Label, Normalization, load_model_package
from dicomnode.training import export
from dicomnode.training.unet import UNet2d

LABELS = [
    Label(
        1,
        "Lesion",
        Code("SCT", "49755003", "Morphologically abnormal structure"),
        Code("SCT", "108369006", "Neoplasm"),
        (255, 64, 64),
        0.5,
    )
]
CONTRACT = InputContract(
    "image",
    "CT",
    "axial",
    "NCHW",
    (1.5, 1.5),
    None,
    4,
    4,
    Normalization("window", 40.0, 400.0),
    -1000.0,
)


@pytest.fixture(scope="module")
def net() -> UNet2d:
    """A random-weight U-Net whose BatchNorm statistics are not the defaults."""
    torch.manual_seed(7)
    model = UNet2d(n_labels=2, base=8, levels=3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 32, 32) * 2)
    return model.eval()


def test_onnx_runtime_matches_pytorch(net: UNet2d) -> None:
    data = export.export_onnx(net)
    x = np.random.default_rng(0).random((3, 1, 48, 40), dtype=np.float32)
    assert export.max_abs_difference(net, data, x) < 1e-4


def test_export_package_loads_and_matches_pytorch(net: UNet2d, tmp_path: Path) -> None:
    labels = [LABELS[0], Label(2, "Other", LABELS[0].category, LABELS[0].type, (0, 255, 0), 0.4)]
    pkg = export.export_package(
        net,
        tmp_path / "pkg",
        name="unet",
        version="0.1",
        contract=CONTRACT,
        labels=labels,
        provenance={"seed": 7},
    )
    assert load_model_package(tmp_path / "pkg") == pkg
    assert pkg.provenance["seed"] == 7 and pkg.provenance["parity_max_abs_diff"] < 1e-4
    assert pkg.outputs.channels == 2 and pkg.input.size_multiple == 4
    # Through the serving runtime too, at a batch and size the export never saw.
    model = OnnxModel.load(pkg)
    x = np.random.default_rng(1).random((5, 1, 36, 52), dtype=np.float32)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.run_batch(x), ref, atol=1e-4, rtol=0)


def test_export_package_parity_failure(
    net: UNet2d, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "max_abs_difference", lambda *a, **k: 0.5)
    with pytest.raises(
        ModelError, match=r"ONNX export differs from PyTorch by 0\.5 \(tolerance 0\.0001\)"
    ):
        export.export_package(
            net,
            tmp_path / "bad",
            name="unet",
            version="0.1",
            contract=CONTRACT,
            labels=LABELS * 1 + [Label(2, "B", LABELS[0].category, LABELS[0].type, (1, 2, 3))],
        )
    assert not (tmp_path / "bad").exists()


def test_export_parity_with_onnx_reference(net: UNet2d, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without onnxruntime (a train-only install) the check falls back to onnx.reference."""
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    data = export.export_onnx(net)
    x = np.random.default_rng(2).random((1, 1, 16, 16), dtype=np.float32)
    assert export.max_abs_difference(net, data, x) < 1e-4


def test_unet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="levels"):
        UNet2d(levels=1)
    assert UNet2d(levels=4).size_multiple == 8

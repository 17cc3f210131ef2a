"""``dicomnode models import-monai`` against the bundle's own inference.

Bundles are made in the test (monai_bundle.py). The main one maps every transform the
importer knows; its masks from ``monai.bundle.run`` (what ``python -m monai.bundle run``
calls: the bundle's reader, transforms, inferer, weights, Invertd, keep-largest,
SaveImaged) on held-out DICOM-derived
volumes must agree with the node's on >= 99.9 % of voxels. A bundle whose declared
orientation is wrong for DICOM input (the Decathlon problem, Project-MONAI/model-zoo#766)
is caught at import by a reference case; a bundle with a Lambda transform is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import monai_bundle as mb  # noqa: E402
from test_parity_nnunet import axial_affine, phantom  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dicomnode.cli import app  # noqa: E402
from dicomnode.errors import ImportRefused  # noqa: E402
from dicomnode.importers.monai_bundle import import_monai  # noqa: E402
from dicomnode.inference.sliding import SlidingWindowModel  # noqa: E402
from dicomnode.modelpkg.format1 import read_model_package  # noqa: E402

pytestmark = pytest.mark.slow

CHANNELS = {"0": "background", "1": "spleen", "2": "tumor"}


def test_bundle_import_matches_monai_bundle_run(tmp_path: Path) -> None:
    bundle = mb.write_bundle(tmp_path / "bundle", mb.inference_config(keep_largest=[1]),
                             channel_def=CHANNELS, network=mb.unet())
    out = tmp_path / "pkg"
    result = CliRunner().invoke(app, ["models", "import-monai", str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["golden"] and all(g["passed"] for g in report["golden"])
    assert report["max_abs_diff"][0] < 1e-3
    pkg = read_model_package(out)
    assert pkg.input.axes == "RAS" and pkg.input.spacing_mm == (1.5, 1.5, 2.0)
    assert pkg.outputs.resample_back == "probabilities"  # Invertd after the softmax
    assert pkg.outputs.postprocess[0].labels == (1,)
    assert [lb.type.value for lb in pkg.labels] == ["78961009", "108369006"]  # default codes
    # the node's registry takes it: its golden case runs again when it is activated
    data = ["--data-dir", str(tmp_path / "data")]
    assert CliRunner().invoke(app, ["db", "upgrade", *data]).exit_code == 0
    added = CliRunner().invoke(app, ["models", "add", str(out), "--activate", *data])
    assert added.exit_code == 0 and "(active)" in added.stdout, added.output

    cases = [(phantom((20, 50, 44), 3), axial_affine((2.5, 0.9, 0.8))),
             (phantom((9, 56, 48), 4), axial_affine((5.0, 0.8, 0.7)))]
    for n, (volume, affine) in enumerate(cases):
        mb.write_nifti(volume, affine, bundle / "cases" / f"case{n}.nii.gz")
    # monai.bundle.run is what `python -m monai.bundle run` calls (through python-fire,
    # which the import extra does not install)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from monai.bundle import run; run(config_file="
         "sys.argv[1], meta_file=sys.argv[2], bundle_root=sys.argv[3])",
         str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json"),
         str(bundle)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = SlidingWindowModel.load(pkg)
    for n, (volume, affine) in enumerate(cases):
        expected = mb.read_mask(bundle / "eval" / f"case{n}_seg.nii.gz")
        got = model.run(volume, affine).labels
        assert got.shape == expected.shape
        assert len(np.unique(expected)) >= 2, "the oracle's output must not be trivial"
        assert float((got == expected).mean()) >= 0.999


class SideNet(torch.nn.Module):
    """Labels bright voxels (> 0.6 after scaling, 200 HU) in the second half of network
    axis 0 only: a network that learnt which side of the body its organ is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1.0, 1.0, x.shape[2]).view(1, 1, -1, 1, 1)
        fg = 40.0 * (x - 0.6) * (ramp > 0).float() - 20.0 * (ramp <= 0).float()
        return torch.cat([torch.zeros_like(x), fg], dim=1)


def _reference(path: Path) -> np.ndarray:
    """Two bright blobs, one each side of the body; the organ is the one on the patient's
    left (columns run toward the patient's left, +x in DICOM)."""
    shape = (16, 24, 24)
    k, i, j = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    volume = np.full(shape, 40.0, np.float32)
    left = ((k - 8) ** 2 + (i - 12) ** 2 + (j - 18) ** 2) < 10
    right = ((k - 8) ** 2 + (i - 12) ** 2 + (j - 5) ** 2) < 10
    volume[left | right] = 400.0
    np.savez(path, volume=volume, affine=axial_affine((2.0, 1.5, 1.5)),
             labels=left.astype(np.uint16))
    return left


def test_wrong_declared_orientation_is_caught_by_the_reference_case(tmp_path: Path) -> None:
    # Decathlon-style: trained on LPS data labelled RAS; on true DICOM geometry "RAS" flips it
    with warnings.catch_warnings():  # TorchScript is deprecated, bundles still ship model.ts
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.trace(SideNet().eval(), torch.zeros(1, 1, 32, 32, 32))
    config = mb.inference_config(axcodes="RAS", pixdim=(1.5, 1.5, 2.0), roi=(32, 32, 32))
    bundle = mb.write_bundle(tmp_path / "bundle", config, torchscript=net, yaml_config=True,
                             channel_def={"0": "background", "1": "spleen"})
    left = _reference(tmp_path / "reference.npz")
    with pytest.raises(ImportRefused, match=r"Dice 0\.000.*with axis codes L.. it gives 1\.000"):
        import_monai(bundle, tmp_path / "wrong", reference=tmp_path / "reference.npz")
    assert not (tmp_path / "wrong").exists()

    report = import_monai(bundle, tmp_path / "pkg", axes="LPS",
                          reference=tmp_path / "reference.npz")
    pkg = read_model_package(report.package)
    assert pkg.input.axes == "LPS" and report.golden[0]["passed"]
    with np.load(tmp_path / "reference.npz") as z:
        got = SlidingWindowModel.load(pkg).run(z["volume"], z["affine"]).labels
    assert np.array_equal(got == 1, left)


def test_lambda_transform_is_refused(tmp_path: Path) -> None:
    config = mb.inference_config(extra_pre=[
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * 2"}])
    bundle = mb.write_bundle(tmp_path / "bundle", config, channel_def=CHANNELS,
                             network=mb.unet())
    with pytest.raises(ImportRefused, match="Lambdad runs arbitrary Python"):
        import_monai(bundle, tmp_path / "pkg")
    result = CliRunner().invoke(app, ["models", "import-monai", str(bundle), "--out",
                                      str(tmp_path / "pkg")])
    assert result.exit_code == 1 and "Lambdad" in result.output
    assert not (tmp_path / "pkg").exists()


def test_custom_code_in_an_expression_is_refused(tmp_path: Path) -> None:
    config = mb.inference_config()
    config["preprocessing"]["transforms"][4]["a_min"] = "$__import__('os').getpid() * 0"
    bundle = mb.write_bundle(tmp_path / "bundle", config, channel_def=CHANNELS,
                             network=mb.unet())
    with pytest.raises(ImportRefused, match="custom code in an expression"):
        import_monai(bundle, tmp_path / "pkg")

"""Small real MONAI bundles, made in the tests: metadata, inference config, weights.

:func:`write_bundle` writes a bundle laid out as the MONAI bundle specification says
(``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``, ``models/model.pt``
with ``network_def``, or ``models/model.ts``) whose inference config maps every transform
the importer knows, and whose ``run`` section is the bundle's own inference loop, so that
``python -m monai.bundle run`` predicts the NIfTI files in ``<bundle>/cases`` and writes
masks to ``<bundle>/eval``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def metadata(channel_def: dict[str, str], modality: str = "CT") -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0", "name": "test_ct_bundle", "monai_version": "1.6.1",
        "description": "a bundle made in the test",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": modality,
                                 "num_channels": 1, "spatial_shape": [32, 32, 16],
                                 "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": len(channel_def),
                                 "spatial_shape": [32, 32, 16], "dtype": "float32",
                                 "is_patch_data": True, "channel_def": channel_def}}},
    }


def inference_config(*, axcodes: str = "RAS", pixdim: tuple[float, ...] = (1.5, 1.5, 2.0),
                     roi: tuple[int, ...] = (32, 32, 16), overlap: float = 0.5,
                     mode: str = "gaussian", keep_largest: list[int] | None = None,
                     extra_pre: list[dict[str, Any]] | None = None,
                     network_def: dict[str, Any] | None = None) -> dict[str, Any]:
    pre = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": axcodes},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 1000,
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        *(extra_pre or []),
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
         "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        *([{"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
            "applied_labels": keep_largest}] if keep_largest else []),
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$@bundle_root + '/eval'",
         "output_postfix": "seg", "separate_folder": False, "resample": False,
         "print_log": False},
    ]
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": network_def or {
            "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
            "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi),
                    "sw_batch_size": 2, "overlap": overlap, "mode": mode},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # the bundle's own inference loop, as `python -m monai.bundle run` runs it
        "network": "$@network_def.eval()",
        "input_files": "$sorted(glob.glob(@bundle_root + '/cases/*.nii.gz'))",
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @input_files]",
                    "transform": "@preprocessing"},
        "run": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
            "weights_only=True))",
            "$[@postprocessing(dict(d, pred=@inferer(d['image'][None], @network)[0])) "
            "for d in @dataset]",
        ],
    }
    return config


def unet(seed: int = 7) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32),
                strides=(2, 2), num_res_units=1).eval()


def write_bundle(root: Path, config: dict[str, Any], *, channel_def: dict[str, str],
                 network: torch.nn.Module | None = None, torchscript: torch.nn.Module | None = None,
                 yaml_config: bool = False) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata(channel_def), indent=2))
    if yaml_config:
        import yaml

        (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if network is not None:
        torch.save(network.state_dict(), root / "models" / "model.pt")
    if torchscript is not None:
        with warnings.catch_warnings():  # TorchScript is deprecated; bundles still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torchscript, str(root / "models" / "model.ts"))
    return root


def write_nifti(volume: np.ndarray, lps_affine: np.ndarray, path: Path) -> None:
    """A DICOM-ordered volume (k, i, j) + LPS affine as NIfTI, as DICOM converters write it."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)),
                             LPS_TO_RAS @ lps_affine[:, [2, 1, 0, 3]]), str(path))


def read_mask(path: Path) -> np.ndarray:
    """A mask NIfTI written by the bundle, back in DICOM (k, i, j) order."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj)
    return np.rint(data).astype(np.int64).squeeze().transpose(2, 1, 0)

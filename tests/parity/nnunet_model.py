"""A small real nnU-Net v2 model folder, made in the test: plans, dataset.json, fold checkpoints.

The network is nnU-Net's own ``PlainConvUNet`` (dynamic_network_architectures) built from
the plans with fixed random weights per fold, saved in nnU-Net's checkpoint format, so
``nnUNetPredictor.initialize_from_trained_model_folder`` loads it exactly as it loads a
trained model. :func:`to_package` exports the same weights to ONNX and writes the format 2
package the node runs; the parity tests compare the two on the same volumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCH = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def plans(*, patch: tuple[int, int, int], spacing: tuple[float, float, float],
          transpose_forward: tuple[int, int, int] = (0, 1, 2),
          normalization: str = "CTNormalization",
          use_mask_for_norm: bool = False, intensity: dict[str, float] | None = None,
          features: tuple[int, ...] = (8, 16, 32)) -> dict[str, Any]:
    """A plans.json for one 3d_fullres configuration (the keys nnU-Net reads)."""
    n = len(features)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    backward = [int(i) for i in np.argsort(transpose_forward)]
    return {
        "dataset_name": "Dataset999_Parity",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity or {
            "max": 3000.0, "mean": 50.0, "median": 40.0, "min": -1024.0,
            "percentile_00_5": -900.0, "percentile_99_5": 1500.0, "std": 300.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(patch),
            "median_image_size_in_voxels": [64, 64, 64],
            "spacing": list(spacing),
            "normalization_schemes": [normalization],
            "use_mask_for_norm": [use_mask_for_norm],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                          "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                         "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": ARCH,
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": list(features),
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * n, "strides": strides,
                    "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1),
                    "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": False,
        }},
    }


def network(plan: dict[str, Any], seed: int) -> torch.nn.Module:
    """nnU-Net's own network for the plans, deep supervision off, fixed random weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plan["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                 arch["_kw_requires_import"], 1, len(LABELS),
                                 deep_supervision=False)
    with torch.no_grad():  # instance norm affine params away from identity, so they matter
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def write_model_folder(root: Path, plan: dict[str, Any], *, folds: int = 2,
                       mirroring: tuple[int, ...] = (0, 1, 2)) -> Path:
    """``Dataset999_Parity/nnUNetTrainer__nnUNetPlans__3d_fullres`` with ``folds`` folds."""
    folder = root / "Dataset999_Parity" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 4,
        "file_ending": ".nii.gz"}, indent=2))
    for f in range(folds):
        net = network(plan, seed=100 + f)
        (folder / f"fold_{f}").mkdir(exist_ok=True)
        torch.save({
            "network_weights": net.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"},
            "inference_allowed_mirroring_axes": list(mirroring),
        }, folder / f"fold_{f}" / "checkpoint_final.pth")
    return folder


def onnx_bytes(net: torch.nn.Module, batch: int, patch: tuple[int, int, int]) -> bytes:
    """The network as ONNX with the static input [batch, 1, *patch]."""
    from dicomnode.training.export import export_static

    return export_static(net, (batch, 1, *patch))

"""Build the bundled 3D demo: a small 3D U-Net for phantom lesions, run by sliding window.

::

    python -m dicomnode.training.demo3d --out /tmp/demo-lesion-3d

The shipped copy lives in ``src/dicomnode/inference/models/demo-lesion-3d/``; this
writes a format 2 volume package to ``--out`` and prints its metrics as JSON. Phantom
seeds: training 4000-4999, validation 5000-5999, held-out figures 6000-6999, the
golden case 7000; tests use 9000 and above.

What it shows: a 3D patch network as nnU-Net and MONAI deploy them, trained by our own
code (:mod:`.train3d`) on volumes prepared exactly as the runtime prepares them
(``SPL`` axes, resampled to 3 x 1.5 x 1.5 mm, CT clipped and z-scored with fixed
statistics), exported with a static patch shape and run by
:mod:`dicomnode.inference.sliding` (nnU-Net tiling with step 0.5, Gaussian blending).
The phantoms' vessels are as bright as the lesions but one to three slices thin; a 3D
network tells them apart by their extent across slices. Not a clinical model.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.modelpkg.format2 import (
    Blend,
    InferenceSpec,
    NormStep,
    Pad,
    Resample,
    Tiling,
    VolumeInput,
)
from dicomnode.modelpkg.prepare import axial_affine, prepare_volume
from dicomnode.training.data import Case, phantom_cases
from dicomnode.training.evaluate import dice
from dicomnode.training.train3d import (
    Train3dConfig,
    config_provenance,
    predict_network_grid,
    prepare_volume_case,
    train_volume,
    write_volume_package,
)

__all__ = ["DEMO3D_CONFIG", "DEMO3D_INFERENCE", "DEMO3D_NAME", "DEMO3D_SPEC",
           "build_demo3d_model", "demo3d_cases", "demo3d_document", "main"]

DEMO3D_NAME = "demo-lesion-3d"
DEMO3D_VERSION = "1.0.0"
TRAIN_SEED0, VAL_SEED0, TEST_SEED0, GOLDEN_SEED = 4000, 5000, 6000, 7000
SPACING = (3.0, 1.5, 1.5)
PATCH = (16, 64, 64)
CLIP = (-200.0, 300.0)
ZSCORE = (40.0, 100.0)
"""Fixed statistics (nnU-Net's CT scheme uses the foreground's): soft tissue at 0, the
lesion contrast (+70 HU) at 0.7 standard deviations."""
MIN_COMPONENT_MM3 = 100.0
"""Smaller components are dropped (the smallest phantom lesion has about 268 mm3)."""

DEMO3D_SPEC = VolumeInput(
    name="image",
    modality=("CT",),
    axes="SPL",
    spacing_mm=SPACING,
    resample=Resample("center", 3, 0, 3.0),
    normalization=(NormStep("clip", lower=CLIP[0], upper=CLIP[1]),
                   NormStep("zscore", mean=ZSCORE[0], std=ZSCORE[1])),
    min_slices=8,
)
DEMO3D_INFERENCE = InferenceSpec(
    mode="sliding_window",
    patch=PATCH,
    batch=4,
    tiling=Tiling("nnunet", step=0.5),
    blend=Blend("gaussian", "nnunet", 0.125),
    pad=Pad("constant", -1000.0, "real"),
    mirror_axes=(),
)
DEMO3D_CONFIG = Train3dConfig(steps=240, batch_size=4, lr=3e-3, base=8, levels=3,
                              val_every=40, patience=3, seed=0, threads=1,
                              train_patch=(16, 48, 48))
"""One thread: on the shared 2-core build machine, two OpenMP threads ran a step ten
times slower than one (each spin-waits for the other while its core is taken)."""
LABEL = {"number": 1, "name": "Lesion",
         "category": {"scheme": "SCT", "value": "49755003",
                      "meaning": "Morphologically abnormal structure"},
         "type": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"},
         "color": [64, 160, 255], "threshold": 0.5}
GOLDEN_FILE = "golden/case0.npz"
GOLDEN_MIN_DICE = 0.9
"""The runtime's Gaussian-blended windows against the network run over the whole
volume at once: they differ only near window borders (0.98 and above on the shipped
model)."""


def demo3d_document() -> dict[str, Any]:
    """The package's ``model.toml`` as a mapping (without members and provenance);
    the same conventions as :data:`DEMO3D_SPEC` and :data:`DEMO3D_INFERENCE`."""
    return {
        "name": DEMO3D_NAME, "version": DEMO3D_VERSION, "task": "segmentation",
        "description": "Demo: lesions in synthetic CT phantoms (dicomnode.dicom.phantom), "
                       "a 3D U-Net run by sliding window. Not for clinical use.",
        "input": {"kind": "volume", "name": "image", "modality": ["CT"], "axes": "SPL",
                  "spacing_mm": list(SPACING),
                  "resample": {"grid": "center", "order": 3, "anisotropic_order": 0,
                               "anisotropy_ratio": 3.0},
                  "normalize_stage": "before_resample", "min_slices": 8,
                  "normalization": [{"kind": "clip", "lower": CLIP[0], "upper": CLIP[1]},
                                    {"kind": "zscore", "mean": ZSCORE[0], "std": ZSCORE[1]}]},
        "inference": {"mode": "sliding_window", "patch": list(PATCH), "batch": 4,
                      "tiling": {"flavour": "nnunet", "step": 0.5},
                      "blend": {"kind": "gaussian", "flavour": "nnunet", "sigma_scale": 0.125},
                      "pad": {"mode": "constant", "value": -1000.0, "space": "real"},
                      "mirror_axes": []},
        "outputs": {"name": "logits", "kind": "logits", "activation": "sigmoid",
                    "resample_back": "logits", "back_order": {"order": 1,
                                                              "anisotropic_order": 0},
                    "postprocess": [{"op": "remove_small_components", "labels": [1],
                                     "min_mm3": MIN_COMPONENT_MM3}],
                    "labels": [LABEL]},
        "results": {"kinds": ["SEG", "SR"]},
        "validation": {"cases": [{"file": GOLDEN_FILE, "min_dice": GOLDEN_MIN_DICE}]},
    }


def demo3d_cases(first_seed: int, n: int) -> list[Case]:
    """``n`` phantom studies from ``first_seed`` on, varied in pixel spacing (1.2-1.8 mm),
    slice thickness (2-4 mm), noise and lesion count; all resampled to 3 x 1.5 x 1.5 mm
    by the package."""
    rng = np.random.default_rng(first_seed)
    cases = []
    for seed in range(first_seed, first_seed + n):
        spacing = float(rng.choice([1.2, 1.5, 1.5, 1.8]))
        thickness = float(rng.choice([2.0, 2.5, 3.0, 3.0, 4.0]))
        cases += phantom_cases(
            [seed],
            rows=int(round(128 * 1.5 / spacing)),
            columns=int(round(128 * 1.5 / spacing)),
            n_slices=int(round(32 * 3.0 / thickness)),
            pixel_spacing_mm=spacing,
            slice_thickness_mm=thickness,
            noise_hu=float(rng.uniform(18, 32)),
            n_lesions=int(rng.integers(1, 4)),
        )
    return cases


def _golden_case(model: torch.nn.Module) -> tuple[bytes, float]:
    """A phantom on the network's own grid (3 x 1.5 x 1.5 mm, ``SPL``) and the labels our
    network gives on it; the Dice of those labels against the phantom's truth.

    On the network grid no resampling and no reorientation separate the network's
    output from the original voxels, so the expected labels are the training code's
    own prediction, independent of the runtime that must reproduce them."""
    # small (four windows, one batch): every node start that registers the demo runs it
    case = phantom_cases([GOLDEN_SEED], pixel_spacing_mm=SPACING[1], rows=64, columns=80,
                         n_slices=20, slice_thickness_mm=SPACING[0], n_lesions=3)[0]
    prep = prepare_volume(case.volume, axial_affine(case.spacing), DEMO3D_SPEC, PATCH,
                          "constant", -1000.0, "real")
    assert prep.network_shape == case.volume.shape
    pv = prepare_volume_case(case, DEMO3D_SPEC, DEMO3D_INFERENCE, 1)
    logits = predict_network_grid(model, pv.image, pv.fill)[0][prep.unpad]
    labels = (logits >= 0.0).astype(np.uint8)
    buf = io.BytesIO()
    # whole HU (int16): the noise does not compress, and the phantom is quantised anyway
    np.savez_compressed(buf, volume=np.round(case.volume).astype(np.int16),
                        affine=axial_affine(case.spacing), labels=labels)
    return buf.getvalue(), dice(labels, case.mask)


def _heldout_dice(model: torch.nn.Module, cases: Sequence[Case]) -> float:
    """Mean per-case Dice on the network grid (the runtime's figure on the original grid
    is measured by the tests and docs/benchmarks.md)."""
    scores = []
    for case in cases:
        pv = prepare_volume_case(case, DEMO3D_SPEC, DEMO3D_INFERENCE, 1)
        pred = predict_network_grid(model, pv.image, pv.fill)[0] >= 0.0
        scores.append(dice(pred.astype(np.uint8), pv.targets[0]))
    return float(np.mean(scores))


def build_demo3d_model(out: Path | str, *, n_train: int = 24, n_val: int = 3,
                       n_test: int = 12, config: Train3dConfig = DEMO3D_CONFIG
                       ) -> tuple[Any, dict[str, Any]]:
    """Train on phantoms, write the package to ``out``; return (package, metrics)."""
    result, _ = train_volume(demo3d_cases(TRAIN_SEED0, n_train),
                             demo3d_cases(VAL_SEED0, n_val), DEMO3D_SPEC, DEMO3D_INFERENCE,
                             [LABEL["threshold"]], config)
    model = result.model
    golden, golden_truth_dice = _golden_case(model)
    metrics: dict[str, Any] = {
        "framework": f"torch {torch.__version__}",
        "data": f"phantoms seeds {TRAIN_SEED0}+{n_train} (train), {VAL_SEED0}+{n_val} (val)",
        "train_cases": n_train, "val_cases": n_val,
        "best_val_dice": round(result.best_dice, 4), "best_step": result.best_step,
        "steps_run": result.steps, "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "host": f"{platform.machine()} {torch.get_num_threads()} threads",
        "golden_truth_dice": round(golden_truth_dice, 4),
    }
    if n_test:
        metrics["heldout_cases"] = n_test
        metrics["heldout_dice"] = round(_heldout_dice(model, demo3d_cases(TEST_SEED0, n_test)),
                                        4)
    pkg = write_volume_package(model, out, demo3d_document(), DEMO3D_SPEC, DEMO3D_INFERENCE,
                               provenance={**metrics, **config_provenance(config)},
                               golden={GOLDEN_FILE: golden})
    metrics["history"] = [list(h) for h in result.history]
    return pkg, metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicomnode.training.demo3d",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=DEMO3D_CONFIG.steps)
    parser.add_argument("--train-studies", type=int, default=24)
    parser.add_argument("--threads", type=int, default=DEMO3D_CONFIG.threads)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = replace(DEMO3D_CONFIG, steps=args.steps, threads=args.threads,
                  progress=not args.quiet)
    pkg, metrics = build_demo3d_model(args.out, n_train=args.train_studies, config=cfg)
    metrics["package"] = str(args.out)
    metrics["sha256"] = pkg.sha256
    json.dump(metrics, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

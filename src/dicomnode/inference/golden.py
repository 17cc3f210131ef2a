"""Golden cases: a package proves, before it serves, that it gives its expected labels.

A format 2 package may ship ``[[validation.cases]]``: an input volume (array and LPS
affine, as the node holds volumes) and the label mask its maker's own tool produced on
it (nnU-Net's predictor, the bundle's inference, our training code). The node runs each
case through its own runtime when a package is added or activated, and refuses to put it
into service below ``min_dice`` for any label, naming the Dice it got. A wrong declared
orientation, spacing order or normalisation shows here, at activation, not in a
radiologist's viewer (the top complaint of deployed nnU-Net and MONAI models, e.g.
Project-MONAI/model-zoo#766).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ModelError, ModelLoadError
from dicomnode.inference.runtime import RuntimeOptions, load_runner
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.modelpkg.format2 import ModelPackage2

__all__ = ["dice_per_label", "golden_validator", "run_golden_cases"]


def dice_per_label(expected: np.ndarray, got: np.ndarray) -> dict[int, float]:
    """Dice of every label present in either mask (1.0 for a label absent from both)."""
    out = {}
    for label in sorted(set(np.unique(expected).tolist()) | set(np.unique(got).tolist())):
        if label == 0:
            continue
        a, b = expected == label, got == label
        denom = int(a.sum()) + int(b.sum())
        out[int(label)] = 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


def _load_case(pkg: ModelPackage2, file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(io.BytesIO((pkg.source / file).read_bytes())) as z:
            return (np.asarray(z["volume"], np.float32), np.asarray(z["affine"], np.float64),
                    np.asarray(z["labels"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{file}: not a golden case (volume, affine, labels): "
                             f"{type(exc).__name__} (package: {pkg.source})") from None


def run_golden_cases(path: Path | str, options: RuntimeOptions | None = None,
                     memory_budget_mb: float | None = None) -> list[dict[str, Any]]:
    """Run the package's golden cases; one result per case (file, dice per label, min_dice,
    passed). A format 1 package, or one without cases, gives [].

    Raises
    ------
    ModelLoadError, ModelError
        The package or a case cannot be read or run.
    """
    pkg = read_model_package(path)
    if not isinstance(pkg, ModelPackage2) or not pkg.golden:
        return []
    runner = load_runner(pkg, options or RuntimeOptions(), memory_budget_mb)
    results = []
    for case in pkg.golden:
        volume, affine, expected = _load_case(pkg, case.file)
        got = runner.run(volume, affine).labels
        if got.shape != expected.shape:
            raise ModelError(f"{case.file}: the package gives labels of shape {got.shape}, "
                             f"the case expects {expected.shape}")
        dice = dice_per_label(expected, got)
        worst = min(dice.values()) if dice else 1.0
        results.append({"file": case.file, "dice": {str(k): round(v, 4) for k, v in dice.items()},
                        "min_dice": case.min_dice, "passed": worst >= case.min_dice})
    return results


Validator = Callable[[Path], list[dict[str, Any]]]


def golden_validator(options: RuntimeOptions | None = None,
                     memory_budget_mb: float | None = None) -> Validator:
    """A validator for :class:`~dicomnode.storage.registry.ModelRegistry`: runs the cases and
    raises :class:`~dicomnode.errors.ModelError` naming the Dice of the first that fails."""

    def validate(path: Path) -> list[dict[str, Any]]:
        results = run_golden_cases(path, options, memory_budget_mb)
        for r in results:
            if not r["passed"]:
                dice = ", ".join(f"label {k}: {v:.3f}" for k, v in r["dice"].items())
                raise ModelError(
                    f"golden case {r['file']} fails: Dice {dice} (at least {r['min_dice']} "
                    "needed); check the package's axes, spacing order and normalisation"
                )
        return results

    return validate

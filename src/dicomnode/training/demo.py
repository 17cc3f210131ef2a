"""Rebuild the bundled demo lesion model from phantoms.

::

    python -m dicomnode.training.demo --out /tmp/demo-lesion
    torchrun --nproc-per-node=2 -m dicomnode.training.demo --out /tmp/demo-lesion

The shipped copy lives in ``src/dicomnode/inference/models/demo-lesion/``; this
writes a package to ``--out`` and prints its metrics as JSON on stdout. Seeds:
training phantoms 1000-1999, validation 2000-2999, the held-out figures in
docs/benchmarks.md 3000-3999; tests use 9000 and above.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.modelpkg.format1 import (
    Code,
    InputContract,
    Label,
    ModelPackage,
    Normalization,
)
from dicomnode.modelpkg.grid import from_model_grid, plan_geometry
from dicomnode.training.data import Case, phantom_cases, prepare_cases
from dicomnode.training.evaluate import dice
from dicomnode.training.train import TrainConfig, TrainResult, train_package

__all__ = ["DEMO_CONFIG", "DEMO_CONTRACT", "DEMO_LABEL", "build_demo_model", "demo_cases", "main"]

DEMO_NAME = "demo-lesion"
DEMO_VERSION = "1.0.0"
DEMO_LABEL = Label(
    number=1,
    name="Lesion",
    category=Code("SCT", "49755003", "Morphologically abnormal structure"),
    type=Code("SCT", "108369006", "Neoplasm"),
    color=(255, 64, 64),
    threshold=0.5,
)
DEMO_CONTRACT = InputContract(
    name="image",
    modality="CT",
    orientation="axial",
    layout="NCHW",
    spacing_mm=(1.5, 1.5),
    size=None,
    size_multiple=4,
    batch_size=8,
    normalization=Normalization("window", center=40.0, width=400.0),
    pad_value=-1000.0,
)
DEMO_CONFIG = TrainConfig(
    steps=1500,
    batch_size=16,
    lr=3e-3,
    patch=64,
    base=16,
    levels=3,
    val_every=50,
    patience=4,
    seed=0,
    threads=2,
)
DEMO_MIN_COMPONENT_MM3 = 100.0
"""Smaller components are dropped: specks along vessels. The smallest phantom lesion
(semi-axes 4 mm) has 268 mm3."""
TRAIN_SEED0, VAL_SEED0, TEST_SEED0 = 1000, 2000, 3000


def demo_cases(first_seed: int, n: int) -> list[Case]:
    """``n`` phantom studies from ``first_seed`` on, with varied noise, spacing and lesion count.

    Variety in pixel spacing (1.2-1.8 mm, resampled to 1.5 mm by the contract) and
    noise keeps the model from fitting one exact phantom.
    """
    rng = np.random.default_rng(first_seed)
    cases = []
    for seed in range(first_seed, first_seed + n):
        spacing = float(rng.choice([1.2, 1.5, 1.5, 1.8]))
        size = int(round(128 * 1.5 / spacing / 4) * 4)
        cases += phantom_cases(
            [seed],
            rows=size,
            columns=size,
            pixel_spacing_mm=spacing,
            noise_hu=float(rng.uniform(18, 32)),
            n_lesions=int(rng.integers(1, 4)),
        )
    return cases


def _torch_dice(result: TrainResult, cases: Sequence[Case]) -> float:
    """Mean per-case Dice of the trained network, through the contract's preprocessing."""
    scores = []
    prepared = prepare_cases(cases, DEMO_CONTRACT, 1)
    with torch.inference_mode():
        for case, img in zip(cases, prepared.images, strict=True):
            logits = torch.cat(
                [
                    result.model(torch.from_numpy(img[k : k + 16, None]))
                    for k in range(0, len(img), 16)
                ]
            )
            prob = torch.sigmoid(logits).numpy()
            geom = plan_geometry(DEMO_CONTRACT, case.volume.shape[1:], case.spacing[1:])  # type: ignore[arg-type]
            pred = (from_model_grid(prob, geom)[:, 0] >= DEMO_LABEL.threshold).astype(np.uint8)
            scores.append(dice(pred, case.mask))
    return float(np.mean(scores))


def build_demo_model(
    out: Path | str,
    *,
    n_train: int = 32,
    n_val: int = 6,
    n_test: int = 16,
    config: TrainConfig = DEMO_CONFIG,
    work_dir: Path | str | None = None,
) -> tuple[ModelPackage | None, dict[str, Any]]:
    """Train the demo model on phantoms and write its package to ``out``.

    Returns
    -------
    (package, metrics)
        package is None on ranks other than 0 under torchrun. metrics include the
        held-out Dice of the PyTorch network on ``n_test`` fresh phantoms (seeds
        3000 on); the serving runtime's figure is measured by ``bench/inference.py``.
    """
    train_cases = demo_cases(TRAIN_SEED0, n_train)
    val_cases = demo_cases(VAL_SEED0, n_val)
    pkg, result = train_package(
        train_cases,
        val_cases,
        out,
        name=DEMO_NAME,
        version=DEMO_VERSION,
        contract=DEMO_CONTRACT,
        labels=[DEMO_LABEL],
        config=config,
        work_dir=work_dir,
        min_component_mm3=DEMO_MIN_COMPONENT_MM3,
        description=(
            "Demo: lesions in synthetic CT phantoms (dicomnode.dicom.phantom). "
            "Not for clinical use."
        ),
        provenance={
            "data": f"phantoms seeds {TRAIN_SEED0}+{n_train} (train), {VAL_SEED0}+{n_val} (val)",
            "host": f"{platform.machine()} {torch.get_num_threads()} threads",
        },
    )
    metrics: dict[str, Any] = {
        "best_val_dice": round(result.best_dice, 4),
        "best_step": result.best_step,
        "steps_run": result.steps,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "world_size": result.world_size,
        "seed": config.seed,
        "history": [list(h) for h in result.history],
    }
    if pkg is not None and n_test:
        metrics["heldout_torch_dice"] = round(
            _torch_dice(result, demo_cases(TEST_SEED0, n_test)), 4
        )
    return pkg, metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dicomnode.training.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="package directory to write")
    parser.add_argument("--seed", type=int, default=DEMO_CONFIG.seed)
    parser.add_argument("--steps", type=int, default=DEMO_CONFIG.steps)
    parser.add_argument("--train-studies", type=int, default=32)
    parser.add_argument("--val-studies", type=int, default=6)
    parser.add_argument("--test-studies", type=int, default=16)
    parser.add_argument("--threads", type=int, default=DEMO_CONFIG.threads)
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    cfg = replace(
        DEMO_CONFIG, seed=args.seed, steps=args.steps, threads=args.threads, progress=not args.quiet
    )
    pkg, metrics = build_demo_model(
        args.out,
        n_train=args.train_studies,
        n_val=args.val_studies,
        n_test=args.test_studies,
        config=cfg,
        work_dir=args.work_dir,
    )
    if pkg is not None:
        metrics["package"] = str(args.out)
        metrics["sha256"] = pkg.sha256
        json.dump(metrics, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training: data preparation, a short run that learns, determinism, export, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.inference.runtime import OnnxModel
from dicomnode.modelpkg.format1 import Code, InputContract, Label, Normalization, load_model_package
from dicomnode.training.data import Case, PatchDataset, phantom_cases, prepare_cases
from dicomnode.training.evaluate import dice, evaluate
from dicomnode.training.train import TrainConfig, load_checkpoint, train, train_package
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
    8,
    Normalization("window", 40.0, 400.0),
    -1000.0,
)
# Small phantoms: 12 slices of 64 x 64 at 1.5 mm, lesions of 5-9 mm radius.
SPEC = {"n_slices": 12, "rows": 64, "columns": 64, "lesion_radius_mm": (5.0, 9.0), "n_vessels": 3}
TINY = TrainConfig(
    steps=60,
    batch_size=8,
    lr=5e-3,
    patch=32,
    base=8,
    levels=3,
    val_every=20,
    patience=10,
    seed=0,
    threads=2,
    progress=False,
)


@pytest.fixture(scope="module")
def cases() -> tuple[list[Case], list[Case]]:
    return phantom_cases(range(100, 106), **SPEC), phantom_cases(range(200, 202), **SPEC)


def _torch_dice(model: UNet2d, cases: list[Case]) -> float:
    prepared = prepare_cases(cases, CONTRACT, 1)
    with torch.inference_mode():
        scores = [
            dice(
                (torch.sigmoid(model(torch.from_numpy(img[:, None]))) >= 0.5)
                .numpy()[:, 0]
                .astype(np.uint8),
                tgt[:, 0],
            )
            for img, tgt in zip(prepared.images, prepared.targets, strict=True)
        ]
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny")
    pkg, result = train_package(
        cases[0],
        cases[1],
        out / "pkg",
        name="tiny-unet",
        version="0.0.1",
        contract=CONTRACT,
        labels=LABELS,
        config=TINY,
        work_dir=out / "work",
    )
    return pkg, result, out


def test_case_validation() -> None:
    with pytest.raises(ValueError, match="must be the same"):
        Case(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        Case(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), np.uint8), (1.0, 0.0, 1.0))


def test_prepare_cases_resamples_like_the_runtime() -> None:
    vol = np.full((2, 40, 30), -1000.0, np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    vol[:, 10:30, 10:20], mask[:, 10:30, 10:20] = 100.0, 1
    prepared = prepare_cases([Case(vol, mask, (3.0, 0.75, 0.75), "c")], CONTRACT, 1)
    img, tgt = prepared.images[0], prepared.targets[0]
    assert img.shape == (2, 20, 16) and tgt.shape == (2, 1, 20, 16)  # 20 x 15 → padded to 16
    assert img.min() == 0.0 and img.max() == pytest.approx(0.65)  # window 40/400
    assert tgt.sum() == 2 * 10 * 5
    assert prepared.fill == (0.0,)
    with pytest.raises(ValueError, match="label 1 in the mask, the model has 0"):
        prepare_cases([Case(vol, mask, (3.0, 0.75, 0.75), "c")], CONTRACT, 0)


def test_patch_dataset_is_deterministic(cases) -> None:
    ds = PatchDataset(prepare_cases(cases[0][:2], CONTRACT, 1), patch=32, seed=3, fg_oversample=3)
    n_fg = sum(int(t.reshape(len(t), -1).any(1).sum()) for t in ds.data.targets)
    assert len(ds) == 2 * 12 + 2 * n_fg
    a_img, a_tgt = ds[5]
    b_img, b_tgt = ds[5]
    assert a_img.shape == (1, 32, 32) and a_tgt.shape == (1, 32, 32)
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a_img)


def test_short_training_improves_dice(cases, trained) -> None:
    torch.manual_seed(TINY.seed)
    untrained = UNet2d(1, TINY.base, TINY.levels).eval()
    before = _torch_dice(untrained, cases[1])
    pkg, result, _ = trained
    after = _torch_dice(result.model, cases[1])
    assert after > before + 0.3, (before, after)
    assert result.best_dice == pytest.approx(max(h[2] for h in result.history))
    assert result.steps == TINY.steps and result.world_size == 1
    assert [h[0] for h in result.history] == [20, 40, 60]


def test_trained_package_loads_and_matches_pytorch(cases, trained) -> None:
    pkg, result, out = trained
    assert load_model_package(out / "pkg") == pkg
    assert pkg.provenance["best_val_dice"] == round(result.best_dice, 4)
    assert pkg.provenance["config_steps"] == TINY.steps
    model = OnnxModel.load(pkg)
    x = prepare_cases(cases[1][:1], CONTRACT, 1).images[0][:, None]
    with torch.inference_mode():
        ref = result.model(torch.from_numpy(x)).numpy()
    assert np.abs(model.run_batch(x) - ref).max() < 1e-4
    # The runtime's Dice is the PyTorch Dice (same preprocessing, same network).
    ev = evaluate(cases[1], model.predict_mask)
    assert ev.mean[1] == pytest.approx(_torch_dice(result.model, cases[1]), abs=0.02)


def test_checkpoint_holds_the_best_model(trained) -> None:
    _, result, out = trained
    restored = load_checkpoint(out / "work" / "best.pt")
    for a, b in zip(
        restored.state_dict().values(), result.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_training_is_deterministic(cases) -> None:
    cfg = replace(TINY, steps=6, val_every=3)
    a = train(cases[0][:2], cases[1][:1], CONTRACT, LABELS, cfg)
    b = train(cases[0][:2], cases[1][:1], CONTRACT, LABELS, cfg)
    assert a.history == b.history
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_train_rejects_bad_patch(cases) -> None:
    with pytest.raises(ValueError, match="patch 30 is not a multiple of 4"):
        train(cases[0][:1], cases[1][:1], CONTRACT, LABELS, replace(TINY, patch=30))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    """The same entry point under torchrun: DDP on gloo, rank 0 writes the package."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "dicomnode.training.demo",
            "--out",
            str(tmp_path / "pkg"),
            "--steps",
            "4",
            "--train-studies",
            "2",
            "--val-studies",
            "2",
            "--test-studies",
            "0",
            "--threads",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(res.stdout)
    assert metrics["world_size"] == 2 and metrics["steps_run"] == 4
    assert load_model_package(tmp_path / "pkg").provenance["world_size"] == 2

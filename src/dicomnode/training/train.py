"""The training loop: single process on CPU, or DistributedDataParallel under ``torchrun``.

The same code runs both ways. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) :func:`train` joins the process group from the environment (NCCL
on GPUs, gloo on CPU), shards batches with a :class:`DistributedSampler`,
all-reduces validation counts so that every rank takes the same early-stopping
decision, and writes checkpoints (and, in :func:`train_package`, the package)
on rank 0 only::

    torchrun --nproc-per-node=gpu -m dicomnode.training.demo --out /tmp/demo-lesion

Loss: binary cross-entropy + soft Dice, one sigmoid channel per label.
Early stopping on the validation Dice (pooled over all validation voxels, mean
over labels), evaluated every ``val_every`` steps on the network grid.
Determinism: seeded (torch, numpy streams per item); bit-identical on CPU, and
on GPU as far as cuDNN's deterministic mode goes.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dicomnode.modelpkg.format1 import InputContract, Label, ModelPackage
from dicomnode.training.data import Case, PatchDataset, PreparedCases, prepare_cases
from dicomnode.training.unet import UNet2d, UNet3d

__all__ = ["TrainConfig", "TrainResult", "train", "train_package"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; every field is recorded in the package's provenance."""

    steps: int = 600
    """Maximum optimiser steps."""
    batch_size: int = 16
    """Patches per step *per process*."""
    lr: float = 3e-3
    """Adam learning rate, cosine-decayed to 5 % over ``steps``."""
    patch: int = 64
    base: int = 16
    """U-Net channels at full resolution."""
    levels: int = 3
    val_every: int = 50
    patience: int = 4
    """Stop after this many validations without an improvement of ``min_delta``."""
    min_delta: float = 1e-3
    seed: int = 0
    fg_oversample: int = 3
    threads: int | None = None
    """torch.set_num_threads on CPU; None = leave torch's default."""
    progress: bool = True
    """A progress line on stderr (rank 0 only)."""


@dataclass(frozen=True)
class TrainResult:
    """Metrics of one run; ``model`` holds the best weights (on the CPU, eval mode)."""

    best_dice: float
    best_step: int
    steps: int
    stopped_early: bool
    seconds: float
    world_size: int
    history: tuple[tuple[int, float, float], ...]
    """(step, mean training loss since the previous validation, validation Dice)."""
    checkpoint: Path | None
    model: UNet2d | UNet3d = field(repr=False)


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """Join the process group torchrun describes in the environment, if any."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        owns = False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    else:
        local = 0
        return _Dist(0, 1, torch.device(f"cuda:{local}" if cuda else "cpu"), False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns)


class _Progress:
    """One updating line on stderr (tqdm is not a dependency)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, loss: float, best: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (now - self.last < (0.5 if self.tty else 15.0)):
            return
        self.last = now
        bar = "#" * int(20 * step / self.total)
        line = (
            f"train [{bar:<20}] step {step}/{self.total} loss {loss:.4f} "
            f"best val dice {best:.4f} {now - self.t0:.0f}s"
        )
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dims = (0, *range(2, logits.ndim))  # 2D slices and 3D patches alike
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1 - dice).mean()


@torch.no_grad()
def _validate(
    model: torch.nn.Module, val: PreparedCases, ctx: _Dist, thresholds: Sequence[float]
) -> float:
    """Pooled Dice per label over this rank's share of cases, all-reduced; mean over labels."""
    model.eval()
    n_labels = val.n_labels
    counts = torch.zeros(3, n_labels, dtype=torch.float64, device=ctx.device)
    thr = torch.tensor(list(thresholds), dtype=torch.float32, device=ctx.device)[
        None, :, None, None
    ]
    for c in range(ctx.rank, len(val.images), ctx.world):
        img, tgt = val.images[c], val.targets[c]
        for k in range(0, len(img), 16):
            x = torch.from_numpy(img[k : k + 16, None]).to(ctx.device)
            t = torch.from_numpy(tgt[k : k + 16]).to(ctx.device).bool()
            pred = torch.sigmoid(model(x)) >= thr
            counts[0] += (pred & t).sum((0, 2, 3))
            counts[1] += pred.sum((0, 2, 3))
            counts[2] += t.sum((0, 2, 3))
    if ctx.world > 1:
        dist.all_reduce(counts)
    model.train()
    denom = counts[1] + counts[2]
    dice = torch.where(denom > 0, 2 * counts[0] / denom.clamp(min=1), torch.ones_like(denom))
    return float(dice.mean())


def train(
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    contract: InputContract,
    labels: Sequence[Label],
    config: TrainConfig | None = None,
    work_dir: Path | str | None = None,
) -> TrainResult:
    """Train a :class:`UNet2d` on the cases, early-stopping on validation Dice.

    Parameters
    ----------
    train_cases, val_cases
        Labelled volumes; masks hold label numbers 1..len(labels).
    contract
        The input contract the model will be served with (spacing, normalisation,
        size multiple); slices are prepared with it.
    labels
        The output labels, in channel order (their thresholds are used for validation).
    config
        Hyper-parameters; defaults to ``TrainConfig()``.
    work_dir
        Where rank 0 writes ``best.pt`` (state dict + config); None = no checkpoint file.

    Returns
    -------
    TrainResult
        Metrics and the best model. Under torchrun every rank returns the same;
        the process group joined here is left to the caller (:func:`train_package`
        destroys one it did not find).

    Raises
    ------
    ValueError
        No cases, a patch that is not a multiple of the network's size multiple,
        or a contract whose ``size_multiple`` the network cannot honour.
    """
    cfg = config or TrainConfig()
    probe = UNet2d(len(labels), cfg.base, cfg.levels)
    if cfg.patch % probe.size_multiple:
        raise ValueError(f"patch {cfg.patch} is not a multiple of {probe.size_multiple}")
    if contract.size is None and contract.size_multiple % probe.size_multiple:
        raise ValueError(
            f"contract size_multiple {contract.size_multiple} must be a multiple of "
            f"{probe.size_multiple}"
        )
    if not val_cases:
        raise ValueError("no validation cases")
    t0 = time.perf_counter()
    ctx = _init_distributed()
    if cfg.threads and ctx.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    train_data = prepare_cases(train_cases, contract, len(labels))
    val_data = prepare_cases(val_cases, contract, len(labels))
    dataset = PatchDataset(train_data, cfg.patch, cfg.seed, cfg.fg_oversample)
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=0
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} training slices make no batch of {cfg.batch_size} per process"
        )

    model = UNet2d(len(labels), cfg.base, cfg.levels).to(ctx.device)
    net: torch.nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=False,
        )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    thresholds = [lb.threshold for lb in labels]
    best, best_step, bad, step, epoch = -1.0, 0, 0, 0, 0
    best_state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())
    history: list[tuple[int, float, float]] = []
    losses: list[float] = []
    checkpoint = Path(work_dir) / "best.pt" if work_dir is not None else None
    if checkpoint is not None and ctx.is_main:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress(cfg.steps, cfg.progress and ctx.is_main)
    stop = False
    net.train()
    while not stop and step < cfg.steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for img, tgt in loader:
            img, tgt = img.to(ctx.device, non_blocking=True), tgt.to(ctx.device, non_blocking=True)
            loss = _loss(net(img), tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % cfg.val_every == 0 or step == cfg.steps:
                dice = _validate(model, val_data, ctx, thresholds)
                history.append((step, float(np.mean(losses)), dice))
                losses = []
                if dice > best + cfg.min_delta:
                    best, best_step, bad = dice, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                    if checkpoint is not None and ctx.is_main:
                        torch.save(
                            {
                                "model": best_state,
                                "config": asdict(cfg),
                                "n_labels": len(labels),
                                "step": step,
                                "dice": dice,
                            },
                            checkpoint,
                        )
                else:
                    bad += 1
                    stop = bad >= cfg.patience
                progress.update(step, history[-1][1], best, force=True)
            else:
                progress.update(step, losses[-1], max(best, 0.0))
            if stop or step >= cfg.steps:
                break
        epoch += 1
    progress.close()
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    return TrainResult(
        best_dice=best,
        best_step=best_step,
        steps=step,
        stopped_early=stop,
        seconds=time.perf_counter() - t0,
        world_size=ctx.world,
        history=tuple(history),
        checkpoint=checkpoint if ctx.is_main else None,
        model=model,
    )


def load_checkpoint(path: Path | str) -> UNet2d:
    """The model saved in ``best.pt`` by :func:`train` (CPU, eval mode)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = UNet2d(int(ckpt["n_labels"]), int(cfg["base"]), int(cfg["levels"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def train_package(
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    contract: InputContract,
    labels: Sequence[Label],
    config: TrainConfig | None = None,
    work_dir: Path | str | None = None,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
    min_component_mm3: float = 0.0,
) -> tuple[ModelPackage | None, TrainResult]:
    """Train on (volume, mask, spacing) cases and write a model package to ``out_dir``.

    The package is exported, parity-checked against PyTorch and re-loaded by rank 0
    (``min_component_mm3`` goes to its ``outputs``);
    other ranks get None for it. The process group, if this call created it, is
    destroyed before returning.

    Returns
    -------
    (package, result)

    Raises
    ------
    ValueError
        As :func:`train`.
    ModelError
        The export fails its parity check.
    """
    from dicomnode.training.export import export_package  # export needs onnx: only now

    cfg = config or TrainConfig()
    joined_before = dist.is_available() and dist.is_initialized()
    pkg = None
    try:
        result = train(train_cases, val_cases, contract, labels, cfg, work_dir)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            sample = prepare_cases(list(val_cases)[:1], contract, len(labels)).images[0][:4, None]
            prov: dict[str, Any] = {
                "framework": f"torch {torch.__version__}",
                "train_cases": len(train_cases),
                "val_cases": len(val_cases),
                "best_val_dice": round(result.best_dice, 4),
                "best_step": result.best_step,
                "steps_run": result.steps,
                "train_seconds": round(result.seconds, 1),
                "world_size": result.world_size,
                **{f"config_{k}": v for k, v in asdict(cfg).items() if v is not None},
                **dict(provenance or {}),
            }
            pkg = export_package(
                result.model,
                out_dir,
                name=name,
                version=version,
                contract=contract,
                labels=labels,
                description=description,
                provenance=prov,
                sample=sample,
                min_component_mm3=min_component_mm3,
            )
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return pkg, result

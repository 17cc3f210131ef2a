"""Training a 3D patch network for a format 2 volume package, and writing the package.

The 2D loop (:mod:`.train`) feeds slices prepared by a format 1 contract. A format 2
volume package names its whole preparation (axes, spacing, resampling, normalisation,
padding: :class:`~dicomnode.modelpkg.format2.VolumeInput`), and the runtime
(:mod:`dicomnode.inference.sliding`) runs exactly that; here every case goes through the
same :func:`~dicomnode.modelpkg.prepare.prepare_volume`, so the network sees in training
what it will see when served. Label maps go through the same geometry (linear
interpolation of each label's indicator, thresholded at 0.5).

Training samples random patches of the package's patch size (a share of them centred
near a labelled voxel), with flips along every axis; validation runs the fully
convolutional network over each whole prepared validation volume and pools the Dice on
the network grid; the best step's weights are kept (early stopping as in :mod:`.train`).
Single process (CPU or one GPU). Seeded: the same cases and config give the same
weights on CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.errors import ModelError
from dicomnode.modelpkg.format2 import InferenceSpec, NormStep, Resample, VolumeInput
from dicomnode.modelpkg.normalize import normalize_value
from dicomnode.modelpkg.prepare import axial_affine, prepare_volume
from dicomnode.modelpkg.write import write_format2_package
from dicomnode.training.data import Case
from dicomnode.training.export import export_static, max_abs_difference
from dicomnode.training.train import TrainResult, _loss, _Progress
from dicomnode.training.unet import UNet3d

__all__ = [
    "PreparedVolume",
    "Train3dConfig",
    "config_provenance",
    "predict_network_grid",
    "prepare_volume_case",
    "train_volume",
    "train_volume_package",
    "write_volume_package",
]


@dataclass(frozen=True)
class Train3dConfig:
    """Hyper-parameters of :func:`train_volume`; every field goes into the provenance."""

    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-3
    """Adam, cosine-decayed to 5 % over ``steps``."""
    base: int = 8
    levels: int = 3
    val_every: int = 25
    patience: int = 4
    min_delta: float = 1e-3
    seed: int = 0
    fg_fraction: float = 0.6
    """Share of patches centred near a labelled voxel (the rest anywhere)."""
    train_patch: tuple[int, int, int] | None = None
    """Training patch size; None = the package's inference patch. The network is fully
    convolutional, so a smaller training patch (cheaper steps on CPU) serves the same."""
    threads: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class PreparedVolume:
    """A case on the network grid: (D, H, W) normalised image, (labels, D, H, W) targets."""

    image: np.ndarray
    targets: np.ndarray
    fill: float
    """The normalised padding value."""
    case_id: str


def prepare_volume_case(case: Case, spec: VolumeInput, inference: InferenceSpec,
                        n_labels: int) -> PreparedVolume:
    """The case's image and label indicators prepared as the runtime prepares a volume.

    Raises
    ------
    ValueError
        The mask holds label numbers above ``n_labels``.
    InferenceError
        The geometry is one the package refuses (oblique without ``allow_oblique``).
    """
    top = int(case.mask.max())
    if top > n_labels:
        raise ValueError(f"case {case.case_id!r}: label {top} in the mask, the model has "
                         f"{n_labels}")
    if spec.crop_to_nonzero:
        raise ValueError("training with crop_to_nonzero is not supported")
    affine = axial_affine(case.spacing)
    pad = inference.pad
    prep = prepare_volume(case.volume, affine, spec, inference.patch, pad.mode, pad.value,
                          pad.space)
    # Label indicators through the same reorientation, resampling and padding, linearly
    # interpolated and thresholded at 0.5 (as the 2D path's prepare_cases does).
    mask_spec = replace(spec, normalization=(NormStep("none"),),
                        resample=Resample(spec.resample.grid, 1, -1,
                                          spec.resample.anisotropy_ratio))
    targets = []
    for k in range(1, n_labels + 1):
        ind = (case.mask == k).astype(np.float32)
        p = prepare_volume(ind, affine, mask_spec, inference.patch, "constant", 0.0,
                           "normalized")
        targets.append(p.data[0] >= 0.5)
    if pad.mode == "constant":
        fill = pad.value if pad.space == "normalized" else normalize_value(
            pad.value, spec.normalization, case.volume)
    else:
        fill = float(prep.data.min())
    return PreparedVolume(prep.data[0], np.stack(targets).astype(np.uint8), float(fill),
                          case.case_id)


class _Patches:
    """Random (image, target) patches with flips; randomness from (seed, step)."""

    def __init__(self, cases: Sequence[PreparedVolume], patch: Sequence[int],
                 fg_fraction: float, seed: int) -> None:
        self.cases, self.patch, self.fg, self.seed = list(cases), tuple(patch), fg_fraction, seed
        self.fg_voxels = [np.argwhere(c.targets.any(axis=0)) for c in self.cases]

    def batch(self, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        xs, ts = [], []
        for _ in range(n):
            c = int(rng.integers(len(self.cases)))
            case, fg = self.cases[c], self.fg_voxels[c]
            shape = case.image.shape
            if len(fg) and rng.random() < self.fg:
                centre = fg[rng.integers(len(fg))] + rng.integers(
                    [-p // 4 for p in self.patch], [p // 4 + 1 for p in self.patch])
                start = [int(np.clip(ce - p // 2, 0, s - p))
                         for ce, p, s in zip(centre, self.patch, shape, strict=True)]
            else:
                start = [int(rng.integers(0, s - p + 1))
                         for p, s in zip(self.patch, shape, strict=True)]
            sl = tuple(slice(a, a + p) for a, p in zip(start, self.patch, strict=True))
            x, t = case.image[sl], case.targets[(slice(None), *sl)]
            for axis in range(3):
                if rng.random() < 0.5:
                    x, t = np.flip(x, axis), np.flip(t, axis + 1)
            xs.append(np.ascontiguousarray(x)[None])
            ts.append(np.ascontiguousarray(t))
        return (torch.from_numpy(np.stack(xs).astype(np.float32)),
                torch.from_numpy(np.stack(ts).astype(np.float32)))


@torch.no_grad()
def predict_network_grid(model: torch.nn.Module, image: np.ndarray, fill: float
                         ) -> np.ndarray:
    """Logits (labels, D, H, W) of the fully convolutional network over a whole prepared
    volume (padded with ``fill`` up to the network's size multiple, then cropped back)."""
    multiple = int(getattr(model, "size_multiple", 1))
    pads = [(0, (-s) % multiple) for s in image.shape]
    x = np.pad(image, pads, constant_values=np.float32(fill))
    model.eval()
    out = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None])[0].numpy()
    return out[(slice(None), *(slice(0, s) for s in image.shape))]


def _pooled_dice(model: torch.nn.Module, cases: Sequence[PreparedVolume],
                 thresholds: Sequence[float]) -> float:
    inter = np.zeros(len(thresholds))
    total = np.zeros(len(thresholds))
    for c in cases:
        logits = predict_network_grid(model, c.image, c.fill)
        for k, thr in enumerate(thresholds):
            pred = logits[k] >= math.log(thr / (1 - thr))  # sigmoid(x) >= thr
            tgt = c.targets[k].astype(bool)
            inter[k] += (pred & tgt).sum()
            total[k] += pred.sum() + tgt.sum()
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return float(dice.mean())


def train_volume(train_cases: Sequence[Case], val_cases: Sequence[Case], spec: VolumeInput,
                 inference: InferenceSpec, thresholds: Sequence[float],
                 config: Train3dConfig | None = None) -> tuple[TrainResult, list[PreparedVolume]]:
    """Train a :class:`UNet3d` on patches of ``inference.patch``; early-stop on validation
    Dice. Returns the result (best weights, CPU, eval mode) and the prepared validation
    cases.

    Raises
    ------
    ValueError
        No training or validation cases, or a patch the network cannot take.
    """
    cfg = config or Train3dConfig()
    if not train_cases or not val_cases:
        raise ValueError("need training and validation cases")
    n_labels = len(thresholds)
    probe = UNet3d(n_labels, cfg.base, cfg.levels)
    train_patch = tuple(cfg.train_patch or inference.patch)
    if any(p % probe.size_multiple for p in (*inference.patch, *train_patch)):
        raise ValueError(f"patch {list(inference.patch)} / training patch {list(train_patch)}"
                         f" is not a multiple of {probe.size_multiple} on every axis")
    if any(t > p for t, p in zip(train_patch, inference.patch, strict=True)):
        raise ValueError(f"training patch {list(train_patch)} exceeds the package's patch "
                         f"{list(inference.patch)} (volumes are padded to the latter)")
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_data = [prepare_volume_case(c, spec, inference, n_labels) for c in train_cases]
    val_data = [prepare_volume_case(c, spec, inference, n_labels) for c in val_cases]
    patches = _Patches(train_data, train_patch, cfg.fg_fraction, cfg.seed)
    model = UNet3d(n_labels, cfg.base, cfg.levels)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    best, best_step, bad, step, stop = -1.0, 0, 0, 0, False
    best_state = copy.deepcopy(model.state_dict())
    history: list[tuple[int, float, float]] = []
    losses: list[float] = []
    progress = _Progress(cfg.steps, cfg.progress)
    model.train()
    while not stop and step < cfg.steps:
        x, t = patches.batch(step, cfg.batch_size)
        loss = _loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % cfg.val_every == 0 or step == cfg.steps:
            dice = _pooled_dice(model, val_data, thresholds)
            model.train()
            history.append((step, float(np.mean(losses)), dice))
            losses = []
            if dice > best + cfg.min_delta:
                best, best_step, bad = dice, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                stop = bad >= cfg.patience
            progress.update(step, history[-1][1], best, force=True)
        else:
            progress.update(step, losses[-1], max(best, 0.0))
    progress.close()
    model.load_state_dict(best_state)
    model.eval()
    result = TrainResult(best_dice=best, best_step=best_step, steps=step, stopped_early=stop,
                         seconds=time.perf_counter() - t0, world_size=1,
                         history=tuple(history), checkpoint=None, model=model)
    return result, val_data


def write_volume_package(model: torch.nn.Module, out: Path | str, document: Mapping[str, Any],
                         spec: VolumeInput, inference: InferenceSpec, *,
                         provenance: Mapping[str, Any] | None = None,
                         golden: Mapping[str, bytes] | None = None,
                         tolerance: float = 1e-4) -> Any:
    """Export ``model`` with the static input ``[batch, 1, *patch]``, check it against
    PyTorch, and write the format 2 package (``document`` without ``format`` and
    ``members``; ``provenance`` is merged into its ``[provenance]``; ``golden`` maps
    case files to ``.npz`` bytes, listed in the document's ``[validation]``).

    Raises
    ------
    ModelError
        The exported graph differs from PyTorch by more than ``tolerance``.
    """
    shape = (inference.batch, 1, *inference.patch)
    onnx = export_static(model, shape, input_name=spec.name,
                         output_name=str(document["outputs"]["name"]))
    sample = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    diff = max_abs_difference(model, onnx, sample, spec.name)
    if not diff < tolerance:
        raise ModelError(f"ONNX export differs from PyTorch by {diff:.3g} (tolerance "
                         f"{tolerance:g})")
    doc = dict(document)
    doc["provenance"] = {**dict(document.get("provenance", {})), **dict(provenance or {}),
                         "onnx_opset": 17, "parity_max_abs_diff": float(f"{diff:.3g}")}
    return write_format2_package(out, {"model.onnx": onnx}, doc, extra_files=golden)


def config_provenance(cfg: Train3dConfig) -> dict[str, Any]:
    """The config as ``config_<field>`` provenance entries (scalars: a patch becomes
    ``"16x48x48"``)."""
    return {f"config_{k}": "x".join(map(str, v)) if isinstance(v, tuple | list) else v
            for k, v in asdict(cfg).items() if v is not None}


def train_volume_package(
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    out_dir: Path | str,
    *,
    template: Path | str,
    version: str,
    config: Train3dConfig | None = None,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> tuple[Any, TrainResult]:
    """Retrain a format 2 volume package's architecture: a :class:`UNet3d` trained on the
    cases with the conventions of the package in ``template`` (input, inference,
    outputs, labels, results kept as they are), written to ``out_dir`` as ``version``.

    The template's golden cases are not carried over: they hold the template's own
    labels, which a retrained network need not reproduce (the promotion gate judges it
    on the test split instead).

    Raises
    ------
    ModelLoadError
        ``template`` is not a format 2 volume package.
    ValueError, ModelError
        As :func:`train_volume` and :func:`write_volume_package`.
    """
    import tomllib

    from dicomnode.errors import ModelLoadError
    from dicomnode.modelpkg.format1 import read_model_package
    from dicomnode.modelpkg.format2 import ModelPackage2

    pkg = read_model_package(template)
    if not isinstance(pkg, ModelPackage2) or not isinstance(pkg.input, VolumeInput):
        raise ModelLoadError(f"{template}: not a format 2 volume package (the 3D trainer "
                             "keeps a volume package's conventions)")
    if pkg.outputs.activation != "sigmoid" or pkg.outputs.regions:
        raise ModelLoadError(f"{pkg.name}: the 3D trainer trains one sigmoid channel per "
                             "label (no softmax, no regions)")
    cfg = config or Train3dConfig()
    doc = tomllib.loads((Path(template) / "model.toml").read_text(encoding="utf-8"))
    doc = {k: v for k, v in doc.items()
           if k not in ("format", "members", "validation", "provenance")}
    doc["version"] = version
    if description:
        doc["description"] = description
    thresholds = [lb.threshold for lb in pkg.labels]
    result, _ = train_volume(train_cases, val_cases, pkg.input, pkg.inference, thresholds,
                             cfg)
    prov = {
        "framework": f"torch {torch.__version__}",
        "architecture": f"UNet3d base {cfg.base} levels {cfg.levels}",
        "template": f"{pkg.name} {pkg.version}",
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "best_val_dice": round(result.best_dice, 4),
        "best_step": result.best_step,
        "steps_run": result.steps,
        "train_seconds": round(result.seconds, 1),
        **config_provenance(cfg),
        **dict(provenance or {}),
    }
    out = write_volume_package(result.model, out_dir, doc, pkg.input, pkg.inference,
                               provenance=prov)
    return out, result

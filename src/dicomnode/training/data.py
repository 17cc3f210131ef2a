"""Training data: (volume, mask, spacing) cases → slices on the network grid → torch batches.

Cases come from the phantom generator (:func:`phantom_cases`) or from anywhere
else, e.g. studies with radiologist-corrected SEGs, as :class:`Case` objects.
Slices are prepared with the same contract functions the runtime uses
(:mod:`dicomnode.modelpkg.format1`), so a model sees in training exactly what it
will see when served.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.modelpkg.format1 import InputContract
from dicomnode.modelpkg.grid import plan_geometry, to_model_grid

__all__ = ["Case", "PatchDataset", "PreparedCases", "phantom_cases", "prepare_cases"]


@dataclass(frozen=True)
class Case:
    """One labelled volume.

    Parameters
    ----------
    volume
        (z, y, x) in real units (HU for CT), slices in the model's orientation.
    mask
        (z, y, x) label numbers (0 = background, 1..n = ``Label.number``).
    spacing
        (dz, dy, dx) in mm.
    case_id
        A pseudonymous name for logs and per-case scores.

    Raises
    ------
    ValueError
        Shapes differ, are not 3D, or the spacing is not three positive numbers.
    """

    volume: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    case_id: str = ""

    def __post_init__(self) -> None:
        if self.volume.ndim != 3 or self.volume.shape != self.mask.shape:
            raise ValueError(
                f"case {self.case_id!r}: volume {self.volume.shape} and mask {self.mask.shape} "
                "must be the same (z, y, x) shape"
            )
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise ValueError(
                f"case {self.case_id!r}: spacing must be three positive mm values, "
                f"got {self.spacing}"
            )


def phantom_cases(seeds: Iterable[int], **spec: object) -> list[Case]:
    """Phantom CT studies as cases (lesions labelled 1; vessels are unlabelled distractors).

    ``spec`` overrides :class:`dicomnode.dicom.phantom.PhantomSpec` fields.
    """
    cases = []
    for seed in seeds:
        st = make_ct_study(seed=int(seed), **spec)
        s = st.spec
        cases.append(
            Case(
                st.hu,
                st.mask,
                (s.slice_thickness_mm, s.pixel_spacing_mm, s.pixel_spacing_mm),
                f"phantom-{seed}",
            )
        )
    return cases


@dataclass(frozen=True)
class PreparedCases:
    """Cases on the network grid: normalised images and one-hot targets, per case."""

    images: tuple[np.ndarray, ...]
    """Per case (z, H, W) float32, normalised as the contract says."""
    targets: tuple[np.ndarray, ...]
    """Per case (z, n_labels, H, W) uint8 one-hot (labels may overlap)."""
    fill: tuple[float, ...]
    """Per case, the normalised pad value (for patches beyond the slice)."""
    case_ids: tuple[str, ...]

    @property
    def n_labels(self) -> int:
        return self.targets[0].shape[1]


def prepare_cases(cases: Sequence[Case], contract: InputContract, n_labels: int) -> PreparedCases:
    """Resample, pad and normalise every case as the runtime would.

    Label maps are resampled per label as fractions and thresholded at 0.5.

    Raises
    ------
    ValueError
        No cases, or a mask holds label numbers above ``n_labels``.
    """
    if not cases:
        raise ValueError("no cases")
    images, targets, fills = [], [], []
    for case in cases:
        top = int(case.mask.max())
        if top > n_labels:
            raise ValueError(
                f"case {case.case_id!r}: label {top} in the mask, the model has {n_labels}"
            )
        geom = plan_geometry(contract, case.volume.shape[1:], case.spacing[1:])  # type: ignore[arg-type]
        pad = float(case.volume.min()) if contract.pad_value is None else contract.pad_value
        grid = to_model_grid(case.volume, geom, pad)
        stats = None
        if contract.normalization.needs_volume_stats():
            stats = (
                float(case.volume.mean(dtype=np.float64)),
                float(case.volume.std(dtype=np.float64)),
            )
        images.append(contract.normalization.apply(grid, stats))
        fills.append(float(contract.normalization.apply(np.float32([pad]), stats)[0]))
        onehot = np.stack(
            [
                to_model_grid((case.mask == k).astype(np.float32), geom, 0.0) >= 0.5
                for k in range(1, n_labels + 1)
            ],
            axis=1,
        )
        targets.append(onehot.astype(np.uint8))
    return PreparedCases(
        tuple(images), tuple(targets), tuple(fills), tuple(c.case_id for c in cases)
    )


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random square patches of training slices, with flips and 90° rotations.

    Every slice is an item; slices holding any label appear ``fg_oversample``
    times. A patch from such a slice is centred near a random labelled pixel
    with probability 0.7. Randomness depends only on (seed, epoch, item), so
    the data are the same for any number of processes or workers.

    Parameters
    ----------
    data
        Prepared training cases.
    patch
        Patch side in pixels (a multiple of the network's size multiple).
    seed
        Base of the per-item random streams.
    fg_oversample
        How often a slice with labels is listed.
    """

    def __init__(
        self, data: PreparedCases, patch: int, seed: int = 0, fg_oversample: int = 3
    ) -> None:
        self.data, self.patch, self.seed = data, patch, seed
        self.epoch = 0
        items = []
        for c, tgt in enumerate(data.targets):
            has = tgt.reshape(tgt.shape[0], -1).any(axis=1)
            for z in range(tgt.shape[0]):
                items.extend([(c, z)] * (fg_oversample if has[z] else 1))
        self.items = np.array(items, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops and flips (call with the sampler's epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, z = (int(v) for v in self.items[i])
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, tgt = self.data.images[c][z], self.data.targets[c][z]
        p = self.patch
        h, w = img.shape
        if h < p or w < p:  # pad small slices up to the patch
            ph, pw = max(0, p - h), max(0, p - w)
            img = np.pad(
                img,
                ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)),
                constant_values=self.data.fill[c],
            )
            tgt = np.pad(tgt, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
            h, w = img.shape
        fg = np.argwhere(tgt.any(axis=0))
        if len(fg) and rng.random() < 0.7:
            cy, cx = fg[rng.integers(len(fg))] + rng.integers(-p // 4, p // 4 + 1, size=2)
            y0, x0 = int(np.clip(cy - p // 2, 0, h - p)), int(np.clip(cx - p // 2, 0, w - p))
        else:
            y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        img = img[y0 : y0 + p, x0 : x0 + p]
        tgt = tgt[:, y0 : y0 + p, x0 : x0 + p]
        k = int(rng.integers(4))
        img, tgt = np.rot90(img, k), np.rot90(tgt, k, axes=(1, 2))
        if rng.random() < 0.5:
            img, tgt = img[:, ::-1], tgt[:, :, ::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)[None]),
            torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.float32)),
        )

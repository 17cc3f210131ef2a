"""The normalisation chain of a format 2 package (``input.normalization``), step by step.

Each step reproduces its ecosystem's arithmetic, in float32 as they compute it:

- ``clip {lower, upper}``: ``np.clip`` (nnU-Net CTNormalization's first half; the
  bounds are the dataset's 0.5 and 99.5 percentiles of foreground intensities);
- ``zscore {mean?, std?, mask}``: ``(x - mean) / max(std, 1e-8)``; without mean/std the
  image's own (nnU-Net ZScoreNormalization, MONAI NormalizeIntensity). ``mask``:
  ``all``; ``nonzero`` uses and changes only voxels != 0 (MONAI ``nonzero=True``);
  ``nonzero_filled`` the hole-filled non-zero mask nnU-Net computes when it crops
  (``use_mask_for_norm``). Voxels outside the mask keep their value;
- ``scale_range {a_min, a_max, b_min, b_max, clip}``: MONAI ScaleIntensityRange, clipped
  to [b_min, b_max] only with ``clip = true``;
- ``minmax {b_min, b_max}``: the image's own range to [b_min, b_max] (MONAI
  ScaleIntensity; nnU-Net RescaleTo01 is b = 0..1);
- ``window {center, width}``: clip to the window and scale to 0..1 (format 1);
- ``bits_linear {low, high}``: the stored value range ``0 .. 2**BitsStored - 1`` of an
  image to [low, high] (torchxrayvision's ``normalize``: -1024..1024);
- ``none``.

Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes

from dicomnode.modelpkg.format2 import NormStep

__all__ = ["nonzero_mask", "normalize", "normalize_value"]

_EPS = 1e-8


def nonzero_mask(x: np.ndarray, *, filled: bool) -> np.ndarray:
    """Voxels != 0, with enclosed holes filled as nnU-Net's ``create_nonzero_mask`` does."""
    mask = x != 0
    return binary_fill_holes(mask) if filled else mask


def _zscore(x: np.ndarray, step: NormStep, mask: np.ndarray | None) -> np.ndarray:
    if step.mask == "all" or mask is None:
        mean = step.mean if step.mean is not None else x.mean()
        std = step.std if step.std is not None else x.std()
        x -= np.float32(mean)
        x /= np.float32(max(float(std), _EPS))
        return x
    values = x[mask]
    if values.size == 0:
        return x
    mean = step.mean if step.mean is not None else values.mean()
    std = step.std if step.std is not None else values.std()
    x[mask] = (values - np.float32(mean)) / np.float32(max(float(std), _EPS))
    return x


def normalize(
    x: np.ndarray, steps: Sequence[NormStep], *, filled_mask: np.ndarray | None = None,
    maxval: float | None = None,
) -> np.ndarray:
    """Apply the chain to ``x``; returns a new float32 array.

    Parameters
    ----------
    x
        Values in real units (HU for CT), any shape.
    steps
        ``input.normalization`` of the package.
    filled_mask
        The hole-filled non-zero mask for ``mask = "nonzero_filled"`` (nnU-Net computes
        it before cropping); computed from ``x`` when None.
    maxval
        The largest stored value (``2**BitsStored - 1``) for ``bits_linear``.

    Raises
    ------
    ValueError
        ``bits_linear`` without ``maxval``.
    """
    out = np.array(x, dtype=np.float32, copy=True)
    for step in steps:
        if step.kind == "clip":
            lower = -np.inf if step.lower is None else step.lower
            upper = np.inf if step.upper is None else step.upper
            np.clip(out, np.float32(lower), np.float32(upper), out=out)
        elif step.kind == "zscore":
            mask = None
            if step.mask == "nonzero":
                mask = out != 0
            elif step.mask == "nonzero_filled":
                mask = filled_mask if filled_mask is not None else nonzero_mask(out, filled=True)
            out = _zscore(out, step, mask)
        elif step.kind == "scale_range":
            assert step.a_min is not None and step.a_max is not None  # parse checked
            out = (out - np.float32(step.a_min)) / np.float32(step.a_max - step.a_min)
            out = out * np.float32(step.b_max - step.b_min) + np.float32(step.b_min)
            if step.clip:
                np.clip(out, np.float32(step.b_min), np.float32(step.b_max), out=out)
        elif step.kind == "minmax":
            lo, hi = float(out.min()), float(out.max())
            if hi > lo:
                out = (out - np.float32(lo)) / np.float32(hi - lo)
                out = out * np.float32(step.b_max - step.b_min) + np.float32(step.b_min)
            else:
                out = out - np.float32(lo) + np.float32(step.b_min)
        elif step.kind == "bits_linear":
            if not maxval:
                raise ValueError("bits_linear needs the stored value range (maxval)")
            out = out / np.float32(maxval) * np.float32(step.b_max - step.b_min)
            out += np.float32(step.b_min)
        elif step.kind == "window":
            assert step.center is not None and step.width is not None
            lo = step.center - step.width / 2
            np.clip(out, np.float32(lo), np.float32(lo + step.width), out=out)
            out -= np.float32(lo)
            out *= np.float32(1.0 / step.width)
        out = np.asarray(out, dtype=np.float32)
    return out


def normalize_value(value: float, steps: Sequence[NormStep], image: np.ndarray) -> float:
    """A real-unit value (e.g. a padding value) through the chain, with ``image``'s own
    statistics where a step uses them."""
    # Statistics steps need the image's mean/std/min/max: apply the chain to the image
    # with the value appended, so the value sees exactly the image's statistics.
    stats_steps = any(
        s.kind == "minmax" or (s.kind == "zscore" and s.mean is None) for s in steps
    )
    if not stats_steps:
        return float(normalize(np.array([value], dtype=np.float32), steps)[0])
    flat = np.append(image.ravel()[: max(1, image.size)], np.float32(value))
    # appending one voxel changes mean/std by O(1/n); for the n of a volume this is
    # below float32 resolution
    return float(normalize(flat, steps)[-1])

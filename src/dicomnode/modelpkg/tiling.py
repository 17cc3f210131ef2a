"""Where sliding windows go, how they are weighted, and padding to the patch.

Each ecosystem's rule, reproduced exactly:

- **nnU-Net** (``compute_steps_for_sliding_window``): ``m = ceil((n - p) / (p * step)) + 1``
  windows, starting at ``round(i * (n - p) / (m - 1))``; size 110, patch 64, step 0.5
  gives 0, 23, 46. Gaussian: a delta at ``p // 2`` filtered with sigma ``p * 1/8`` (scipy,
  constant mode), scaled to a maximum of 10, stored as float16, zeros replaced by the
  smallest non-zero value (``compute_gaussian``).
- **MONAI** (``_get_scan_interval``, ``dense_patch_slices``): interval ``int(p * (1 -
  overlap))`` (at least 1; ``p`` when the image is the patch size), windows at
  ``d * interval`` until one reaches the end, the last shifted back to end at the
  border; size 110, patch 64, overlap 0.5 gives 0, 32, 46. Gaussian: separable
  ``exp(-x**2 / (2 sigma**2))`` on ``x = -(p-1)/2 .. (p-1)/2``, sigma ``0.125 * p``,
  clamped below at ``max(min, 1e-3)`` (``compute_importance_map``).
- **Padding** to the patch, both: ``diff // 2`` before, the rest after.

Pure numpy/scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["gaussian_weights", "pad_to_patch", "tile_starts"]


def tile_starts(size: int, patch: int, *, flavour: str, step: float = 0.5,
                overlap: float = 0.25) -> list[int]:
    """Start indices of the windows along one axis (``size >= patch``)."""
    if size < patch:
        raise ValueError(f"size {size} is smaller than the patch {patch}: pad first")
    if flavour == "nnunet":
        target = patch * step
        m = int(math.ceil((size - patch) / target)) + 1
        if m == 1:
            return [0]
        actual = (size - patch) / (m - 1)
        return [int(np.round(actual * i)) for i in range(m)]
    interval = patch if size == patch else max(1, int(patch * (1 - overlap)))
    num = int(math.ceil(float(size) / interval))
    scan = next((d for d in range(num) if d * interval + patch >= size), None)
    count = scan + 1 if scan is not None else 1
    return [d * interval - max(d * interval + patch - size, 0) for d in range(count)]


def gaussian_weights(patch: Sequence[int], *, flavour: str, sigma_scale: float = 0.125
                     ) -> np.ndarray:
    """The blending weights of one window, float32 (nnU-Net's values rounded via float16,
    as nnU-Net stores them)."""
    patch = tuple(int(p) for p in patch)
    if flavour == "nnunet":
        tmp = np.zeros(patch)
        tmp[tuple(p // 2 for p in patch)] = 1
        g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
        g /= np.max(g) / 10
        g16 = g.astype(np.float16)
        nonzero = g16[g16 != 0]
        g16[g16 == 0] = nonzero.min()
        return g16.astype(np.float32)
    out: np.ndarray | None = None
    for i, p in enumerate(patch):
        x = np.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=np.float32)
        x = np.exp(x**2 / np.float32(-2 * (p * sigma_scale) ** 2)).astype(np.float32)
        out = x if i == 0 else out[..., None] * x[(None,) * i]  # type: ignore[index]
    assert out is not None
    floor = max(float(out.min()), 1e-3)
    return np.maximum(out, np.float32(floor)).astype(np.float32)


def pad_to_patch(
    x: np.ndarray, patch: Sequence[int], *, mode: str, value: float
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the last ``len(patch)`` axes of ``x`` up to ``patch`` (centred: ``diff // 2``
    before); return the padded array and the slicer that undoes it."""
    spatial = x.shape[-len(patch):]
    pads = [(0, 0)] * (x.ndim - len(patch))
    slicer: list[slice] = [slice(None)] * (x.ndim - len(patch))
    for n, p in zip(spatial, patch, strict=True):
        diff = max(p - n, 0)
        before = diff // 2
        pads.append((before, diff - before))
        slicer.append(slice(before, before + n))
    if not any(a or b for a, b in pads):
        return x, tuple(slicer)
    if mode == "constant":
        out = np.pad(x, pads, mode="constant", constant_values=np.float32(value))
    else:
        out = np.pad(x, pads, mode="edge")
    return out.astype(np.float32, copy=False), tuple(slicer)

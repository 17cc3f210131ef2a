"""How a model's input contract maps slices onto the network's grid, and back.

Shared by training and serving (so both prepare slices identically): in-plane
resampling to the contract's spacing, then padding or cropping to its slice size.
Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicomnode.modelpkg.format1 import InputContract

__all__ = ["SliceGeometry", "from_model_grid", "plan_geometry", "resample_plane", "to_model_grid"]

@dataclass(frozen=True)
class SliceGeometry:
    """How one slice of the original grid maps onto the network's grid.

    original (y, x) --resample--> resampled (y, x) --pad/crop--> model (H, W).
    Per axis, ``offset`` is where the resampled grid starts inside the model grid:
    positive = padding before, negative = cropped away before.
    """

    original: tuple[int, int]
    resampled: tuple[int, int]
    model: tuple[int, int]
    offset: tuple[int, int]

    @property
    def resamples(self) -> bool:
        return self.original != self.resampled


def plan_geometry(
    contract: InputContract, shape_yx: tuple[int, int], spacing_yx: tuple[float, float]
) -> SliceGeometry:
    """Plan resampling and pad/crop of slices of ``shape_yx`` at ``spacing_yx`` mm.

    Resampling keeps the field of view: the resampled size is
    ``round(n * spacing / target)``, so the effective spacing differs from the
    target by the rounding (under half a pixel over the field of view). Within
    0.1 % of the target no resampling happens. Pad/crop is centred.
    """
    if contract.spacing_mm is None:
        res = shape_yx
    else:
        res = tuple(
            n if abs(s / t - 1.0) < 1e-3 else max(1, int(round(n * s / t)))
            for n, s, t in zip(shape_yx, spacing_yx, contract.spacing_mm, strict=True)
        )
    if contract.size is not None:
        model = contract.size
    else:
        m = contract.size_multiple
        model = tuple(-(-n // m) * m for n in res)
    offset = tuple(
        (mo - r) // 2 if mo >= r else -((r - mo) // 2) for r, mo in zip(res, model, strict=True)
    )
    return SliceGeometry(tuple(shape_yx), res, model, offset)  # type: ignore[arg-type]


def resample_plane(a: np.ndarray, out_yx: tuple[int, int]) -> np.ndarray:
    """Linear interpolation of the last two axes of ``a`` to ``out_yx`` (float32, new array).

    Pixel centres are aligned as in ``align_corners=False``: output pixel ``j`` samples
    input coordinate ``(j + 0.5) * n_in / n_out - 0.5``, clamped to the edge.
    """
    out = np.asarray(a, dtype=np.float32)
    for axis, n_out in ((-2, out_yx[0]), (-1, out_yx[1])):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0.0, n_in - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (pos - i0).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return np.ascontiguousarray(out, dtype=np.float32)


def _place(src: np.ndarray, dst: np.ndarray, offset: tuple[int, int]) -> None:
    """Copy the overlap of ``src`` into ``dst``, with src's origin at ``offset`` in dst."""
    sl_s, sl_d = [], []
    for n_s, n_d, off in zip(src.shape[-2:], dst.shape[-2:], offset, strict=True):
        d0, s0 = max(off, 0), max(-off, 0)
        n = min(n_s - s0, n_d - d0)
        sl_s.append(slice(s0, s0 + n))
        sl_d.append(slice(d0, d0 + n))
    dst[..., sl_d[0], sl_d[1]] = src[..., sl_s[0], sl_s[1]]


def to_model_grid(slices: np.ndarray, geom: SliceGeometry, pad_value: float) -> np.ndarray:
    """(n, y, x) slices in real units → (n, H, W) float32 on the network grid (not normalised)."""
    x = resample_plane(slices, geom.resampled) if geom.resamples else np.asarray(slices, np.float32)
    if geom.resampled == geom.model and geom.offset == (0, 0):
        return np.ascontiguousarray(x, dtype=np.float32)
    out = np.full(x.shape[:-2] + geom.model, pad_value, dtype=np.float32)
    _place(x, out, geom.offset)
    return out


def from_model_grid(maps: np.ndarray, geom: SliceGeometry, fill: float = 0.0) -> np.ndarray:
    """(..., H, W) maps on the network grid → (..., y, x) on the original grid (float32).

    The inverse of :func:`to_model_grid` for probabilities: cropped-away areas get
    ``fill``, then the maps are linearly resampled back.
    """
    if geom.resampled == geom.model and geom.offset == (0, 0):
        res = np.asarray(maps, dtype=np.float32)
    else:
        res = np.full(maps.shape[:-2] + geom.resampled, fill, dtype=np.float32)
        _place(maps, res, (-geom.offset[0], -geom.offset[1]))
    return resample_plane(res, geom.original) if geom.resamples else res

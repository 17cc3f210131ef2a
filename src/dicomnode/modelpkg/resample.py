"""Resampling a volume to a model's spacing, and results back, as each ecosystem does.

Two grids (``input.resample.grid``):

- ``center`` (nnU-Net; skimage ``resize``): ``n' = round(n * s / t)``; output voxel ``j``
  samples input ``(j + 0.5) * n / n' - 0.5``, edges clamped. Implemented exactly as
  nnU-Net's ``resample_data_or_seg`` runs it: ``scipy.ndimage.zoom(grid_mode=True,
  mode="nearest")`` in float64 and the output clipped to the input's range (skimage's
  ``clip=True``); for an anisotropic volume (largest spacing over ``anisotropy_ratio`` times
  the smallest, one coarse axis) each plane across the coarse axis is resized with
  ``order`` and the coarse axis with ``anisotropic_order`` (nnU-Net's ``order_z``, 0 =
  nearest).
- ``corner`` (MONAI ``Spacing``): ``n' = round((n - 1) * s / t + 1)``; output ``j``
  samples input ``j * t / s``, border clamped.

Results go back plane by plane (:class:`AxisMap`, orders 0 and 1, which are separable),
so a model with a hundred classes never holds its logits on the whole original grid.

Pure numpy/scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.modelpkg.format2 import Resample

__all__ = [
    "AxisMap",
    "axis_orders",
    "new_shape",
    "resample_volume",
    "separate_axis",
]


def new_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float], grid: str
) -> tuple[int, ...]:
    """The shape after resampling ``shape`` from ``spacing`` to ``target`` on ``grid``."""
    if grid == "center":
        # nnU-Net's compute_new_shape: Python's round (half to even)
        return tuple(int(round(s / t * n)) for n, s, t in zip(shape, spacing, target, strict=True))
    # MONAI's compute_shape_offset: np.round(extent + 1), half to even on the sum
    return tuple(
        int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(shape, spacing, target, strict=True)
    )


def separate_axis(
    spacing: Sequence[float], target: Sequence[float], ratio: float
) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis`` with ``force_separate_z = None``: the one
    coarse axis of an anisotropic source (else target) spacing, or None."""
    for s in (spacing, target):
        s = np.asarray(s, dtype=float)
        if s.max() / s.min() > ratio:
            axes = np.where(s.max() / s == 1)[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


def axis_orders(
    spacing: Sequence[float], target: Sequence[float], order: int, anisotropic_order: int,
    ratio: float,
) -> tuple[int, ...]:
    """The interpolation order per axis (``anisotropic_order = -1``: no special axis)."""
    orders = [order] * len(spacing)
    if anisotropic_order >= 0:
        axis = separate_axis(spacing, target, ratio)
        if axis is not None:
            orders[axis] = anisotropic_order
    return tuple(orders)


def _zoom_clip(x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage ``resize(x, shape, order, mode="edge", anti_aliasing=False)``, float64."""
    factors = [o / i for o, i in zip(shape, x.shape, strict=True)]
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    if order != 0:
        np.clip(out, x.min(), x.max(), out=out)
    return out


def _center(x: np.ndarray, shape: tuple[int, ...], spec: Resample, spacing: Sequence[float],
            target: Sequence[float]) -> np.ndarray:
    data = x.astype(np.float64)
    axis = None
    if spec.anisotropic_order >= 0:
        axis = separate_axis(spacing, target, spec.anisotropy_ratio)
    if axis is None:
        return _zoom_clip(data, shape, spec.order)
    inplane = [n for k, n in enumerate(shape) if k != axis]
    planes = np.moveaxis(data, axis, 0)
    resized = np.stack([_zoom_clip(p, inplane, spec.order) for p in planes])
    resized = np.moveaxis(resized, 0, axis)
    if resized.shape[axis] == shape[axis]:
        return resized
    amap = AxisMap.center(resized.shape[axis], shape[axis], spec.anisotropic_order)
    return amap.apply(resized, axis)


def _corner(x: np.ndarray, shape: tuple[int, ...], spec: Resample, spacing: Sequence[float],
            target: Sequence[float]) -> np.ndarray:
    coords = [
        np.clip(np.arange(n_out) * (t / s), 0, n_in - 1)
        for n_out, n_in, s, t in zip(shape, x.shape, spacing, target, strict=True)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(
        x.astype(np.float64), grid, order=spec.order, mode="nearest"
    )


def resample_volume(
    x: np.ndarray, spacing: Sequence[float], target: Sequence[float], spec: Resample
) -> np.ndarray:
    """``x`` (3D, real or normalised values) on the grid of ``target`` spacing, float32.

    A shape that does not change is returned as is (nnU-Net does the same).
    """
    shape = new_shape(x.shape, spacing, target, spec.grid)
    if any(n < 1 for n in shape):
        raise ValueError(f"resampling {x.shape} gives an empty grid {shape}")
    if tuple(shape) == tuple(x.shape):
        return np.asarray(x, dtype=np.float32)
    fn = _center if spec.grid == "center" else _corner
    return fn(x, shape, spec, spacing, target).astype(np.float32)


@dataclass(frozen=True)
class AxisMap:
    """Sampling along one axis: output ``j`` takes input ``lo[j]`` (order 0) or
    ``(1 - w[j]) * in[lo[j]] + w[j] * in[lo[j] + 1]`` (order 1), edges clamped.

    Orders 0 and 1 are separable, so a 3D resampling is three :class:`AxisMap` in turn,
    and a slab of output planes needs only the input planes its ``lo`` names.
    """

    lo: np.ndarray
    hi: np.ndarray
    w: np.ndarray
    order: int

    @classmethod
    def of_coords(cls, coords: np.ndarray, n_in: int, order: int) -> AxisMap:
        coords = np.asarray(coords, dtype=np.float64)
        if order == 0:
            # scipy's order-0 map_coordinates rounds half up: floor(c + 0.5)
            idx = np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)
            return cls(idx, idx, np.zeros(len(idx)), 0)
        c = np.clip(coords, 0, n_in - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return cls(lo, hi, c - lo, 1)

    @classmethod
    def center(cls, n_in: int, n_out: int, order: int) -> AxisMap:
        """The ``center`` grid (zoom ``grid_mode=True``)."""
        j = np.arange(n_out, dtype=np.float64)
        return cls.of_coords((j + 0.5) * (n_in / n_out) - 0.5, n_in, order)

    @classmethod
    def corner(cls, n_in: int, n_out: int, ratio: float, order: int) -> AxisMap:
        """The ``corner`` grid: output ``j`` at input ``j * ratio`` (ratio = out/in spacing)."""
        return cls.of_coords(np.arange(n_out, dtype=np.float64) * ratio, n_in, order)

    @property
    def n_out(self) -> int:
        return len(self.lo)

    def needs(self, j: int) -> range:
        """Input indices output ``j`` reads."""
        return range(int(self.lo[j]), int(self.hi[j]) + 1)

    def apply(self, a: np.ndarray, axis: int) -> np.ndarray:
        """Sample ``a`` along ``axis`` (other axes untouched)."""
        lo = np.take(a, self.lo, axis=axis)
        if self.order == 0:
            return lo
        hi = np.take(a, self.hi, axis=axis)
        shape = [1] * a.ndim
        shape[axis] = len(self.w)
        w = self.w.reshape(shape).astype(a.dtype if a.dtype.kind == "f" else np.float64)
        return lo + (hi - lo) * w


def back_maps(
    network_shape: Sequence[int], original_shape: Sequence[int], network_spacing: Sequence[float],
    original_spacing: Sequence[float], *, grid: str, order: int, anisotropic_order: int,
    ratio: float,
) -> list[AxisMap]:
    """Per-axis maps from the network grid back to the original grid (nnU-Net
    ``resampling_fn_probabilities``: order 1, order_z 0; MONAI ``Invertd``)."""
    orders = axis_orders(network_spacing, original_spacing, order, anisotropic_order, ratio)
    maps = []
    for n_in, n_out, t, s, o in zip(network_shape, original_shape, network_spacing,
                                    original_spacing, orders, strict=True):
        if n_in == n_out and math.isclose(t, s):
            maps.append(AxisMap.of_coords(np.arange(n_out), n_in, 0))
        elif grid == "center":
            maps.append(AxisMap.center(n_in, n_out, o))
        else:
            maps.append(AxisMap.corner(n_in, n_out, s / t, o))
    return maps

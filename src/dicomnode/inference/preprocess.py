"""Volume → network input, batch by batch, per a package's input contract.

The steps, per slice (the contract's meaning is defined once, in
:mod:`dicomnode.modelpkg.format1`, and shared with training):

1. resample in-plane (linear) to ``spacing_mm`` unless it is ``"native"``;
2. pad/crop (centred) to ``size``, or pad up to a multiple of ``size_multiple``,
   with ``pad_value`` in real units (default: the volume's minimum);
3. normalise (window to [0, 1], z-score, or none);
4. stack as (N, 1, H, W) float32.

Only one batch is prepared at a time, so memory beyond the caller's volume is
one batch of network input.

What this does *not* do: reorient. The caller hands slices in the contract's
orientation (axial for the demo model), slice axis first; check
:func:`check_modality` against the series' Modality.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dicomnode.errors import InferenceError
from dicomnode.modelpkg.format1 import InputContract
from dicomnode.modelpkg.grid import SliceGeometry, plan_geometry, to_model_grid

__all__ = ["PreparedVolume", "check_modality", "check_volume", "prepare"]

_MAX_MODEL_PIXELS = 4096 * 4096


def check_volume(
    volume: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Check a (z, y, x) volume and its (dz, dy, dx) spacing in mm.

    Returns
    -------
    tuple
        The spacing as three floats.

    Raises
    ------
    InferenceError
        Not 3D, empty, not real-valued, or a spacing that is not three positive
        finite numbers.
    """
    if not isinstance(volume, np.ndarray) or volume.ndim != 3:
        shape = getattr(volume, "shape", None)
        raise InferenceError(f"volume: expected a 3D (z, y, x) array, got shape {shape}")
    if min(volume.shape) < 1:
        raise InferenceError(f"volume: empty, shape {volume.shape}")
    if volume.dtype.kind not in "fiu":
        raise InferenceError(f"volume: expected real numbers, got dtype {volume.dtype}")
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InferenceError(f"spacing: expected (dz, dy, dx) in mm, got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InferenceError(
            f"spacing: expected three positive numbers (dz, dy, dx) in mm, got {spacing!r}"
        )
    return sp  # type: ignore[return-value]


def check_modality(contract: InputContract, modality: str) -> None:
    """Refuse a series whose Modality (0008,0060) is not the contract's.

    Raises
    ------
    InferenceError
        Naming both modalities.
    """
    if modality != contract.modality:
        raise InferenceError(
            f"series modality {modality!r} does not match the model's {contract.modality!r}"
        )


@dataclass(frozen=True)
class PreparedVolume:
    """Per-volume facts the batches need: geometry and statistics."""

    geometry: SliceGeometry
    pad_value: float
    volume_stats: tuple[float, float] | None
    """(mean, std) when the normalisation needs the volume's own."""

    def batches(
        self, volume: np.ndarray, contract: InputContract
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first slice index, (n, 1, H, W) float32 network input) per batch.

        Raises
        ------
        InferenceError
            A batch holds NaN or infinite values.
        """
        step = contract.batch_size
        for k in range(0, volume.shape[0], step):
            raw = volume[k : k + step]
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                raise InferenceError(f"volume: non-finite values in slices {k}-{k + len(raw) - 1}")
            grid = to_model_grid(raw, self.geometry, self.pad_value)
            x = contract.normalization.apply(grid, self.volume_stats)
            yield k, x[:, None]


def prepare(
    volume: np.ndarray, spacing: tuple[float, float, float], contract: InputContract
) -> PreparedVolume:
    """Plan the geometry and compute the statistics one pass over the volume needs.

    Raises
    ------
    InferenceError
        Invalid volume or spacing (see :func:`check_volume`), or a network grid
        larger than 4096 x 4096 per slice.
    """
    sp = check_volume(volume, spacing)
    geom = plan_geometry(contract, (volume.shape[1], volume.shape[2]), (sp[1], sp[2]))
    if geom.model[0] * geom.model[1] > _MAX_MODEL_PIXELS:
        raise InferenceError(
            f"volume: slices of {volume.shape[1:]} at {sp[1:]} mm become {geom.model} "
            "on the model grid, too large"
        )
    pad = contract.pad_value
    if pad is None:
        pad = float(volume.min())
    stats = None
    if contract.normalization.needs_volume_stats():
        # float64 accumulation: a float32 sum over 10^8 voxels loses digits.
        mean = float(volume.mean(dtype=np.float64))
        std = float(volume.std(dtype=np.float64))
        stats = (mean, std)
    return PreparedVolume(geom, pad, stats)

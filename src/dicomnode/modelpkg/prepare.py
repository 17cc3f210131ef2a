"""Preparing a volume for a format 2 network: steps 1-5 of
:mod:`dicomnode.inference.sliding` (reorient, crop, normalise, resample, pad).

Here, not in the runtime, because training must prepare its inputs exactly as the
runtime does (:mod:`dicomnode.training.demo3d`), and ``training`` may not import
``inference``. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dicomnode.errors import InferenceError
from dicomnode.modelpkg.axes import Reorientation, axcodes, reorientation
from dicomnode.modelpkg.format2 import VolumeInput
from dicomnode.modelpkg.normalize import nonzero_mask, normalize, normalize_value
from dicomnode.modelpkg.resample import resample_volume
from dicomnode.modelpkg.tiling import pad_to_patch

__all__ = ["Prepared", "axial_affine", "prepare_volume"]


@dataclass
class Prepared:
    """A volume made ready for the network, and how to go back."""

    data: np.ndarray = field(repr=False)
    """(patch-padded) network-grid input, (channels, d0, d1, d2) float32."""
    reorient: Reorientation
    crop: tuple[slice, slice, slice]
    """The non-zero box in the reoriented volume (whole volume when not cropping)."""
    cropped_shape: tuple[int, int, int]
    cropped_spacing: tuple[float, float, float]
    network_shape: tuple[int, int, int]
    """The resampled shape before padding."""
    network_spacing: tuple[float, float, float]
    unpad: tuple[slice, ...]
    """Slicer on the padded spatial axes that gives the unpadded network grid."""
    reoriented_shape: tuple[int, int, int]


def prepare_volume(array: np.ndarray, affine: np.ndarray, spec: VolumeInput,
                   patch: Sequence[int], pad_mode: str, pad_value: float,
                   pad_space: str) -> Prepared:
    """Steps 1-5 of the module docstring (shared with training, which must prepare its
    inputs exactly as the runtime does).

    Raises
    ------
    InferenceError
        The volume is oblique and the package does not allow it, or empty after cropping.
    """
    directions = np.asarray(affine, dtype=float)[:3, :3]
    spacing = tuple(float(np.linalg.norm(directions[:, k])) for k in range(3))
    codes = axcodes(directions, allow_oblique=spec.allow_oblique)
    ro = reorientation(codes, spec.axes)
    x = np.ascontiguousarray(ro.apply(np.asarray(array, dtype=np.float32)))
    sp = ro.spacing(spacing)  # type: ignore[arg-type]
    reoriented_shape = x.shape
    crop = (slice(0, x.shape[0]), slice(0, x.shape[1]), slice(0, x.shape[2]))
    filled = None
    if spec.crop_to_nonzero:
        filled = nonzero_mask(x, filled=True)
        if not filled.any():
            raise InferenceError("the volume is zero everywhere: nothing to crop to")
        idx = np.nonzero(filled)
        crop = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)  # type: ignore[assignment]
        x = x[crop]
        filled = filled[crop]
    cropped_shape = x.shape
    target = spec.spacing_mm if spec.spacing_mm is not None else sp
    if spec.normalize_stage == "before_resample":
        x_real = x
        x = normalize(x, spec.normalization, filled_mask=filled)
    x = resample_volume(x, sp, target, spec.resample)
    if spec.normalize_stage == "after_resample":
        x_real = x
        x = normalize(x, spec.normalization)
    value = pad_value
    if pad_space == "real" and pad_mode == "constant":
        value = normalize_value(pad_value, spec.normalization, x_real)
    network_shape = x.shape
    padded, unpad = pad_to_patch(x, patch, mode=pad_mode, value=value)
    return Prepared(
        data=padded[None],
        reorient=ro,
        crop=crop,  # type: ignore[arg-type]
        cropped_shape=cropped_shape,  # type: ignore[arg-type]
        cropped_spacing=sp,  # type: ignore[arg-type]
        network_shape=network_shape,  # type: ignore[arg-type]
        network_spacing=tuple(float(t) for t in target),  # type: ignore[arg-type]
        unpad=unpad,
        reoriented_shape=reoriented_shape,  # type: ignore[arg-type]
    )


def axial_affine(spacing: Sequence[float]) -> np.ndarray:
    """The LPS affine of a (z, y, x) volume known only by its spacing: an axial
    head-first stack (slices toward superior, rows posterior, columns left: ``SPL``), as
    the phantoms and the node's axial CT volumes are. For training cases and evaluation
    predictors, which carry spacing but no orientation."""
    dz, dy, dx = (float(s) for s in spacing)
    a = np.eye(4)
    a[:3, :3] = [[0.0, 0.0, dx], [0.0, dy, 0.0], [dz, 0.0, 0.0]]
    return a

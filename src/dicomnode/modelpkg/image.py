"""Preparing one 2D image as an image package's network input (shared with training).

Steps 3-5 of :mod:`dicomnode.inference.image_model`: crop the centred square, resize to
the network size (linear, anti-aliased when shrinking: skimage's ``resize`` as
torchxrayvision calls it), normalise, one channel or grey replicated to three. Training
must prepare its images with exactly these functions, so they live here, below both.

Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicomnode.dicom.image import ProjectionImage
from dicomnode.modelpkg.format2 import ImageInput
from dicomnode.modelpkg.normalize import normalize

__all__ = ["prepare_image", "resize_image"]


def resize_image(x: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """skimage ``resize(x, size, order, mode="edge", anti_aliasing=True,
    preserve_range=True)``, float64."""
    factors = np.divide(x.shape, size)
    src = x.astype(np.float64)
    if np.any(factors > 1):
        sigma = np.maximum(0, (factors - 1) / 2)
        src = ndimage.gaussian_filter(src, sigma, mode="nearest")
    zoom = [o / i for o, i in zip(size, x.shape, strict=True)]
    return ndimage.zoom(src, zoom, order=order, mode="nearest", grid_mode=True)


def prepare_image(image: ProjectionImage, spec: ImageInput
                  ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """(channels, H, W) float32 network input of ``image`` and the square it was cut from.

    Raises
    ------
    ValueError
        A colour image (the package reads grey).
    """
    if image.array.ndim != 2:
        raise ValueError("a colour image: the model reads one grey channel")
    x = image.array
    rows, cols = x.shape
    crop = (slice(0, rows), slice(0, cols))
    if spec.crop == "center_square" and rows != cols:
        n = min(rows, cols)
        r0, c0 = (rows - n) // 2, (cols - n) // 2
        crop = (slice(r0, r0 + n), slice(c0, c0 + n))
        x = x[crop]
    x = resize_image(x, spec.size, spec.resize_order).astype(np.float32)
    x = normalize(x, spec.normalization, maxval=float(2 ** image.bits_stored - 1))
    return np.repeat(x[None], spec.channels, axis=0).astype(np.float32), crop

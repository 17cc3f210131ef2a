"""Thumbnails: grey scale through the label, overlay in the model's colours, true aspect."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicomnode.api.thumbnails import render_plane


def _volume() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((10, 40, 60), -1000.0, np.float32)
    vol[:, 5:35, 5:55] = 40.0
    mask = np.zeros(vol.shape, np.uint8)
    mask[6:9, 10:20, 30:45] = 1
    mask[2:4, 25:30, 10:15] = 2
    return vol, mask


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_overlay_in_label_colours() -> None:
    vol, mask = _volume()
    colours = {1: (0, 255, 0), 2: (0, 0, 255)}
    img = _image(render_plane(vol, mask, "axial", colours=colours, size=120))
    assert img.shape == (80, 120, 3)  # 40 x 60 pixels of 1 mm, longer side 120
    green = (img[:, :, 1] == 255) & (img[:, :, 0] == 0) & (img[:, :, 2] == 0)
    assert green.any()  # label 1's outline, drawn solid in its colour
    assert not ((img[:, :, 2] == 255) & (img[:, :, 0] == 0)).any()  # label 2 is elsewhere in z
    grey = img[0, 0]
    assert grey[0] == grey[1] == grey[2] == 0  # air, windowed to black


def test_coronal_and_sagittal_keep_the_aspect_ratio() -> None:
    vol, mask = _volume()
    cor = _image(render_plane(vol, mask, "coronal", spacing=(3.0, 1.0, 1.0), size=120))
    assert cor.shape[:2] == (60, 120)  # 10 slices x 3 mm high, 60 mm wide
    sag = _image(render_plane(vol, None, "sagittal", spacing=(3.0, 1.0, 1.0), size=120))
    assert sag.shape[:2] == (90, 120)  # 30 mm high, 40 mm wide


def test_bad_input_is_refused() -> None:
    vol, mask = _volume()
    with pytest.raises(ValueError, match="mask shape"):
        render_plane(vol, mask[:5], "axial")
    with pytest.raises(ValueError, match="3-D"):
        render_plane(vol[0], None, "axial")
    with pytest.raises(ValueError, match="plane"):
        render_plane(vol, mask, "oblique")  # type: ignore[arg-type]

"""Thumbnails of a de-identified volume with a label mask overlaid in the model's colours.

Pure rendering (numpy + Pillow) plus :func:`render_result`, which reads what one
inference result ran on: the study's de-identified instances (``archive/``, never
the identified spool) in the result mask's slice order (its pseudonymous SOP keys).
Images carry pixels only: no text, no header values.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicomnode.api.services import ApiServices
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.storage.models import InferenceResult

__all__ = ["Plane", "render_explanation", "render_plane", "render_result", "render_slice"]

Plane = Literal["axial", "coronal", "sagittal"]
_DEFAULT_COLOUR = (255, 64, 64)


def _window(image: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((image - lo) / max(width, 1e-6), 0.0, 1.0) * 255.0).astype(np.uint8)


def _pick(mask: np.ndarray, axis: int) -> int:
    """The slice along ``axis`` with the most labelled voxels; the middle one without any."""
    other = tuple(a for a in range(3) if a != axis)
    area = (mask > 0).sum(axis=other)
    return int(area.argmax()) if area.any() else mask.shape[axis] // 2


def render_slice(
    image: np.ndarray, labels: np.ndarray | None, *, aspect: float = 1.0,
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    window: tuple[float, float] = (40.0, 400.0), alpha: float = 0.45, size: int = 256,
) -> bytes:
    """One PNG of a 2-D image (rows, columns) with ``labels`` overlaid.

    Parameters
    ----------
    image
        Real values (HU).
    labels
        Label numbers of the same shape, or None.
    aspect
        Height of a pixel over its width (row spacing / column spacing).
    colours
        Label number -> RGB; labels not listed are drawn in red.
    window
        (centre, width) of the grey scale.
    alpha
        Opacity of the overlay; its outline is drawn solid.
    size
        The longer side of the PNG in pixels.

    Raises
    ------
    ValueError
        ``image`` is not 2-D, or ``labels`` has another shape.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if labels is not None and labels.shape != image.shape:
        raise ValueError(f"mask shape {labels.shape} differs from image shape {image.shape}")
    grey = _window(np.asarray(image, dtype=np.float32), *window)
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
    if labels is not None:
        for value in np.unique(labels):
            if value == 0:
                continue
            colour = np.asarray((colours or {}).get(int(value), _DEFAULT_COLOUR), np.float32)
            sel = labels == value
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * colour
            # a solid outline keeps small lesions visible at thumbnail size
            rgb[sel & ~_eroded(sel)] = colour
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    h, w = grey.shape
    scale = size / max(h * aspect, w)
    out = out.resize((max(1, round(w * scale)), max(1, round(h * aspect * scale))),
                     Image.Resampling.NEAREST)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def render_plane(
    volume: np.ndarray, mask: np.ndarray | None, plane: Plane, *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    window: tuple[float, float] = (40.0, 400.0), size: int = 256,
) -> bytes:
    """One PNG through an in-memory ``volume`` (z, y, x), through the label if any.

    ``axial`` is the slice with most label; ``coronal`` and ``sagittal`` pass through
    the label as well, head up (z increasing towards the head). ``spacing`` is
    (dz, dy, dx) in mm, for the true aspect ratio.

    Raises
    ------
    ValueError
        Shapes differ, the volume is not 3-D, or ``plane`` is unknown.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.shape}")
    if mask is not None and mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {volume.shape}")
    probe = mask if mask is not None and mask.any() else np.zeros(volume.shape, np.uint8)
    dz, dy, dx = (float(v) for v in spacing)
    m = mask if mask is not None else probe
    if plane == "axial":
        k = _pick(probe, 0)
        img, lab, aspect = volume[k], m[k], dy / dx
    elif plane == "coronal":
        i = _pick(probe, 1)
        img, lab, aspect = volume[:, i, :][::-1], m[:, i, :][::-1], dz / dx
    elif plane == "sagittal":
        j = _pick(probe, 2)
        img, lab, aspect = volume[:, :, j][::-1], m[:, :, j][::-1], dz / dy
    else:
        raise ValueError(f"plane must be axial, coronal or sagittal, got {plane!r}")
    return render_slice(img, lab if mask is not None else None, aspect=aspect,
                        colours=colours, window=window, size=size)


def _eroded(sel: np.ndarray) -> np.ndarray:
    """4-neighbour erosion without scipy."""
    out = sel.copy()
    out[1:, :] &= sel[:-1, :]
    out[:-1, :] &= sel[1:, :]
    out[:, 1:] &= sel[:, :-1]
    out[:, :-1] &= sel[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _colours_and_window(svc: ApiServices, result: InferenceResult
                        ) -> tuple[dict[int, tuple[int, int, int]], tuple[float, float]]:
    registered = svc.registry.get(result.model_name, result.model_version)
    if registered is None:
        return {}, (40.0, 400.0)
    pkg = read_model_package(registered.path)
    colours = {lb.number: (int(lb.color[0]), int(lb.color[1]), int(lb.color[2]))
               for lb in pkg.labels}
    norm = pkg.input.normalization
    if norm.kind == "window" and norm.center is not None and norm.width is not None:
        return colours, (float(norm.center), float(norm.width))
    return colours, (40.0, 400.0)


def _slice_values(ds: Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


def render_result(svc: ApiServices, result: InferenceResult) -> dict[Plane, bytes]:
    """PNGs of the three planes through the series ``result`` ran on, its mask overlaid.

    Reads the de-identified files one at a time in the mask's slice order (the
    order inference used) and keeps only the axial slice and the coronal row and
    sagittal column through the label: memory stays that of one slice, not the volume.

    Raises
    ------
    LookupError
        The result has no mask, or the series' files are gone or do not match it.
    """
    if result.status != "done" or not result.mask_path:
        raise LookupError(f"result {result.id} has no label mask")
    mask, keys = svc.results.load_mask(result)
    if mask.ndim != 3 or mask.shape[0] != len(keys) or not keys:
        raise LookupError(f"result {result.id}: the mask does not match its slice list")
    paths = {i.sop_key: i.path for i in svc.index.instances(result.study_id)
             if i.state == "deidentified"}
    if any("#" in k for k in keys):
        # frames of a multi-frame object (uid#frame): one file holds them all
        return _render_multi_frame(svc, result, mask, keys, paths)
    missing = [k for k in keys if k not in paths]
    if missing:
        raise LookupError(f"{len(missing)} slice(s) of result {result.id} are not held "
                          "de-identified")
    probe = mask if mask.any() else np.zeros(mask.shape, np.uint8)
    k, i, j = _pick(probe, 0), _pick(probe, 1), _pick(probe, 2)
    rows, cols, axial, positions = [], [], None, []
    first: Dataset | None = None
    for z, key in enumerate(keys):
        with open(svc.files.path(paths[key]), "rb") as f:
            ds = dcmread(f)
        values = _slice_values(ds)
        if values.shape != mask.shape[1:]:
            raise LookupError(f"slice {z} has shape {values.shape}, the mask "
                              f"{mask.shape[1:]}")
        rows.append(values[i, :])
        cols.append(values[:, j])
        if z == k:
            axial = values
        positions.append([float(v) for v in ds.get("ImagePositionPatient", [0, 0, z])])
        first = first or ds
    assert first is not None and axial is not None
    dy, dx = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    if len(positions) > 1:
        dz = float(np.linalg.norm(np.subtract(positions[-1], positions[0]))) / (len(keys) - 1)
    else:
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    colours, window = _colours_and_window(svc, result)
    # head up: the slice order runs along the normal, feet to head for axial stacks
    return {
        "axial": render_slice(axial, mask[k], aspect=dy / dx, colours=colours, window=window),
        "coronal": render_slice(np.stack(rows)[::-1], mask[:, i, :][::-1], aspect=dz / dx,
                                colours=colours, window=window),
        "sagittal": render_slice(np.stack(cols)[::-1], mask[:, :, j][::-1], aspect=dz / dy,
                                 colours=colours, window=window),
    }


def _render_multi_frame(svc: ApiServices, result: InferenceResult, mask: np.ndarray,
                        keys: list[str], paths: dict[str, str]) -> dict[Plane, bytes]:
    """:func:`render_result` for a result on the frames of one multi-frame object."""
    import highdicom as hd

    uids = {k.split("#", 1)[0] for k in keys}
    if len(uids) != 1 or next(iter(uids)) not in paths:
        raise LookupError(f"result {result.id}: its multi-frame source is not held "
                          "de-identified")
    with open(svc.files.path(paths[next(iter(uids))]), "rb") as f:
        image = hd.Image.from_dataset(dcmread(f), copy=False)
    slices = np.stack([image.get_frame(int(k.split("#", 1)[1]), dtype=np.float32,
                                       apply_voi_transform=False) for k in keys])
    probe = mask if mask.any() else np.zeros(mask.shape, np.uint8)
    k, i, j = _pick(probe, 0), _pick(probe, 1), _pick(probe, 2)
    colours, window = _colours_and_window(svc, result)
    return {
        "axial": render_slice(slices[k], mask[k], aspect=1.0, colours=colours, window=window),
        "coronal": render_slice(slices[:, i, :][::-1], mask[:, i, :][::-1], aspect=1.0,
                                colours=colours, window=window),
        "sagittal": render_slice(slices[:, :, j][::-1], mask[:, :, j][::-1], aspect=1.0,
                                 colours=colours, window=window),
    }


def render_explanation(svc: ApiServices, result: InferenceResult, image: int, label: int,
                       size: int = 384) -> bytes:
    """A PNG of classified image ``image`` of an image-model result with the explanation
    map of ``label`` over it (as the KEY object renders it): the de-identified image,
    never the spool.

    Raises
    ------
    LookupError
        No such map, or the image is not held de-identified.
    """
    from dicomnode.dicom.explain import render_overlay
    from dicomnode.dicom.image import load_image

    if result.status != "done" or not result.mask_path:
        raise LookupError(f"result {result.id} has no maps")
    maps, keys = svc.results.load_maps(result)
    name = f"{image}:{label}"
    if name not in maps or not 0 <= image < len(keys):
        raise LookupError(f"result {result.id} has no map for image {image}, label {label}")
    paths = {i.sop_key: i.path for i in svc.index.instances(result.study_id)
             if i.state == "deidentified"}
    if keys[image] not in paths:
        raise LookupError(f"image {image} of result {result.id} is not held de-identified")
    with open(svc.files.path(paths[keys[image]]), "rb") as f:
        ds = dcmread(f)
    display = load_image(ds, invert_monochrome1=True, voi="window").array
    out = Image.fromarray(render_overlay(display, maps[name]), "RGB")
    h, w = display.shape
    scale = size / max(h, w)
    out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                     Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()

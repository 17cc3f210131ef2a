"""Explanation maps: a Parametric Map of the map, and a rendered key image.

A classifier's explanation (e.g. occlusion sensitivity: how much the label's
probability drops when a region is hidden) is sent beside its report in two forms:

- a **Parametric Map** (PS3.3 A.75, highdicom ``pm``): the map's float values on the
  classified image's pixel grid, with a Real World Value Mapping saying what they mean,
  for viewers that overlay it (fusion);
- a **key image**: a Secondary Capture (PS3.3 A.8.1; RGB, 8 bits) of the classified image
  with the map blended over it as a colour overlay, so that a PACS without Parametric Map
  support still shows it. It references the classified image (Source Image Sequence).

A projection radiograph has no patient geometry (no Image Position / Orientation
(Patient), often no Frame of Reference), while the Parametric Map IOD requires the
Frame of Reference module and plane position/orientation per frame. The map is
therefore placed on the image's own pixel grid: a copy of the source states the
image's Frame of Reference UID or, when it has none, a surrogate derived from its
series (:func:`dicomnode.dicom.sources.surrogate_frame_of_reference`), origin 0, row
and column directions (1,0,0) and (0,1,0), and the image's (Imager) Pixel Spacing. That
placement says "this map is that image's pixel grid", which is what the reference to
the source image means; it claims nothing about the patient.

Pure: datasets and arrays in, datasets out.
"""

from __future__ import annotations

import datetime as _dt

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec, check_lo, check_uid, pin_times
from dicomnode.dicom.sources import sanitized_header, surrogate_frame_of_reference

__all__ = ["build_explanation_map", "build_key_image", "placed_source", "render_overlay"]

_DERIVED = ("DERIVED", "SECONDARY")


def _spacing(ds: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        try:
            dy, dx = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if dy > 0 and dx > 0:
            return dy, dx
    return 1.0, 1.0


def placed_source(ds: Dataset) -> Dataset:
    """A header copy of a 2D image placed on its own pixel grid (see the module docstring).

    The original is not changed; Pixel Data is not copied.
    """
    out = sanitized_header(ds)
    if not str(out.get("FrameOfReferenceUID", "")).strip():
        out.FrameOfReferenceUID = surrogate_frame_of_reference(str(ds.SeriesInstanceUID))
    out.ImagePositionPatient = [0.0, 0.0, 0.0]
    out.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    out.PixelSpacing = list(_spacing(ds))
    if not out.get("SliceThickness"):
        out.SliceThickness = 1.0
    return out


def build_explanation_map(
    source: Dataset,
    values: np.ndarray,
    *,
    label: str,
    method: str,
    algorithm: AlgorithmSpec,
    device: DeviceSpec,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    content_datetime: _dt.datetime | None = None,
) -> hd.pm.ParametricMap:
    """The Parametric Map of an explanation of ``label`` on ``source``.

    Parameters
    ----------
    source
        The classified image (headers suffice).
    values
        (Rows, Columns) float map on the image's pixel grid.
    label, method
        What is explained and how ("occlusion sensitivity"), for the Real World Value
        Mapping's LUT Explanation.

    Raises
    ------
    ValueError
        ``values`` does not match the image's size or is not finite; bad identifiers.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (rows, cols):
        raise ValueError(f"values has shape {values.shape}, the image is {(rows, cols)}")
    if not np.isfinite(values).all():
        raise ValueError("values has non-finite entries")
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    explanation = check_lo(f"{method} of {label}"[:64], "label")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="explanation",
        lut_explanation=explanation,
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        [placed_source(source)],
        values[None],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.manufacturer_model_name,
        software_versions=device.software_versions,
        device_serial_number=device.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=(low + high) / 2, window_width=high - low,
            # LINEAR_EXACT: a map's window may be narrower than 1 (PS3.3 C.11.2.1.3)
            voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT)],
        content_label="EXPLANATION",
        content_description=check_lo(f"{algorithm.name} {explanation}"[:64], "description"),
    )
    pm.SeriesDescription = check_lo(f"{algorithm.name} {algorithm.version} map"[:64],
                                    "SeriesDescription")
    _laterality(pm, source)
    if content_datetime is not None:
        _dates(pm, content_datetime)
        pin_times(pm, content_datetime)
    return pm


def render_overlay(display: np.ndarray, values: np.ndarray, *, floor: float = 0.2) -> np.ndarray:
    """(rows, columns, 3) uint8: ``display`` in grey with ``values`` blended in colour.

    ``display`` is any grey image (bright = dense; windowed by its 0.5-99.5
    percentiles); ``values`` of the same shape, only its positive part is shown, from
    ``floor`` of its maximum upward, as a red-to-yellow overlay whose opacity grows with
    the value (up to 0.6).
    """
    display = np.asarray(display, dtype=np.float64)
    if display.shape != values.shape:
        raise ValueError(f"display {display.shape} and values {values.shape} differ in shape")
    lo, hi = np.percentile(display, (0.5, 99.5))
    grey = np.clip((display - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    top = float(v.max())
    if top > 0:
        w = np.clip((v / top - floor) / (1 - floor), 0, 1)
        colour = np.stack([np.ones_like(w), w, np.zeros_like(w)], axis=2)  # red -> yellow
        alpha = (0.6 * w)[..., None]
        rgb = (1 - alpha) * rgb + alpha * colour
    return np.round(rgb * 255).astype(np.uint8)


def build_key_image(
    source: Dataset,
    rendered: np.ndarray,
    *,
    description: str,
    device: DeviceSpec,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    content_datetime: _dt.datetime | None = None,
) -> hd.sc.SCImage:
    """A Secondary Capture of ``rendered`` (from :func:`render_overlay`) for ``source``.

    Raises
    ------
    ValueError
        ``rendered`` is not (Rows, Columns, 3) uint8 of the image's size; bad identifiers.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    if rendered.shape != (rows, cols, 3) or rendered.dtype != np.uint8:
        raise ValueError(f"rendered must be ({rows}, {cols}, 3) uint8, "
                         f"got {rendered.shape} {rendered.dtype}")
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    orientation = source.get("PatientOrientation")
    ref = placed_source(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref,
        rendered,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=device.manufacturer,
        patient_orientation=(tuple(str(v) for v in orientation)  # type: ignore[arg-type]
                             if orientation and len(orientation) == 2 else ("", "")),
    )
    sc.ImageType = list(_DERIVED)
    sc.SeriesDescription = check_lo(description[:64], "description")
    sc.BurnedInAnnotation = "NO"
    sc.ConversionType = "WSD"  # workstation: rendered by software
    _laterality(sc, source)
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [item]
    sc.DerivationDescription = check_lo(description[:64], "description")
    if content_datetime is not None:
        _dates(sc, content_datetime)
        pin_times(sc, content_datetime)
    return sc


def _laterality(ds: Dataset, source: Dataset) -> None:
    # General Series Laterality is Type 2C, required for a paired body part unless Image
    # Laterality is sent (PS3.3 C.7.3.1): state the source's Image Laterality.
    value = str(source.get("ImageLaterality", "") or "").strip()
    if "Laterality" not in ds and value:
        ds.ImageLaterality = value
    elif "Laterality" not in ds:
        ds.Laterality = ""


def _dates(ds: Dataset, when: _dt.datetime) -> None:
    ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")

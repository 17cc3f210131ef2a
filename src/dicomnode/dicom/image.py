"""Two-dimensional images as model input: radiographs, mammograms, secondary captures.

A projection radiograph (CR, DX, MG) has no Image Orientation / Position (Patient):
it is not a slice of a volume but an image with its own presentation rules. The
attributes that decide whether a model may read it, and how, are recorded here
(PS3.3 C.8.11.1.1.1 Presentation Intent Type, C.8.11.5 View Position, C.7.6.1.1.1
Patient Orientation, C.8.11.7 Image Laterality) so that routing can select on them
and a model package can state what it accepts.

Values: the stored pixels after the Modality LUT; ``MONOCHROME1`` (white is low)
inverted to the MONOCHROME2 sense when asked, as ``maxval - x`` over the stored
value range (the convention of torchxrayvision's ``fix_monochrome``); the VOI LUT or
window applied only when asked (``voi``), never by default.

Pure: datasets in, values out. Messages name attributes, never values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.tag import Tag

from dicomnode.dicom.frames import number_of_frames, safe_get, safe_int
from dicomnode.errors import InferenceError

__all__ = ["ProjectionImage", "VoiValues", "image_attributes", "is_projection", "load_image"]

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "XA"})
"""Modalities whose images are projections, not slices."""

_PIXEL_TAGS = frozenset(
    Tag(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009, 0x7FE00001, 0x7FE00002)
)


class VoiValues(StrEnum):
    """How the VOI transformation is applied (PS3.3 C.11.2)."""

    NONE = "none"
    """Stored values after the Modality LUT: what most radiograph classifiers read."""
    WINDOW = "window"
    """The first Window Center/Width (PS3.3 C.11.2.1.2), output over the stored value range
    (pydicom's ``apply_voi_lut``)."""
    VOI_LUT = "voi_lut"
    """The VOI LUT Sequence if present, else the first window (pydicom's ``apply_voi_lut``)."""


def _text(ds: Dataset, keyword: str) -> str:
    value = safe_get(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip().upper()
    try:
        return "\\".join(str(v).strip().upper() for v in value)
    except TypeError:
        return str(value).strip().upper()


def is_projection(ds: Dataset) -> bool:
    """A 2D image with no place in a volume: a projection modality, or no Image Position."""
    return (
        _text(ds, "Modality") in PROJECTION_MODALITIES
        or "ImagePositionPatient" not in ds
        and "PerFrameFunctionalGroupsSequence" not in ds
    )


def image_attributes(ds: Dataset) -> dict[str, str]:
    """The presentation attributes routing can select on (upper-case, ``\\`` joined)."""
    return {
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "view_position": _text(ds, "ViewPosition"),
        "image_laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "patient_orientation": _text(ds, "PatientOrientation"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
    }


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    # PS3.3 10.7.1.3: Pixel Spacing (at the patient, when calibrated) wins over
    # Imager Pixel Spacing (at the detector front plane).
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            dy, dx = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if dy > 0 and dx > 0:
            return (dy, dx), keyword
    return None, None


@dataclass(frozen=True, eq=False)
class ProjectionImage:
    """One 2D image and what decides how a model may read it."""

    array: np.ndarray = field(repr=False)
    """(rows, columns) float32 for MONOCHROME images, (rows, columns, samples) for colour;
    read-only."""
    pixel_spacing: tuple[float, float] | None
    """(row spacing, column spacing) in mm, or None when the image states none."""
    spacing_source: str | None
    """The attribute the spacing came from: PixelSpacing or ImagerPixelSpacing."""
    photometric_interpretation: str
    inverted: bool
    """True when MONOCHROME1 values were inverted."""
    bits_stored: int
    modality: str
    presentation_intent: str
    """FOR PRESENTATION, FOR PROCESSING, or "" when the object has none."""
    view_position: str
    image_laterality: str
    patient_orientation: str
    sop_instance_uid: str
    series_instance_uid: str
    header: Dataset = field(repr=False)
    """The dataset without Pixel Data (a copy, with file meta)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)


def load_image(
    ds: Dataset,
    *,
    invert_monochrome1: bool = True,
    voi: VoiValues | str = VoiValues.NONE,
) -> ProjectionImage:
    """Read a single-frame 2D image as model input.

    Parameters
    ----------
    ds
        A single-frame image with Pixel Data (CR, DX, MG, SC, a single CT/MR slice).
    invert_monochrome1
        Invert MONOCHROME1 images so that high values are bright.
    voi
        :class:`VoiValues`: none (default), window, or voi_lut.

    Raises
    ------
    ValueError
        ``voi`` is not a :class:`VoiValues` value.
    InferenceError
        Multi-frame object, missing Rows/Columns, or undecodable pixel data.
    """
    voi = VoiValues(voi)
    try:
        frames = number_of_frames(ds)
    except InferenceError:
        raise InferenceError("NumberOfFrames is malformed") from None
    if frames > 1:
        raise InferenceError(f"multi-frame object ({frames} frames) is not one 2D image")
    rows, columns = safe_int(ds.get("Rows"), 0), safe_int(ds.get("Columns"), 0)
    if not rows or not columns:
        raise InferenceError("Rows/Columns are missing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if ts is None:
            raise ValueError("file_meta.TransferSyntaxUID is missing")
        stored, _ = get_decoder(ts).as_array(ds)
    except Exception as exc:  # decoders raise many kinds
        raise InferenceError(
            f"pixel data in {ts or 'unknown syntax'} cannot be decoded ({type(exc).__name__})"
        ) from None
    photometric = _text(ds, "PhotometricInterpretation")
    bits = safe_int(ds.get("BitsStored"), None) or safe_int(ds.get("BitsAllocated"), 8) or 8
    samples = safe_int(ds.get("SamplesPerPixel"), 1) or 1
    inverted = False
    if samples == 1:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        if voi is VoiValues.WINDOW and "WindowCenter" in ds:
            values = np.asarray(apply_voi_lut(values, ds, prefer_lut=False), dtype=np.float32)
        elif voi is VoiValues.VOI_LUT:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float32)
        if photometric == "MONOCHROME1" and invert_monochrome1:
            signed = safe_int(ds.get("PixelRepresentation"), 0) == 1
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            if voi is VoiValues.NONE:
                lut = np.asarray(
                    apply_modality_lut(np.array([low, high]), ds), dtype=np.float64
                )
                low_v, high_v = float(lut.min()), float(lut.max())
            else:
                low_v, high_v = float(values.min()), float(values.max())
            values = np.asarray(high_v + low_v - values, dtype=np.float32)
            inverted = True
    else:
        values = np.asarray(stored, dtype=np.float32)
    values.flags.writeable = False
    spacing, source = _spacing(ds)
    header = Dataset()
    for elem in ds:
        if elem.tag in _PIXEL_TAGS:
            continue
        if elem.VR == "SQ":
            header.add(copy.deepcopy(elem))
        else:
            # values are immutable (str, bytes, numbers, PersonName) or a MultiValue of
            # them, copied as a list; pydicom's deepcopy of each element cost ~30 ms a film
            value = elem.value
            header.add(DataElement(elem.tag, elem.VR,
                                   list(value) if isinstance(value, MultiValue) else value))
    if hasattr(ds, "file_meta"):
        header.file_meta = copy.deepcopy(ds.file_meta)
    attrs = image_attributes(ds)
    return ProjectionImage(
        array=values,
        pixel_spacing=spacing,
        spacing_source=source,
        photometric_interpretation=photometric,
        inverted=inverted,
        bits_stored=bits,
        modality=_text(ds, "Modality"),
        presentation_intent=attrs["presentation_intent"],
        view_position=attrs["view_position"],
        image_laterality=attrs["image_laterality"],
        patient_orientation=attrs["patient_orientation"],
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        header=header,
    )

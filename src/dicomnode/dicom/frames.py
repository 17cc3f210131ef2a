"""The frames of DICOM images: where each lies in the patient, and its pixel values.

A series reaches the node as single-frame images (one frame per SOP instance) or as
multi-frame objects (Enhanced CT/MR, Legacy Converted Enhanced, PS3.3 A.38, A.36,
A.70), whose frames carry their geometry in the Per-Frame and Shared Functional
Groups (PS3.3 C.7.6.16). :func:`image_frames` turns either into one list of
:class:`Frame` values, so volume assembly (:mod:`dicomnode.dicom.volume`) never
needs to know which it was; :func:`frame_pixels` decodes one frame with the Modality
LUT applied (per frame for multi-frame objects), through highdicom's ``Image``.

Pure: datasets in, values out. Messages name attributes and indices, never values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder

from dicomnode.errors import InferenceError

__all__ = [
    "Frame",
    "frame_pixels",
    "frames_of",
    "image_frames",
    "is_mosaic",
    "number_of_frames",
    "safe_get",
    "safe_int",
]


def safe_get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword)``, or ``default`` when pydicom cannot convert the stored value
    (a malformed IS/DS/DA raises on access, which must never stop a whole study)."""
    try:
        return ds.get(keyword, default)
    except Exception:
        return default


def safe_int(value: object, default: int | None = None) -> int | None:
    """``int(value)`` for an IS/US value, or ``default`` when it is absent or malformed.

    Real headers carry malformed numbers (a Number of Frames of ``1A``); reading one
    must cost at most that instance, never the caller's whole study.
    """
    if value is None or value == "":
        return default
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return default
    if not math.isfinite(number) or number != int(number):
        return default
    return int(number)


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent.

    Raises
    ------
    InferenceError
        The value is present but not a positive integer.
    """
    try:
        raw = ds.get("NumberOfFrames")
    except Exception:  # pydicom refuses to convert a malformed IS value on access
        raise InferenceError("NumberOfFrames is not a positive integer") from None
    if raw is None or raw == "":
        return 1
    n = safe_int(raw)
    if n is None or n < 1:
        raise InferenceError("NumberOfFrames is not a positive integer")
    return n


def is_mosaic(ds: Dataset) -> bool:
    """A Siemens MOSAIC image: one image that tiles a whole volume of slices."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(v).upper() == "MOSAIC" for v in image_type)


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame of an image object and where it lies (PS3.3 C.7.6.2, C.7.6.16.2).

    Voxel ``(i, j)`` (row, column) of the frame lies at
    ``position + i * pixel_spacing[0] * column_direction + j * pixel_spacing[1] *
    row_direction`` in the patient coordinate system (LPS, mm).
    """

    dataset_index: int
    """Index of the dataset the frame belongs to, in the caller's list."""
    sop_instance_uid: str
    frame_number: int | None
    """1-based frame number in a multi-frame object; None for a single-frame image."""
    rows: int
    columns: int
    orientation: np.ndarray = field(repr=False)
    """Image Orientation (Patient): row direction cosines, then column direction cosines."""
    position: np.ndarray = field(repr=False)
    """Image Position (Patient) of the first transmitted pixel."""
    pixel_spacing: np.ndarray = field(repr=False)
    """Pixel Spacing: (distance between rows, distance between columns) in mm."""
    slice_thickness: float | None
    spacing_between_slices: float | None
    order: tuple[float, ...]
    """Acquisition order among frames at the same position (4D series): Temporal
    Position, then Instance Number (single-frame) or frame number (multi-frame)."""

    @property
    def ref(self) -> str:
        """A reference to this frame: the SOP Instance UID, ``#<frame>`` for multi-frame."""
        if self.frame_number is None:
            return self.sop_instance_uid
        return f"{self.sop_instance_uid}#{self.frame_number}"

    @property
    def row_direction(self) -> np.ndarray:
        return self.orientation[:3]

    @property
    def column_direction(self) -> np.ndarray:
        return self.orientation[3:]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row direction × column direction."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    if value is None:
        raise InferenceError(f"{what} is missing")
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise InferenceError(f"{what} is not numeric") from None
    if arr.shape != (n,):
        raise InferenceError(f"{what} does not have {n} values")
    if not np.all(np.isfinite(arr)):
        raise InferenceError(f"{what} is not finite")
    return arr


def _check_orientation(iop: np.ndarray, what: str) -> np.ndarray:
    row, col = iop[:3], iop[3:]
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01):
        raise InferenceError(f"{what}: ImageOrientationPatient is not two unit vectors")
    if abs(float(np.dot(row, col))) > 0.01:
        raise InferenceError(f"{what}: ImageOrientationPatient vectors are not orthogonal")
    return iop


def _optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, seq: str) -> Dataset | None:
    # A macro appears in the frame's own item or in the shared item (PS3.3 C.7.6.16).
    return _first_item(per_frame, seq) or _first_item(shared, seq)


def _single_frame(ds: Dataset, index: int) -> Frame:
    what = f"instance {index}"
    iop = _check_orientation(
        _floats(ds.get("ImageOrientationPatient"), 6, f"{what}: ImageOrientationPatient"), what
    )
    ipp = _floats(ds.get("ImagePositionPatient"), 3, f"{what}: ImagePositionPatient")
    spacing = _floats(ds.get("PixelSpacing"), 2, f"{what}: PixelSpacing")
    if not np.all(spacing > 0):
        raise InferenceError(f"{what}: PixelSpacing is not positive")
    temporal = safe_int(ds.get("TemporalPositionIdentifier"), 0)
    instance = safe_int(ds.get("InstanceNumber"), 0)
    return Frame(
        dataset_index=index,
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_number=None,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        orientation=iop,
        position=ipp,
        pixel_spacing=spacing,
        slice_thickness=_optional_float(ds.get("SliceThickness")),
        spacing_between_slices=_optional_float(ds.get("SpacingBetweenSlices")),
        order=(float(temporal or 0), float(instance or 0)),
    )


def _multi_frame(ds: Dataset, index: int, n_frames: int) -> list[Frame]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if per_frame and len(per_frame) != n_frames:
        raise InferenceError(
            f"instance {index}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items, "
            f"expected NumberOfFrames ({n_frames})"
        )
    frames = []
    for f in range(n_frames):
        what = f"instance {index} frame {f + 1}"
        group = per_frame[f] if per_frame else None
        plane = _functional(group, shared, "PlanePositionSequence")
        orient = _functional(group, shared, "PlaneOrientationSequence")
        measures = _functional(group, shared, "PixelMeasuresSequence")
        content = _first_item(group, "FrameContentSequence")
        iop_value = orient.get("ImageOrientationPatient") if orient is not None else None
        ipp_value = plane.get("ImagePositionPatient") if plane is not None else None
        ps_value = measures.get("PixelSpacing") if measures is not None else None
        iop = _check_orientation(_floats(iop_value, 6, f"{what}: ImageOrientationPatient"), what)
        ipp = _floats(ipp_value, 3, f"{what}: ImagePositionPatient")
        spacing = _floats(ps_value, 2, f"{what}: PixelSpacing")
        if not np.all(spacing > 0):
            raise InferenceError(f"{what}: PixelSpacing is not positive")
        temporal = safe_int(content.get("TemporalPositionIndex"), 0) if content else 0
        frames.append(
            Frame(
                dataset_index=index,
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_number=f + 1,
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                orientation=iop,
                position=ipp,
                pixel_spacing=spacing,
                slice_thickness=_optional_float(measures.get("SliceThickness"))
                if measures is not None
                else None,
                spacing_between_slices=_optional_float(measures.get("SpacingBetweenSlices"))
                if measures is not None
                else None,
                order=(float(temporal or 0), float(f + 1)),
            )
        )
    return frames


def image_frames(ds: Dataset, index: int) -> list[Frame]:
    """The frames of one image object with their geometry.

    Parameters
    ----------
    ds
        A single-frame or multi-frame image (Pixel Data need not be loaded).
    index
        The dataset's index in the caller's list (for messages and
        :attr:`Frame.dataset_index`).

    Raises
    ------
    InferenceError
        The object cannot be placed in patient space, with the reason: missing or
        malformed Image Orientation / Position (Patient) or Pixel Spacing (top level
        or in the functional groups), Rows/Columns missing, a colour image, a Siemens
        MOSAIC image, or Number of Frames malformed.
    """
    what = f"instance {index}"
    if not str(ds.get("SOPInstanceUID", "")).strip():
        raise InferenceError(f"{what}: SOPInstanceUID is missing")
    rows, columns = safe_int(ds.get("Rows"), 0), safe_int(ds.get("Columns"), 0)
    if not rows or not columns or rows < 1 or columns < 1:
        raise InferenceError(f"{what}: Rows/Columns are missing")
    if safe_int(ds.get("SamplesPerPixel"), 1) != 1:
        raise InferenceError(f"{what}: SamplesPerPixel is not 1 (colour images are not volumes)")
    if is_mosaic(ds):
        raise InferenceError(
            f"{what}: a Siemens MOSAIC image (ImageType) tiles a whole volume in one image; "
            "unpacking mosaics is not supported"
        )
    try:
        n_frames = number_of_frames(ds)
    except InferenceError as exc:
        raise InferenceError(f"{what}: {exc}") from None
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [_single_frame(ds, index)]
    return _multi_frame(ds, index, n_frames)


def frame_pixels(ds: Dataset, frame: Frame, image: hd.Image | None = None) -> np.ndarray:
    """One frame's values after the Modality LUT (Rescale Slope/Intercept), float32.

    Parameters
    ----------
    ds
        The frame's dataset, with Pixel Data.
    frame
        A frame of ``ds`` from :func:`image_frames`.
    image
        For multi-frame objects, a ``highdicom.Image`` of ``ds`` made once by the
        caller (it indexes the frames); made here when None.

    Raises
    ------
    InferenceError
        Pixel Data is missing or cannot be decoded; the message gives the transfer
        syntax and the exception's class, never a third-party message (it may quote
        values).
    """
    what = f"instance {frame.dataset_index}"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InferenceError(f"{what}: PixelData is missing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if frame.frame_number is None:
            # The decoder directly: ``ds.pixel_array`` would cache the array on the
            # caller's dataset and keep a second copy of the series alive.
            if ts is None:
                raise ValueError("file_meta.TransferSyntaxUID is missing")
            pixels, _ = get_decoder(ts).as_array(ds)
            values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        else:
            img = image if image is not None else hd.Image.from_dataset(ds, copy=False)
            values = img.get_frame(
                frame.frame_number,
                dtype=np.float32,
                apply_real_world_transform=False,
                apply_modality_transform=True,
                apply_voi_transform=False,
                apply_palette_color_lut=False,
                apply_icc_profile=False,
            )
    except Exception as exc:  # decoders raise many kinds
        raise InferenceError(
            f"{what}: pixel data in {ts or 'unknown syntax'} cannot be decoded "
            f"({type(exc).__name__})"
        ) from None
    if values.shape != (frame.rows, frame.columns):
        raise InferenceError(
            f"{what}: decoded pixel data has shape {values.shape}, "
            f"expected ({frame.rows}, {frame.columns})"
        )
    return values


def frames_of(datasets: Sequence[Dataset]) -> tuple[list[Frame], list[str]]:
    """Every placeable frame of ``datasets``, and why the others could not be placed.

    Returns
    -------
    frames
        In dataset order, then frame order.
    refused
        One reason per dataset that yielded no frame (an instance's malformed header
        costs that instance, never the series).
    """
    frames: list[Frame] = []
    refused: list[str] = []
    for i, ds in enumerate(datasets):
        try:
            frames.extend(image_frames(ds, i))
        except InferenceError as exc:
            refused.append(str(exc))
        except Exception as exc:  # a malformed value pydicom cannot convert on access
            refused.append(f"instance {i}: header cannot be read ({type(exc).__name__})")
    return frames, refused

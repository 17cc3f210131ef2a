"""Assemble a series of single-frame images into a 3D volume, and pick a series.

Pure: datasets in, numpy arrays and value objects out. Pixel data is decoded
through pydicom's decoder plugins (``pydicom[pixeldata]``), so every compressed
transfer syntax those plugins handle is accepted.

Geometry follows PS3.3 C.7.6.2 (Image Plane Module): the slice normal is the
cross product of the row and column direction cosines of Image Orientation
(Patient), and slices are ordered by Image Position (Patient) projected on that
normal. Nothing here resamples: a series that is not a regular stack (mixed
orientation or pixel grid, duplicated positions, gaps, gantry tilt) is rejected
with :class:`~dicomnode.errors.InferenceError`, whose message gives the reason.
Messages name attributes and instance indices (input order), never values that
could identify a patient.

Enhanced multi-frame objects (Enhanced CT/MR, PS3.3 A.38/A.36) are rejected
with a reason that says so: their frames are addressed by frame number, not by
SOP Instance UID, and the SEG/SR builders here reference single-frame source
instances. Support would go through the Per-Frame Functional Groups.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.tag import Tag

from dicomnode.errors import InferenceError

__all__ = [
    "SeriesSummary",
    "SlicePlane",
    "Volume",
    "assemble_volume",
    "select_series",
    "summarize_series",
]

# Pixel Data, Float Pixel Data, Double Float Pixel Data and the extended offset
# table that belongs to encapsulated Pixel Data: dropped from the kept headers.
_PIXEL_TAGS = frozenset(
    Tag(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009, 0x7FE00001, 0x7FE00002)
)

# Direction cosines are written with a handful of decimals; two slices whose
# cosines differ by less than this are taken as the same orientation.
_ORIENTATION_TOLERANCE = 1e-3


class SlicePlane(StrEnum):
    """The anatomical plane of a stack, from its slice normal (LPS patient axes)."""

    AXIAL = "AXIAL"
    CORONAL = "CORONAL"
    SAGITTAL = "SAGITTAL"
    OBLIQUE = "OBLIQUE"


@dataclass(frozen=True, eq=False)
class Volume:
    """A regular stack of slices of one series, in slice-normal order.

    Index ``k`` of every per-slice field refers to the same slice: ``array[k]``
    is the image of instance ``sop_instance_uids[k]`` whose header is
    ``headers[k]``. Positions increase along ``normal``. ``array`` is read-only;
    copy it before changing it in place.

    Voxel ``(k, i, j)`` (slice, row, column) lies at patient position (mm, LPS)
    ``origin + k*dz*normal + i*dy*col_dir + j*dx*row_dir`` where ``row_dir``
    is ``orientation[:3]`` (the direction along a row, i.e. of increasing
    column index) and ``col_dir`` is ``orientation[3:]`` (PS3.3 C.7.6.2.1.1).
    """

    array: np.ndarray = field(repr=False)
    """(z, y, x) float32 values after the Modality LUT / Rescale Slope and Intercept (e.g. HU)."""
    spacing: tuple[float, float, float]
    """(dz, dy, dx) in mm: the slice spacing measured from the positions, then Pixel Spacing."""
    origin: tuple[float, float, float]
    """Image Position (Patient) of slice 0."""
    orientation: tuple[float, float, float, float, float, float]
    """Image Orientation (Patient): row direction cosines, then column direction cosines."""
    normal: tuple[float, float, float]
    """Unit slice normal, row direction × column direction."""
    sop_instance_uids: tuple[str, ...]
    """SOP Instance UID of each slice, in volume order."""
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    headers: tuple[Dataset, ...] = field(repr=False)
    """Each slice's dataset (copy, with file meta) without Pixel Data, in volume order."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x)."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def positions(self) -> np.ndarray:
        """(z, 3) Image Position (Patient) of every slice, as read from the headers."""
        return np.array([[float(v) for v in h.ImagePositionPatient] for h in self.headers])

    @property
    def plane(self) -> SlicePlane:
        """The anatomical plane closest to the slices (OBLIQUE beyond 30 degrees)."""
        return _plane(np.asarray(self.normal))

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping voxel indices (k, i, j, 1) to patient coordinates (mm, LPS)."""
        dz, dy, dx = self.spacing
        row_dir = np.asarray(self.orientation[:3])
        col_dir = np.asarray(self.orientation[3:])
        out = np.eye(4)
        out[:3, 0] = np.asarray(self.normal) * dz
        out[:3, 1] = col_dir * dy
        out[:3, 2] = row_dir * dx
        out[:3, 3] = self.origin
        return out


def _plane(normal: np.ndarray) -> SlicePlane:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(30)):
        return SlicePlane.OBLIQUE
    return (SlicePlane.SAGITTAL, SlicePlane.CORONAL, SlicePlane.AXIAL)[axis]


def _floats(ds: Dataset, keyword: str, n: int, index: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise InferenceError(f"instance {index}: {keyword} is missing or does not have {n} values")
    try:
        arr = np.array([float(v) for v in value])
    except (TypeError, ValueError):
        raise InferenceError(f"instance {index}: {keyword} is not numeric") from None
    if not np.all(np.isfinite(arr)):
        raise InferenceError(f"instance {index}: {keyword} is not finite")
    return arr


def _normal(iop: np.ndarray, index: int) -> np.ndarray:
    row, col = iop[:3], iop[3:]
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01) or norm < 0.99:
        raise InferenceError(
            f"instance {index}: ImageOrientationPatient is not two orthogonal unit vectors"
        )
    return n / norm


def _headers_only(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            out.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def _pixels(ds: Dataset) -> np.ndarray:
    # Decode through the decoder directly: ``ds.pixel_array`` would cache the
    # array on the caller's dataset and keep a second copy of the series alive.
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if transfer_syntax is None:
        raise ValueError("file_meta.TransferSyntaxUID is missing")
    pixels, _ = get_decoder(transfer_syntax).as_array(ds)
    return pixels


def _decode(ds: Dataset, index: int) -> np.ndarray:
    try:
        pixels = _pixels(ds)
    except Exception as exc:  # pydicom raises many kinds
        # Class name and transfer syntax only: a third-party message may quote values.
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InferenceError(
            f"instance {index}: pixel data in {ts} cannot be decoded ({type(exc).__name__})"
        ) from None
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise InferenceError(
            f"instance {index}: decoded pixel data has shape {pixels.shape}, "
            f"expected ({int(ds.Rows)}, {int(ds.Columns)})"
        )
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)


def _check_single_frame(ds: Dataset, index: int) -> None:
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        raise InferenceError(
            f"instance {index}: multi-frame object ({int(frames)} frames, "
            f"SOP class {ds.get('SOPClassUID', '?')}) "
            "is not supported; only series of single-frame images are assembled"
        )
    if "PerFrameFunctionalGroupsSequence" in ds:
        raise InferenceError(
            f"instance {index}: enhanced multi-frame object "
            f"(SOP class {ds.get('SOPClassUID', '?')}) "
            "is not supported; only series of single-frame images are assembled"
        )


def _same(datasets: Sequence[Dataset], keyword: str, what: str) -> str:
    values = {str(ds.get(keyword, "")) for ds in datasets}
    if len(values) != 1 or values == {""}:
        if "" in values:
            missing = next(i for i, ds in enumerate(datasets) if not str(ds.get(keyword, "")))
            raise InferenceError(f"instance {missing}: {keyword} is missing")
        raise InferenceError(f"series mixes {len(values)} different {what} ({keyword})")
    return values.pop()


def _dedupe(datasets: Sequence[Dataset]) -> list[tuple[int, Dataset]]:
    """Drop repeated copies of one SOP instance; reject copies that differ."""
    seen: dict[str, tuple[int, Dataset]] = {}
    kept: list[tuple[int, Dataset]] = []
    for i, ds in enumerate(datasets):
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise InferenceError(f"instance {i}: SOPInstanceUID is missing")
        if uid in seen:
            j, first = seen[uid]
            if not _same_pixels(first, ds):
                raise InferenceError(
                    f"instances {j} and {i} have the same SOPInstanceUID but different pixel data"
                )
            continue
        seen[uid] = (i, ds)
        kept.append((i, ds))
    return kept


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    if "PixelData" not in a or "PixelData" not in b:
        return "PixelData" not in a and "PixelData" not in b
    if a.PixelData == b.PixelData:
        return True
    # The same instance may arrive in two transfer syntaxes; compare decoded values.
    try:
        return bool(np.array_equal(_pixels(a), _pixels(b)))
    except Exception:  # undecodable: not provably the same
        return False


def assemble_volume(
    datasets: Sequence[Dataset],
    *,
    min_slices: int = 2,
    position_tolerance_mm: float = 0.05,
    spacing_tolerance: float = 0.01,
) -> Volume:
    """Assemble the single-frame images of one series into a :class:`Volume`.

    Parameters
    ----------
    datasets
        The instances of one series, in any order, with Pixel Data. Repeated
        copies of the same SOP instance (same SOP Instance UID, same pixels)
        are kept once.
    min_slices
        Fewest slices accepted (at least 1). With one slice, ``dz`` is
        Spacing Between Slices, else Slice Thickness.
    position_tolerance_mm
        Two slices closer than this along the normal are at the same position;
        an in-plane offset between slices larger than this is a sheared stack
        (gantry tilt), which is rejected rather than resampled.
    spacing_tolerance
        Largest accepted relative deviation of any slice gap from the median
        gap; a missing slice shows up as a gap of twice the median.

    Returns
    -------
    Volume
        Slices sorted by position along the normal, values after the Modality
        LUT (Rescale Slope and Intercept), as float32.

    Raises
    ------
    ValueError
        An argument is out of range.
    InferenceError
        The series cannot form a regular volume. The message says why: too
        few slices; a multi-frame object; more than one series, frame of
        reference or modality; missing or mixed Image Orientation (Patient),
        Rows/Columns or Pixel Spacing; missing Image Position (Patient);
        colour images; two different instances at one position; slice gaps
        not uniform (a missing slice); a sheared stack; pixel data that cannot
        be decoded.

    Notes
    -----
    Checks geometry and decodability only; it does not guarantee the series
    is complete (a slice missing at either end of the stack is undetectable).
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be at least 1, got {min_slices}")
    if not position_tolerance_mm > 0:
        raise ValueError(f"position_tolerance_mm must be > 0, got {position_tolerance_mm}")
    if not 0 < spacing_tolerance < 1:
        raise ValueError(f"spacing_tolerance must be in (0, 1), got {spacing_tolerance}")
    if len(datasets) == 0:
        raise InferenceError(f"series has no instances, expected at least {min_slices}")

    for i, ds in enumerate(datasets):
        _check_single_frame(ds, i)
    kept = _dedupe(datasets)
    if len(kept) < min_slices:
        raise InferenceError(f"series has {len(kept)} slices, expected at least {min_slices}")
    dss = [ds for _, ds in kept]
    idx = [i for i, _ in kept]

    series_uid = _same(dss, "SeriesInstanceUID", "series")
    for_uid = _same(dss, "FrameOfReferenceUID", "frames of reference")
    modality = _same(dss, "Modality", "modalities")

    iops = [_floats(ds, "ImageOrientationPatient", 6, i) for i, ds in zip(idx, dss, strict=True)]
    iop0 = iops[0]
    for i, iop in zip(idx, iops, strict=True):
        if np.max(np.abs(iop - iop0)) > _ORIENTATION_TOLERANCE:
            raise InferenceError(
                f"series mixes orientations: ImageOrientationPatient of instance {i} "
                f"differs from instance {idx[0]}"
            )
    normal = _normal(iop0, idx[0])

    shapes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in dss}
    if len(shapes) != 1:
        raise InferenceError(f"series mixes {len(shapes)} image sizes (Rows/Columns)")
    rows, columns = shapes.pop()
    if rows < 1 or columns < 1:
        raise InferenceError("Rows/Columns are missing")
    spacings = [_floats(ds, "PixelSpacing", 2, i) for i, ds in zip(idx, dss, strict=True)]
    if any(
        np.max(np.abs(s - spacings[0])) > 1e-4 * max(1.0, float(spacings[0].max()))
        for s in spacings
    ):
        raise InferenceError("series mixes pixel spacings (PixelSpacing)")
    if not np.all(spacings[0] > 0):
        raise InferenceError("PixelSpacing is not positive")
    for i, ds in zip(idx, dss, strict=True):
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InferenceError(
                f"instance {i}: SamplesPerPixel is not 1 (colour images are not supported)"
            )
        if "PixelData" not in ds:
            raise InferenceError(f"instance {i}: PixelData is missing")

    ipps = np.stack(
        [_floats(ds, "ImagePositionPatient", 3, i) for i, ds in zip(idx, dss, strict=True)]
    )
    along = ipps @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    ipps = ipps[order]
    dss = [dss[k] for k in order]
    idx = [idx[k] for k in order]

    gaps = np.diff(along)
    if gaps.size and gaps.min() < position_tolerance_mm:
        k = int(np.argmin(gaps))
        raise InferenceError(
            f"instances {idx[k]} and {idx[k + 1]} are at the same position "
            "(duplicated slice position with a different SOP instance)"
        )
    if gaps.size:
        dz = float(np.median(gaps))
        worst = int(np.argmax(np.abs(gaps - dz)))
        if abs(gaps[worst] - dz) > spacing_tolerance * dz:
            raise InferenceError(
                f"slice spacing is not uniform: gap {gaps[worst]:.3f} mm between instances "
                f"{idx[worst]} and {idx[worst + 1]}, median {dz:.3f} mm (missing slice?)"
            )
        # Positions must lie on one line along the normal; an in-plane drift means a
        # gantry-tilted (sheared) stack that a (z, y, x) array cannot represent.
        drift = (ipps - ipps[0]) - np.outer(along - along[0], normal)
        worst_drift = int(np.argmax(np.linalg.norm(drift, axis=1)))
        if np.linalg.norm(drift[worst_drift]) > max(position_tolerance_mm, 0.1 * dz):
            raise InferenceError(
                f"instance {idx[worst_drift]} is offset in-plane from slice 0 "
                "(sheared stack, e.g. gantry tilt); not supported"
            )
    else:
        thickness = dss[0].get("SpacingBetweenSlices") or dss[0].get("SliceThickness")
        if thickness is None or not float(thickness) > 0:
            raise InferenceError(
                "single slice without SpacingBetweenSlices or SliceThickness: slice spacing unknown"
            )
        dz = float(thickness)

    array = np.empty((len(dss), rows, columns), dtype=np.float32)
    for k, (i, ds) in enumerate(zip(idx, dss, strict=True)):
        array[k] = _decode(ds, i)
    array.flags.writeable = False

    dy, dx = (float(v) for v in spacings[0])
    return Volume(
        array=array,
        spacing=(dz, dy, dx),
        origin=(float(ipps[0][0]), float(ipps[0][1]), float(ipps[0][2])),
        orientation=tuple(float(v) for v in iop0),  # type: ignore[arg-type]
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in dss),
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        modality=modality,
        headers=tuple(_headers_only(ds) for ds in dss),
    )


@dataclass(frozen=True)
class SeriesSummary:
    """What series selection needs to know about one series, read from headers only."""

    series_instance_uid: str
    modality: str
    n_instances: int
    """Distinct SOP instances."""
    plane: SlicePlane | None
    """None when Image Orientation (Patient) is missing or mixed."""
    slice_spacing_mm: float | None
    """Median gap of the positions along the normal; else Spacing Between Slices or
    Slice Thickness; None when none of these is known."""
    series_number: int | None = None
    series_description: str = ""
    multi_frame: bool = False


def summarize_series(datasets: Sequence[Dataset]) -> SeriesSummary:
    """Summarise one series from its headers (Pixel Data is not touched).

    Parameters
    ----------
    datasets
        The instances of one series; Pixel Data need not be loaded.

    Returns
    -------
    SeriesSummary

    Raises
    ------
    InferenceError
        ``datasets`` is empty or mixes series.
    """
    if len(datasets) == 0:
        raise InferenceError("series has no instances")
    series_uid = _same(datasets, "SeriesInstanceUID", "series")
    modality = str(datasets[0].get("Modality", ""))
    uids = {str(ds.get("SOPInstanceUID", "")) for ds in datasets}
    multi = any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets)

    plane: SlicePlane | None = None
    spacing: float | None = None
    try:
        iops = [_floats(ds, "ImageOrientationPatient", 6, i) for i, ds in enumerate(datasets)]
        if all(np.max(np.abs(iop - iops[0])) <= _ORIENTATION_TOLERANCE for iop in iops):
            normal = _normal(iops[0], 0)
            plane = _plane(normal)
            ipps = np.stack(
                [_floats(ds, "ImagePositionPatient", 3, i) for i, ds in enumerate(datasets)]
            )
            along = np.unique(np.round(ipps @ normal, 3))
            if along.size > 1:
                spacing = float(np.median(np.diff(along)))
    except InferenceError:
        pass  # a summary is best effort: unknown geometry stays None
    if spacing is None:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = datasets[0].get(keyword)
            if value not in (None, "") and float(value) > 0:
                spacing = float(value)
                break
    number = datasets[0].get("SeriesNumber")
    return SeriesSummary(
        series_instance_uid=series_uid,
        modality=modality,
        n_instances=len(uids),
        plane=plane,
        slice_spacing_mm=spacing,
        series_number=int(number) if number not in (None, "") else None,
        series_description=str(datasets[0].get("SeriesDescription", "")),
        multi_frame=multi,
    )


_Candidate = TypeVar("_Candidate", SeriesSummary, Sequence[Dataset])


def select_series(
    candidates: Sequence[_Candidate],
    *,
    modality: str | None = "CT",
    plane: SlicePlane | str | None = SlicePlane.AXIAL,
    min_slices: int = 2,
    max_slice_spacing_mm: float | None = None,
    description_pattern: str | None = None,
) -> _Candidate:
    """Pick the series a model should run on: the thinnest-sliced match.

    Parameters
    ----------
    candidates
        Series of one study, each as a :class:`SeriesSummary` or as its list
        of datasets (headers suffice; they are summarised with
        :func:`summarize_series`).
    modality
        Required Modality (e.g. ``"CT"``); None accepts any.
    plane
        Required :class:`SlicePlane`; None accepts any, including unknown.
    min_slices
        Fewest distinct instances.
    max_slice_spacing_mm
        Reject series whose slice spacing is larger (or unknown).
    description_pattern
        Regular expression that Series Description must match
        (``re.search``, case-insensitive); None accepts any.

    Returns
    -------
    The chosen candidate itself (same object). Among matches: smallest slice
    spacing, then most instances, then lowest Series Number, then Series
    Instance UID, so the choice is deterministic. Multi-frame series never
    match (see :func:`assemble_volume`).

    Raises
    ------
    ValueError
        ``plane`` is not a :class:`SlicePlane` value.
    InferenceError
        No candidate matches; the message gives each candidate's reason, by
        index (no descriptions or UIDs).
    """
    wanted_plane = SlicePlane(plane) if plane is not None else None
    pattern = re.compile(description_pattern, re.IGNORECASE) if description_pattern else None
    matches: list[tuple[tuple[float, int, int, str], int]] = []
    reasons: list[str] = []
    for i, cand in enumerate(candidates):
        s = cand if isinstance(cand, SeriesSummary) else summarize_series(cand)
        why = None
        if s.multi_frame:
            why = "multi-frame"
        elif modality is not None and s.modality != modality:
            why = f"modality {s.modality or 'missing'}, expected {modality}"
        elif wanted_plane is not None and s.plane != wanted_plane:
            why = f"plane {s.plane.value if s.plane else 'unknown'}, expected {wanted_plane.value}"
        elif s.n_instances < min_slices:
            why = f"{s.n_instances} instances, expected at least {min_slices}"
        elif max_slice_spacing_mm is not None and (
            s.slice_spacing_mm is None or s.slice_spacing_mm > max_slice_spacing_mm
        ):
            why = (
                f"slice spacing {s.slice_spacing_mm} mm, expected at most {max_slice_spacing_mm} mm"
            )
        elif pattern is not None and not pattern.search(s.series_description):
            why = "SeriesDescription does not match"
        if why is not None:
            reasons.append(f"{i}: {why}")
            continue
        key = (
            s.slice_spacing_mm if s.slice_spacing_mm is not None else math.inf,
            -s.n_instances,
            s.series_number if s.series_number is not None else 2**31,
            s.series_instance_uid,
        )
        matches.append((key, i))
    if not matches:
        raise InferenceError(
            f"no series matches among {len(candidates)} candidates"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    return candidates[min(matches)[1]]

"""Assemble the images of one series into a 3D volume on a regular grid.

Pure: datasets in, numpy arrays and value objects out.

Real series are rarely the regular stack a textbook shows. This module takes what
scanners and archives send and makes one volume of it, saying what it did:

- **single-frame stacks and multi-frame objects alike** (Enhanced and Legacy Converted
  Enhanced CT/MR): every frame becomes a :class:`~dicomnode.dicom.frames.Frame` with
  its own geometry (PS3.3 C.7.6.2, C.7.6.16.2), so the two are one case;
- **several stacks in one series** (a localizer mixed in, two oblique planes): the
  frames are grouped by orientation and pixel grid, and the largest group is used;
- **4D series** (DTI, fMRI, multi-echo, bolus tracking: several frames at each
  position): split into 3D volumes by acquisition order at each position (Temporal
  Position, then Instance Number or frame number); the volume with the most frames is
  used, the first acquired on a tie (b = 0 in DTI, the first time point in fMRI);
- **no Frame of Reference UID** (anonymised elsewhere): a stack whose geometry is
  otherwise consistent is accepted; the volume's ``frame_of_reference_uid`` is None;
- **gaps and gantry tilt**: a stack with a missing slice, uneven spacing or an in-plane
  shift between slices (a sheared stack) is resampled onto a regular grid (linear
  along the slice normal, bilinear in-plane) whose slices are parallel to the source
  slices, and the results go back to the *original* frames
  (:meth:`Volume.mask_on_frames`), so SEG objects reference the instances as sent.

highdicom's ``get_volume_from_series`` / ``Image.get_volume`` refuse all but the
regular stack with a Frame of Reference (and highdicom's orientation tolerance refuses
some real stacks written with few decimals), so the grouping and resampling are done
here; frames are decoded through highdicom's ``Image`` (per-frame Modality LUT) and a
volume converts to a ``highdicom.Volume`` (:meth:`Volume.to_highdicom`).

Messages name attributes, counts and instance indices (input order), never values that
could identify a patient.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from scipy import ndimage

from dicomnode.dicom.frames import (
    Frame,
    frame_pixels,
    frames_of,
    number_of_frames,
    safe_get,
    safe_int,
)
from dicomnode.errors import InferenceError

__all__ = [
    "SeriesSummary",
    "SlicePlane",
    "Volume",
    "VolumePlan",
    "assemble_volume",
    "plan_volume",
    "select_series",
    "summarize_series",
]

# Pixel Data, Float Pixel Data, Double Float Pixel Data and the extended offset
# table that belongs to encapsulated Pixel Data: dropped from the kept headers.
_PIXEL_TAGS = frozenset(
    Tag(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009, 0x7FE00001, 0x7FE00002)
)

# Direction cosines are written with a handful of decimals; two frames whose
# cosines differ by less than this are taken as the same orientation.
_ORIENTATION_TOLERANCE = 1e-3
# Two frames closer than this along the normal are at the same position (4D).
_SAME_POSITION_MM = 0.05
# A grid with more than this many slots per frame means positions that do not form a
# stack (a few slices far apart): refused rather than resampled.
_MAX_GRID_FACTOR = 2
# Uneven spacing is resampled only while the largest gap is at most this many times
# the smallest (e.g. variable reconstruction increments), not for scattered slices.
_MAX_GAP_RATIO = 2.0


class SlicePlane(StrEnum):
    """The anatomical plane of a stack, from its slice normal (LPS patient axes)."""

    AXIAL = "AXIAL"
    CORONAL = "CORONAL"
    SAGITTAL = "SAGITTAL"
    OBLIQUE = "OBLIQUE"


def _plane(normal: np.ndarray) -> SlicePlane:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(30)):
        return SlicePlane.OBLIQUE
    return (SlicePlane.SAGITTAL, SlicePlane.CORONAL, SlicePlane.AXIAL)[axis]


@dataclass(frozen=True, eq=False)
class VolumePlan:
    """How a series becomes a volume, decided from headers alone (no Pixel Data).

    ``frames`` are the source frames used, sorted along the slice normal. Frame ``f``
    lies in grid slice ``slots[f]``, shifted in-plane by ``shifts[f]`` (rows,
    columns; zero unless the stack is sheared): source pixel ``(i, j)`` of frame ``f``
    is grid voxel ``(slots[f], i - shifts[f][0], j - shifts[f][1])``.
    """

    frames: tuple[Frame, ...]
    shape: tuple[int, int, int]
    """(z, y, x) of the grid."""
    spacing: tuple[float, float, float]
    """(dz, dy, dx) in mm."""
    origin: np.ndarray = field(repr=False)
    orientation: np.ndarray = field(repr=False)
    slots: tuple[int, ...]
    shifts: tuple[tuple[float, float], ...]
    series_instance_uid: str
    modality: str
    frame_of_reference_uid: str | None
    notes: tuple[str, ...]
    """What was done beyond reading a regular stack (grouping, 4D split, resampling)."""
    n_volumes: int = 1
    """Number of 3D volumes the chosen stack held (4D series: more than one)."""

    @property
    def aligned(self) -> bool:
        """The grid is the source frames themselves: one frame per slice, in order."""
        return self.slots == tuple(range(len(self.frames))) and not any(
            di or dj for di, dj in self.shifts
        ) and self.shape[0] == len(self.frames)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    @property
    def plane(self) -> SlicePlane:
        return _plane(self.normal)


@dataclass(frozen=True, eq=False)
class Volume:
    """A volume of one series on a regular grid, and the frames it came from.

    Voxel ``(k, i, j)`` (slice, row, column) lies at patient position (mm, LPS)
    ``origin + k*dz*normal + i*dy*col_dir + j*dx*row_dir``, where ``row_dir`` is
    ``orientation[:3]`` (the direction along a row, of increasing column index) and
    ``col_dir`` is ``orientation[3:]`` (PS3.3 C.7.6.2.1.1). ``array`` is read-only.

    When :attr:`aligned`, grid slice ``k`` *is* source frame ``k`` (the common case);
    otherwise the grid was resampled (:attr:`notes` says why) and
    :meth:`mask_on_frames` maps a result back onto the source frames.
    """

    array: np.ndarray = field(repr=False)
    """(z, y, x) float32 values after the Modality LUT (e.g. HU for CT)."""
    plan: VolumePlan
    headers: tuple[Dataset, ...] = field(repr=False)
    """Headers (copies, with file meta, without Pixel Data) of the source datasets, one
    per distinct SOP instance among :attr:`frames`, in order of first use."""

    @property
    def frames(self) -> tuple[Frame, ...]:
        return self.plan.frames

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm."""
        return self.plan.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        o = self.plan.origin
        return float(o[0]), float(o[1]), float(o[2])

    @property
    def orientation(self) -> tuple[float, float, float, float, float, float]:
        return tuple(float(v) for v in self.plan.orientation)  # type: ignore[return-value]

    @property
    def normal(self) -> tuple[float, float, float]:
        n = self.plan.normal
        return float(n[0]), float(n[1]), float(n[2])

    @property
    def plane(self) -> SlicePlane:
        return self.plan.plane

    @property
    def modality(self) -> str:
        return self.plan.modality

    @property
    def series_instance_uid(self) -> str:
        return self.plan.series_instance_uid

    @property
    def frame_of_reference_uid(self) -> str | None:
        return self.plan.frame_of_reference_uid

    @property
    def aligned(self) -> bool:
        return self.plan.aligned

    @property
    def notes(self) -> tuple[str, ...]:
        return self.plan.notes

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x)."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOP Instance UID of each source frame, in :attr:`frames` order."""
        return tuple(f.sop_instance_uid for f in self.frames)

    @property
    def frame_refs(self) -> tuple[str, ...]:
        """:attr:`Frame.ref` of each source frame (``uid`` or ``uid#frame``)."""
        return tuple(f.ref for f in self.frames)

    @property
    def positions(self) -> np.ndarray:
        """(frames, 3) Image Position (Patient) of every source frame."""
        return np.stack([f.position for f in self.frames])

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping grid indices (k, i, j, 1) to patient coordinates (mm, LPS)."""
        return _affine(self.plan)

    def to_highdicom(self) -> hd.Volume:
        """The grid as a ``highdicom.Volume`` (patient coordinate system)."""
        return hd.Volume(
            np.asarray(self.array),
            self.affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=self.frame_of_reference_uid,
        )

    def mask_on_frames(self, mask: np.ndarray) -> np.ndarray:
        """A label mask on the grid, sampled onto each source frame (nearest neighbour).

        Parameters
        ----------
        mask
            (z, y, x) labels on this volume's grid.

        Returns
        -------
        numpy.ndarray
            (frames, rows, columns) of the same dtype, in :attr:`frames` order; pixels
            of a frame that fall outside the grid are 0.
        """
        if mask.shape != self.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected the grid's {self.shape}")
        if self.aligned:
            return np.ascontiguousarray(mask)
        out = np.zeros((len(self.frames), *self.shape[1:]), dtype=mask.dtype)
        for f, (slot, (di, dj)) in enumerate(zip(self.plan.slots, self.plan.shifts, strict=True)):
            if not 0 <= slot < self.shape[0]:
                continue
            out[f] = _shift_nearest(mask[slot], di, dj)
        return out

    def grid_from_frames(self, on_frames: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`mask_on_frames`: labels on the source frames onto the grid.

        Grid slices no frame lies in (interpolated slices of a gap) take the labels of
        the nearest frame along the normal.
        """
        expected = (len(self.frames), *self.shape[1:])
        if on_frames.shape != expected:
            raise ValueError(f"labels have shape {on_frames.shape}, expected {expected}")
        if self.aligned:
            return np.ascontiguousarray(on_frames)
        out = np.zeros(self.shape, dtype=on_frames.dtype)
        slots = np.array(self.plan.slots)
        for k in range(self.shape[0]):
            f = int(np.argmin(np.abs(slots - k)))
            di, dj = self.plan.shifts[f]
            out[k] = _shift_nearest(on_frames[f], -di, -dj)
        return out


def _shift_nearest(plane: np.ndarray, di: float, dj: float) -> np.ndarray:
    """``out[i, j] = plane[round(i - di), round(j - dj)]``, 0 outside."""
    si, sj = int(round(di)), int(round(dj))
    out = np.zeros_like(plane)
    rows, cols = plane.shape
    src_i = slice(max(0, -si), min(rows, rows - si))
    dst_i = slice(max(0, si), min(rows, rows + si))
    src_j = slice(max(0, -sj), min(cols, cols - sj))
    dst_j = slice(max(0, sj), min(cols, cols + sj))
    # out[i] = plane[i - si]: destination rows si.., source rows 0..
    out[dst_i, dst_j] = plane[src_i, src_j]
    return out


def _affine(plan: VolumePlan) -> np.ndarray:
    dz, dy, dx = plan.spacing
    row_dir = plan.orientation[:3]
    col_dir = plan.orientation[3:]
    out = np.eye(4)
    out[:3, 0] = plan.normal * dz
    out[:3, 1] = col_dir * dy
    out[:3, 2] = row_dir * dx
    out[:3, 3] = plan.origin
    return out


# --------------------------------------------------------------------------- planning


def _dedupe(datasets: Sequence[Dataset]) -> list[int]:
    """Indices of datasets kept: a repeated SOP instance is kept once."""
    seen: set[str] = set()
    kept = []
    for i, ds in enumerate(datasets):
        uid = str(safe_get(ds, "SOPInstanceUID", "")).strip()
        if uid and uid in seen:
            continue
        seen.add(uid)
        kept.append(i)
    return kept


def _group_by_grid(frames: list[Frame]) -> list[list[Frame]]:
    groups: list[list[Frame]] = []
    for fr in frames:
        for g in groups:
            ref = g[0]
            if (
                ref.rows == fr.rows
                and ref.columns == fr.columns
                and np.max(np.abs(ref.orientation - fr.orientation)) <= _ORIENTATION_TOLERANCE
                and np.max(np.abs(ref.pixel_spacing - fr.pixel_spacing))
                <= 1e-4 * max(1.0, float(ref.pixel_spacing.max()))
            ):
                g.append(fr)
                break
        else:
            groups.append([fr])
    return groups


def _split_4d(frames: list[Frame], normal: np.ndarray) -> list[list[Frame]]:
    """Frames at repeated positions -> 3D volumes by acquisition order at each position."""
    along = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(along, kind="stable")
    clusters: list[list[Frame]] = []
    last = -math.inf
    for k in order:
        if clusters and along[k] - last <= _SAME_POSITION_MM:
            clusters[-1].append(frames[k])
        else:
            clusters.append([frames[k]])
        last = along[k]
    depth = max(len(c) for c in clusters)
    volumes: list[list[Frame]] = [[] for _ in range(depth)]
    for c in clusters:
        for rank, fr in enumerate(sorted(c, key=lambda f: (f.order, f.dataset_index))):
            volumes[rank].append(fr)
    return volumes


def plan_volume(datasets: Sequence[Dataset], *, min_slices: int = 1) -> VolumePlan:
    """Decide how ``datasets`` (one series, headers suffice) become a volume.

    Parameters
    ----------
    datasets
        The instances of one series, in any order. Repeated copies of one SOP
        instance are used once; an instance whose geometry cannot be read is left
        out (and said so in the notes), the rest still make a volume.
    min_slices
        Fewest frames the volume must have (at least 1).

    Raises
    ------
    ValueError
        ``min_slices`` < 1.
    InferenceError
        No volume can be made, with the reason: no placeable frame (each
        instance's reason), fewer frames than ``min_slices``, several frames of
        reference or modalities in the chosen stack, or positions too scattered to
        form a stack.
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be at least 1, got {min_slices}")
    if len(datasets) == 0:
        raise InferenceError("series has no instances")
    kept = _dedupe(datasets)
    frames, refused = frames_of([datasets[i] for i in kept])
    # frames_of numbered them within ``kept``: restore the caller's indices
    frames = [_reindex(f, kept[f.dataset_index]) for f in frames]
    notes: list[str] = []
    if not frames:
        reasons = "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else "")
        raise InferenceError(f"no instance of the series can be placed in 3D ({reasons})")
    if refused:
        notes.append(f"{len(refused)} instance(s) left out: {refused[0]}")

    groups = _group_by_grid(frames)
    if len(groups) > 1:
        groups.sort(key=lambda g: -len(g))  # stable: the first seen wins a tie
        notes.append(
            f"series mixes {len(groups)} orientations or pixel grids; "
            f"the largest stack ({len(groups[0])} frames) is used"
        )
    stack = groups[0]
    normal = stack[0].normal

    volumes = _split_4d(stack, normal)
    n_volumes = len(volumes)
    chosen = 0
    if n_volumes > 1:
        sizes = [len(v) for v in volumes]
        chosen = sizes.index(max(sizes))
        notes.append(
            f"4D series: {n_volumes} volumes by acquisition order at each of "
            f"{sizes[0]} positions; volume {chosen + 1} ({sizes[chosen]} frames) is used"
        )
    frames = volumes[chosen]
    if len(frames) < min_slices:
        raise InferenceError(f"series has {len(frames)} slices, expected at least {min_slices}")

    used = [datasets[i] for i in sorted({f.dataset_index for f in frames})]
    series_uids = {str(safe_get(ds, "SeriesInstanceUID", "")).strip() for ds in used}
    if len(series_uids) != 1 or series_uids == {""}:
        raise InferenceError("instances do not share one SeriesInstanceUID")
    modalities = {str(safe_get(ds, "Modality", "") or "").strip() for ds in used}
    if len(modalities) != 1:
        raise InferenceError(f"series mixes {len(modalities)} modalities (Modality)")
    fors = {str(safe_get(ds, "FrameOfReferenceUID", "") or "").strip() for ds in used} - {""}
    if len(fors) > 1:
        raise InferenceError(f"series mixes {len(fors)} frames of reference (FrameOfReferenceUID)")
    if not fors:
        notes.append("no FrameOfReferenceUID: the stack's own geometry is used")

    return _grid(
        frames,
        normal,
        series_instance_uid=series_uids.pop(),
        modality=modalities.pop(),
        frame_of_reference_uid=fors.pop() if fors else None,
        notes=notes,
        n_volumes=n_volumes,
    )


def _reindex(frame: Frame, index: int) -> Frame:
    return Frame(
        dataset_index=index,
        sop_instance_uid=frame.sop_instance_uid,
        frame_number=frame.frame_number,
        rows=frame.rows,
        columns=frame.columns,
        orientation=frame.orientation,
        position=frame.position,
        pixel_spacing=frame.pixel_spacing,
        slice_thickness=frame.slice_thickness,
        spacing_between_slices=frame.spacing_between_slices,
        order=frame.order,
    )


def _grid(
    frames: list[Frame],
    normal: np.ndarray,
    *,
    series_instance_uid: str,
    modality: str,
    frame_of_reference_uid: str | None,
    notes: list[str],
    n_volumes: int,
) -> VolumePlan:
    along_all = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(along_all, kind="stable")
    frames = [frames[k] for k in order]
    along = along_all[order]
    first = frames[0]
    dy, dx = (float(v) for v in first.pixel_spacing)
    row_dir, col_dir = first.row_direction, first.column_direction

    if len(frames) == 1:
        dz = first.spacing_between_slices or first.slice_thickness
        if dz is None:
            dz = 1.0
            notes.append("a single slice without SliceThickness: 1 mm assumed")
        return VolumePlan(
            frames=tuple(frames),
            shape=(1, first.rows, first.columns),
            spacing=(float(dz), dy, dx),
            origin=first.position.copy(),
            orientation=first.orientation.copy(),
            slots=(0,),
            shifts=((0.0, 0.0),),
            series_instance_uid=series_instance_uid,
            modality=modality,
            frame_of_reference_uid=frame_of_reference_uid,
            notes=tuple(notes),
            n_volumes=n_volumes,
        )

    gaps = np.diff(along)
    dz = float(np.median(gaps))
    if not dz > 0:
        raise InferenceError("slice positions do not advance along the slice normal")
    span = along[-1] - along[0]
    n_slots = int(round(span / dz)) + 1
    slot_f = (along - along[0]) / dz
    slots = np.rint(slot_f).astype(int)
    off_slot = np.abs(slot_f - slots) > 0.1
    uneven = bool(off_slot.any()) or len(set(slots.tolist())) != len(slots)
    if (uneven and gaps.max() > _MAX_GAP_RATIO * gaps.min()) or n_slots > _MAX_GRID_FACTOR * len(
        frames
    ):
        raise InferenceError(
            f"slice positions are too scattered to form a stack ({len(frames)} frames, "
            f"gaps from {gaps.min():.2f} to {gaps.max():.2f} mm)"
        )
    origin = first.position.copy()
    shifts = []
    for f in frames:
        delta = first.position - f.position
        shifts.append((float(delta @ col_dir / dy), float(delta @ row_dir / dx)))
    drift = max(math.hypot(di * dy, dj * dx) for di, dj in shifts)
    sheared = drift > max(_SAME_POSITION_MM, 0.1 * min(dy, dx))
    if not sheared:
        shifts = [(0.0, 0.0)] * len(frames)
    if uneven:
        # uneven spacing that no slot pattern fits: each frame to its nearest slot,
        # values interpolated from the true positions (see _resample)
        notes.append(
            f"uneven slice spacing (median {dz:.3f} mm): resampled onto a regular grid"
        )
    elif n_slots != len(frames):
        notes.append(
            f"{n_slots - len(frames)} missing slice(s) (median spacing {dz:.3f} mm): "
            "interpolated onto a regular grid"
        )
    if sheared:
        notes.append(
            f"sheared stack (in-plane drift up to {drift:.2f} mm, e.g. gantry tilt): "
            "resampled onto a regular grid"
        )
    return VolumePlan(
        frames=tuple(frames),
        shape=(n_slots, first.rows, first.columns),
        spacing=(dz, dy, dx),
        origin=origin,
        orientation=first.orientation.copy(),
        slots=tuple(int(s) for s in slots),
        shifts=tuple(shifts),
        series_instance_uid=series_instance_uid,
        modality=modality,
        frame_of_reference_uid=frame_of_reference_uid,
        notes=tuple(notes),
        n_volumes=n_volumes,
    )


# --------------------------------------------------------------------------- assembly


def _headers_only(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            out.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def _decode_frames(datasets: Sequence[Dataset], frames: Sequence[Frame]) -> list[np.ndarray]:
    images: dict[int, hd.Image] = {}
    out = []
    for fr in frames:
        ds = datasets[fr.dataset_index]
        image = None
        if fr.frame_number is not None:
            if fr.dataset_index not in images:
                try:
                    images[fr.dataset_index] = hd.Image.from_dataset(ds, copy=False)
                except Exception as exc:  # highdicom raises many kinds on odd objects
                    raise InferenceError(
                        f"instance {fr.dataset_index}: multi-frame object cannot be read "
                        f"({type(exc).__name__})"
                    ) from None
            image = images[fr.dataset_index]
        out.append(frame_pixels(ds, fr, image))
    return out


def _resample(plan: VolumePlan, slices: list[np.ndarray]) -> np.ndarray:
    """Values of the source frames on the plan's grid (see the module docstring)."""
    nz, rows, cols = plan.shape
    fill = float(min(float(s.min()) for s in slices))
    along = np.array([float((f.position - plan.origin) @ plan.normal) for f in plan.frames])
    dz = plan.spacing[0]

    def shifted(f: int) -> np.ndarray:
        di, dj = plan.shifts[f]
        if not (di or dj):
            return slices[f]
        # out[i, j] = src[i + di, j + dj]: ndimage.shift moves content by -d
        return ndimage.shift(slices[f], (-di, -dj), order=1, mode="constant", cval=fill)

    cache: dict[int, np.ndarray] = {}

    def get(f: int) -> np.ndarray:
        # consecutive grid slices reuse the same two frames: keep the last few shifted
        if f not in cache:
            if len(cache) > 4:
                cache.clear()
            cache[f] = shifted(f)
        return cache[f]

    out = np.empty((nz, rows, cols), dtype=np.float32)
    for k in range(nz):
        z = k * dz
        hi = int(np.searchsorted(along, z, side="left"))
        if hi < len(along) and abs(along[hi] - z) <= 1e-3 * dz:
            out[k] = get(hi)
            continue
        if hi > 0 and abs(along[hi - 1] - z) <= 1e-3 * dz:
            out[k] = get(hi - 1)
            continue
        lo = max(0, hi - 1)
        hi = min(len(along) - 1, hi)
        if lo == hi:
            out[k] = get(lo)
            continue
        w = (z - along[lo]) / (along[hi] - along[lo])
        out[k] = (1.0 - w) * get(lo) + w * get(hi)
    return out


def assemble_volume(
    datasets: Sequence[Dataset],
    *,
    min_slices: int = 1,
) -> Volume:
    """Assemble one series into a :class:`Volume` (see the module docstring).

    Parameters
    ----------
    datasets
        The instances of one series, with Pixel Data, in any order.
    min_slices
        Fewest frames accepted (at least 1).

    Returns
    -------
    Volume
        Values after the Modality LUT as float32, on a regular grid.

    Raises
    ------
    ValueError
        ``min_slices`` < 1.
    InferenceError
        The series cannot form a volume (see :func:`plan_volume`), or pixel data of a
        frame it needs cannot be decoded.

    Notes
    -----
    Checks geometry and decodability; it does not guarantee the series is complete
    (a slice missing at either end of the stack is undetectable).
    """
    plan = plan_volume(datasets, min_slices=min_slices)
    slices = _decode_frames(datasets, plan.frames)
    if plan.aligned:
        array = np.stack(slices).astype(np.float32, copy=False)
    else:
        array = _resample(plan, slices)
    array.flags.writeable = False
    seen: list[int] = []
    for f in plan.frames:
        if f.dataset_index not in seen:
            seen.append(f.dataset_index)
    return Volume(
        array=array,
        plan=plan,
        headers=tuple(_headers_only(datasets[i]) for i in seen),
    )


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class SeriesSummary:
    """What series selection needs to know about one series, read from headers only."""

    series_instance_uid: str
    modality: str
    n_instances: int
    """Distinct SOP instances."""
    plane: SlicePlane | None
    """None when no volume can be made from the series."""
    slice_spacing_mm: float | None
    """Slice spacing of the volume the series makes; None when unknown."""
    series_number: int | None = None
    series_description: str = ""
    multi_frame: bool = False
    n_slices: int = 0
    """Frames in the volume the series makes (0: no volume)."""
    volume_note: str = ""
    """Why no volume can be made, or what assembly will do (resampling, 4D split)."""
    sop_class_uid: str = ""
    body_part: str = ""


def summarize_series(datasets: Sequence[Dataset]) -> SeriesSummary:
    """Summarise one series from its headers (Pixel Data is not touched).

    Never raises for a malformed value in an instance: such an instance costs only
    itself (or the series' volume, whose reason is kept in ``volume_note``).

    Raises
    ------
    InferenceError
        ``datasets`` is empty.
    """
    if len(datasets) == 0:
        raise InferenceError("series has no instances")
    first = datasets[0]
    uids = {str(safe_get(ds, "SOPInstanceUID", "")) for ds in datasets}
    multi = False
    for ds in datasets:
        try:
            multi = multi or number_of_frames(ds) > 1
        except InferenceError:
            pass
    plane: SlicePlane | None = None
    spacing: float | None = None
    n_slices = 0
    try:
        plan = plan_volume(datasets)
        plane = plan.plane
        n_slices = len(plan.frames)
        spacing = plan.spacing[0] if len(plan.frames) > 1 else None
        note = "; ".join(plan.notes)
    except InferenceError as exc:
        note = str(exc)
    if spacing is None:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = float(safe_get(first, keyword) or 0)
            except (TypeError, ValueError):
                continue
            if value > 0 and math.isfinite(value):
                spacing = value
                break
    return SeriesSummary(
        series_instance_uid=str(safe_get(first, "SeriesInstanceUID", "")),
        modality=str(safe_get(first, "Modality", "") or ""),
        n_instances=len(uids),
        plane=plane,
        slice_spacing_mm=spacing,
        series_number=safe_int(safe_get(first, "SeriesNumber")),
        series_description=str(safe_get(first, "SeriesDescription", "") or ""),
        multi_frame=multi,
        n_slices=n_slices,
        volume_note=note,
        sop_class_uid=str(safe_get(first, "SOPClassUID", "") or ""),
        body_part=str(safe_get(first, "BodyPartExamined", "") or ""),
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
        Series of one study, each as a :class:`SeriesSummary` or as its list of
        datasets (headers suffice; they are summarised with :func:`summarize_series`).
    modality
        Required Modality (e.g. ``"CT"``); None accepts any.
    plane
        Required :class:`SlicePlane`; None accepts any, including unknown.
    min_slices
        Fewest slices in the volume the series makes.
    max_slice_spacing_mm
        Reject series whose slice spacing is larger (or unknown).
    description_pattern
        Regular expression that Series Description must match (``re.search``,
        case-insensitive); None accepts any.

    Returns
    -------
    The chosen candidate itself (same object). Among matches: smallest slice
    spacing, then most slices, then lowest Series Number, then Series Instance UID,
    so the choice is deterministic.

    Raises
    ------
    ValueError
        ``plane`` is not a :class:`SlicePlane` value.
    InferenceError
        No candidate matches; the message gives each candidate's reason, by index
        (no descriptions or UIDs).
    """
    wanted_plane = SlicePlane(plane) if plane is not None else None
    pattern = re.compile(description_pattern, re.IGNORECASE) if description_pattern else None
    matches: list[tuple[tuple[float, int, int, str], int]] = []
    reasons: list[str] = []
    for i, cand in enumerate(candidates):
        s = cand if isinstance(cand, SeriesSummary) else summarize_series(cand)
        why = None
        if modality is not None and s.modality != modality:
            why = f"modality {s.modality or 'missing'}, expected {modality}"
        elif s.n_slices == 0:
            why = f"no volume: {s.volume_note}"
        elif wanted_plane is not None and s.plane != wanted_plane:
            why = f"plane {s.plane.value if s.plane else 'unknown'}, expected {wanted_plane.value}"
        elif s.n_slices < min_slices:
            why = f"{s.n_slices} slices, expected at least {min_slices}"
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
            -s.n_slices,
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

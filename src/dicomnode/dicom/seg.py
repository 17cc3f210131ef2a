"""Build a classic BINARY Segmentation (PS3.3 A.51) from a label mask, and read one back.

The builder wraps :class:`highdicom.seg.Segmentation` with
``segmentation_type="BINARY"`` (SOP class 1.2.840.10008.5.1.4.1.1.66.4). The
Label Map Segmentation SOP class (…66.7) is not used: Orthanc 1.10 and dcmtk
3.6.7 refuse it (ecosystem.md §2).

Pure: no files, no network. The builder validates all arguments before
handing them to highdicom and raises ``ValueError`` naming the parameter
(actual vs expected); the reader raises :class:`~dicomnode.errors.DatasetError`
for a SEG it cannot use.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    SegmentationStorage,
)

from dicomnode.dicom.findings import (
    AlgorithmSpec,
    CodeTriple,
    DeviceSpec,
    InstanceReference,
    as_code,
    check_lo,
    check_uid,
    derived_uid,
    pin_times,
)
from dicomnode.dicom.frames import Frame, image_frames, number_of_frames
from dicomnode.errors import DatasetError

__all__ = [
    "REPLACED_PURPOSE",
    "AlgorithmSpec",
    "DeviceSpec",
    "InstanceReference",
    "SegmentAlgorithmTypeValues",
    "SegmentSpec",
    "build_seg",
    "read_seg",
]

SegmentAlgorithmTypeValues = hd.seg.SegmentAlgorithmTypeValues
"""Segment Algorithm Type (0062,0008) defined terms: AUTOMATIC, SEMIAUTOMATIC, MANUAL."""

REPLACED_PURPOSE = CodeTriple("DCM", "121360", "Replaced report")
"""Purpose of Reference for a superseded predecessor (CID 7009 "Purpose of Reference to
Predecessor Report"); used for SEG and SR alike."""

_LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless)
# highdicom reads these Type 2 attributes from the first source image directly
# (seg/sop.py); de-identification must keep them present, empty if need be.
_TYPE2_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a SEG: a model label and how to describe it (PS3.3 C.8.20.2 Segment Sequence).

    ``category`` and ``type`` are codes from CID 7150 "Segmentation Property
    Category" and CID 7151 "Segmentation Property Type" (e.g. category
    ("SCT", "49755003", "Morphologically Abnormal Structure"), type ("SCT",
    "108369006", "Neoplasm")); a (scheme, value, meaning) tuple or a pydicom
    ``Code`` is coerced to :class:`~dicomnode.dicom.findings.CodeTriple`.
    """

    number: int
    """Segment Number, equal to the label value in the mask (1..N)."""
    label: str
    """Segment Label (LO)."""
    category: CodeTriple
    type: CodeTriple
    rgb: tuple[int, int, int] | None = None
    """Recommended display colour, 0..255 each; written as Recommended Display CIELab Value."""
    algorithm_type: SegmentAlgorithmTypeValues | str = SegmentAlgorithmTypeValues.AUTOMATIC

    def __post_init__(self) -> None:
        if (
            isinstance(self.number, bool)
            or not isinstance(self.number, int)
            or not 1 <= self.number <= 65535
        ):
            raise ValueError(f"SegmentSpec.number must be an int in 1..65535, got {self.number!r}")
        check_lo(self.label, "SegmentSpec.label")
        if not self.label.strip():
            raise ValueError("SegmentSpec.label must not be empty")
        object.__setattr__(self, "category", as_code(self.category, "SegmentSpec.category"))
        object.__setattr__(self, "type", as_code(self.type, "SegmentSpec.type"))
        try:
            object.__setattr__(
                self, "algorithm_type", SegmentAlgorithmTypeValues(self.algorithm_type)
            )
        except ValueError:
            raise ValueError(
                "SegmentSpec.algorithm_type must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, "
                f"got {self.algorithm_type!r}"
            ) from None
        if self.rgb is not None:
            if len(self.rgb) != 3 or not all(
                isinstance(c, int | np.integer) and not isinstance(c, bool) and 0 <= c <= 255
                for c in self.rgb
            ):
                raise ValueError(f"SegmentSpec.rgb must be three ints in 0..255, got {self.rgb!r}")
            object.__setattr__(self, "rgb", tuple(int(c) for c in self.rgb))


def _check_cs(value: str, name: str) -> None:
    # Code String (PS3.5 6.2): upper-case letters, digits, space, underscore; 16 characters.
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 16
        or not all(c.isdigit() or ("A" <= c <= "Z") or c in " _" for c in value)
    ):
        raise ValueError(
            f"{name} must be 1-16 characters of A-Z, 0-9, space or underscore, got {value!r}"
        )


def _check_positive_int(value: object, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not 1 <= int(value) <= 2**31 - 1
    ):
        raise ValueError(f"{name} must be an int in 1..2147483647 (IS), got {value!r}")
    return int(value)


def _check_sources(
    source_datasets: Sequence[Dataset], frame_numbers: Sequence[int] | None
) -> tuple[int, int, int]:
    """(rows, columns, frames the mask must have) of valid sources."""
    if len(source_datasets) == 0:
        raise ValueError("source_datasets is empty, expected at least one source image")
    for i, ds in enumerate(source_datasets):
        if not isinstance(ds, Dataset):
            raise ValueError(
                f"source_datasets[{i}] is a {type(ds).__name__}, expected a pydicom Dataset"
            )
        for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
            if keyword not in ds:
                raise ValueError(f"source_datasets[{i}] lacks {keyword}")
    n_frames = [number_of_frames(ds) for ds in source_datasets]
    multi = len(source_datasets) == 1 and (
        n_frames[0] > 1 or "PerFrameFunctionalGroupsSequence" in source_datasets[0]
    )
    if multi:
        ds = source_datasets[0]
        for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            if keyword not in ds:
                raise ValueError(f"source_datasets[0] is multi-frame but lacks {keyword}")
        if frame_numbers is not None:
            bad = [f for f in frame_numbers if not 1 <= int(f) <= n_frames[0]]
            if bad or len(set(frame_numbers)) != len(frame_numbers) or not frame_numbers:
                raise ValueError(
                    f"frame_numbers must be distinct frames in 1..{n_frames[0]}, "
                    f"got {list(frame_numbers)}"
                )
        expected = len(frame_numbers) if frame_numbers is not None else n_frames[0]
    else:
        if frame_numbers is not None:
            raise ValueError("frame_numbers is only for one multi-frame source image")
        for i, ds in enumerate(source_datasets):
            if n_frames[i] > 1:
                raise ValueError(
                    f"source_datasets[{i}] is multi-frame; pass it alone, not in a list of "
                    "single-frame images"
                )
            for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                if keyword not in ds:
                    raise ValueError(f"source_datasets[{i}] lacks {keyword}")
        expected = len(source_datasets)
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
    ):
        values = {str(ds.get(keyword, "")) for ds in source_datasets}
        if len(values) != 1 or values == {""}:
            raise ValueError(
                f"source_datasets must share one {keyword}, got {len(values)} different values"
            )
    for keyword in _TYPE2_SOURCE:
        if keyword not in source_datasets[0]:
            raise ValueError(
                f"source_datasets[0] lacks {keyword} (Type 2: keep it present, empty if need be)"
            )
    uids = [str(ds.SOPInstanceUID) for ds in source_datasets]
    if len(set(uids)) != len(uids):
        raise ValueError("source_datasets contains the same SOPInstanceUID more than once")
    return int(source_datasets[0].Rows), int(source_datasets[0].Columns), expected


def _check_segments(segments: Sequence[SegmentSpec]) -> None:
    if len(segments) == 0:
        raise ValueError("segments is empty, expected at least one SegmentSpec")
    for i, s in enumerate(segments):
        if not isinstance(s, SegmentSpec):
            raise ValueError(f"segments[{i}] is a {type(s).__name__}, expected SegmentSpec")
    numbers = [s.number for s in segments]
    # BINARY segments are numbered 1..N in order (PS3.3 C.8.20.2 requires 1-based,
    # monotonically increasing by 1; highdicom enforces the order too).
    if numbers != list(range(1, len(segments) + 1)):
        raise ValueError(f"segments must be numbered 1..{len(segments)} in order, got {numbers}")


def _check_mask(
    mask: object, n_frames: int, rows: int, columns: int, n_segments: int
) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim != 3 or mask.shape != (n_frames, rows, columns):
        raise ValueError(
            f"mask has shape {mask.shape}, expected (frames, y, x) = ({n_frames}, {rows}, "
            f"{columns}) matching the source frames and their Rows/Columns"
        )
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if mask.dtype.kind != "u":
        raise ValueError(
            f"mask has dtype {mask.dtype}, expected an unsigned integer type (uint8) or bool"
        )
    top = int(mask.max()) if mask.size else 0
    if top > n_segments:
        raise ValueError(
            f"mask contains label {top}, but only segments 1..{n_segments} are declared"
        )
    return mask


def build_seg(
    source_datasets: Sequence[Dataset],
    mask: np.ndarray,
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmSpec,
    *,
    device: DeviceSpec,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    content_label: str = "AI_SEGMENTATION",
    content_description: str | None = None,
    series_description: str | None = None,
    supersedes: InstanceReference | None = None,
    content_datetime: _dt.datetime | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    frame_numbers: Sequence[int] | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY Segmentation instance from a label mask.

    Parameters
    ----------
    source_datasets
        The source images (headers suffice; Pixel Data is not needed): either
        single-frame images of one series, ``mask[k]`` lying on
        ``source_datasets[k]``, or exactly one multi-frame image (Enhanced or
        Legacy Converted), ``mask[k]`` lying on its frame ``frame_numbers[k]``.
        Patient and study attributes are copied from them, so build on the
        headers the SEG is meant to carry (original or pseudonymous), made
        usable by :func:`dicomnode.dicom.sources.sanitized_sources`.
    mask
        (frames, y, x) unsigned integer labels: 0 background, ``n`` segment ``n``.
    segments
        One :class:`SegmentSpec` per model label, numbered 1..N in order. Every
        declared segment is kept in the Segment Sequence, even when empty.
    algorithm
        The model; written in every segment's Segmentation Algorithm
        Identification Sequence (except MANUAL segments, which have none).
    device
        The node as the creating equipment (General Equipment Module).
    series_instance_uid, sop_instance_uid, series_number, instance_number
        Identifiers, used as given (the caller derives deterministic ones).
    content_label
        Content Label (CS: A-Z, 0-9, space, underscore; 16 characters).
    content_description
        Content Description (LO); None leaves it out.
    series_description
        Series Description (LO); None gives "<algorithm name> <version> SEG".
    supersedes
        An earlier SEG this one replaces (same study). Segmentation has no
        predecessor attribute like SR's Predecessor Documents Sequence, so it
        is referenced from the General Image Module's Referenced Instance
        Sequence (0008,114A) with Purpose of Reference (121360, DCM,
        "Replaced report") from CID 7009, and listed in the Common Instance
        Reference Module as the standard asks of every referenced instance
        (after the source series, which stays item 1 for viewers that read
        only that). Viewers do not act on it; retracting the old SEG from a
        PACS needs an IHE IOCM rejection note, which this does not make.
    content_datetime
        Content, Series and Instance Creation Date/Time; None uses now. Pass
        a fixed value for byte-identical rebuilds.
    transfer_syntax_uid
        Explicit VR Little Endian (default), Implicit VR Little Endian or
        JPEG 2000 Lossless (the only encapsulated syntax BINARY allows).
    frame_numbers
        For one multi-frame source: the (1-based, distinct) frame each mask
        frame lies on, e.g. the frames of one 3D volume of a 4D object; None
        means every frame in order. Each SEG frame references exactly its
        source frame (Derivation Image Sequence, Referenced Frame Number).

    Returns
    -------
    highdicom.seg.Segmentation
        A pydicom Dataset with file meta, ready to encode.

    Raises
    ------
    ValueError
        An argument is invalid; the message names it and gives actual vs
        expected.

    Notes
    -----
    **Empty segments.** Frames that are empty for a segment are omitted
    (``omit_empty_frames=True``), which is what viewers expect and keeps the
    object small; a declared segment with no pixels keeps its Segment
    Sequence item and simply has no frames. A SEG needs at least one frame,
    so a mask that is empty everywhere is encoded as one empty frame per
    segment on ``source_datasets[0]``; all source instances are still
    referenced (Referenced Series Sequence), so readers know which images
    were examined.

    Other sub-UIDs (Dimension Organization UID, segment Tracking UIDs) are
    derived from ``sop_instance_uid``, so equal inputs give equal objects.
    """
    rows, columns, n_frames = _check_sources(source_datasets, frame_numbers)
    _check_segments(segments)
    if not isinstance(algorithm, AlgorithmSpec):
        raise ValueError(f"algorithm must be an AlgorithmSpec, got {type(algorithm).__name__}")
    if not isinstance(device, DeviceSpec):
        raise ValueError(f"device must be a DeviceSpec, got {type(device).__name__}")
    mask = _check_mask(mask, n_frames, rows, columns, len(segments))
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    series_number = _check_positive_int(series_number, "series_number")
    instance_number = _check_positive_int(instance_number, "instance_number")
    _check_cs(content_label, "content_label")
    if content_description is not None:
        check_lo(content_description, "content_description")
    if series_description is None:
        series_description = f"{algorithm.name} {algorithm.version} SEG"[:64]
    check_lo(series_description, "series_description")
    study_uid = str(source_datasets[0].StudyInstanceUID)
    if supersedes is not None:
        if not isinstance(supersedes, InstanceReference):
            raise ValueError(
                f"supersedes must be an InstanceReference, got {type(supersedes).__name__}"
            )
        if supersedes.study_instance_uid != study_uid:
            raise ValueError(
                "supersedes must reference an instance of the same study as source_datasets"
            )
        if supersedes.sop_instance_uid == sop_instance_uid:
            raise ValueError("supersedes references the SOP instance being built")
    if transfer_syntax_uid not in _TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax_uid {transfer_syntax_uid} is not supported for BINARY SEG, "
            f"expected one of {', '.join(_TRANSFER_SYNTAXES)}"
        )

    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm.family.to_code(),
        version=algorithm.version,
        source=algorithm.source,
        parameters=dict(algorithm.parameters) if algorithm.parameters else None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.label,
            segmented_property_category=s.category.to_code(),
            segmented_property_type=s.type.to_code(),
            algorithm_type=s.algorithm_type,
            algorithm_identification=(
                None if s.algorithm_type == SegmentAlgorithmTypeValues.MANUAL else algorithm_id
            ),
            # Tracking UID links the segment to the SR measurement group about it.
            tracking_uid=derived_uid(sop_instance_uid, "segment", s.number),
            tracking_id=s.label,
            display_color=hd.color.CIELabColor.from_rgb(*s.rgb) if s.rgb is not None else None,
        )
        for s in segments
    ]

    sources = list(source_datasets)
    further: list[Dataset] | None = None
    omit_empty = True
    geometry: dict[str, object] = {}
    chosen: list[int] = []
    multi = len(sources) == 1 and (
        number_of_frames(sources[0]) > 1 or "PerFrameFunctionalGroupsSequence" in sources[0]
    )
    if multi:
        # Explicit geometry: highdicom then matches frames by position, which a 4D
        # object (several frames per position) makes ambiguous; _reference_frames
        # below sets each SEG frame's source frame exactly.
        all_frames = image_frames(sources[0], 0)
        chosen = list(frame_numbers) if frame_numbers is not None else list(
            range(1, len(all_frames) + 1)
        )
        if not mask.any():
            mask, chosen, omit_empty = mask[:1], chosen[:1], False
        first = all_frames[chosen[0] - 1]
        geometry = {
            "plane_positions": [
                hd.PlanePositionSequence(
                    hd.CoordinateSystemNames.PATIENT,
                    [float(v) for v in all_frames[f - 1].position],
                )
                for f in chosen
            ],
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, [float(v) for v in first.orientation]
            ),
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=[float(v) for v in first.pixel_spacing],
                slice_thickness=first.slice_thickness or first.spacing_between_slices or 1.0,
            ),
        }
    elif not mask.any():
        # highdicom would fall back to encoding every (empty) frame of every
        # segment; one empty frame per segment is enough for a valid object.
        mask = mask[:1]
        sources, further = sources[:1], sources[1:] or None
        omit_empty = False

    when = content_datetime
    dates = {}
    if when is not None:
        dates = {
            "content_date": when.date(),
            "content_time": when.time(),
            "series_date": when.date(),
            "series_time": when.time(),
        }
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.manufacturer_model_name,
        software_versions=device.software_versions,
        device_serial_number=device.device_serial_number,
        institution_name=device.institution_name,
        content_label=content_label,
        content_description=content_description,
        series_description=series_description,
        transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=omit_empty,
        further_source_images=further,
        **geometry,
        **dates,
    )
    if multi:
        _reference_frames(seg, sources[0], [all_frames[f - 1] for f in chosen])

    # highdicom draws a random Dimension Organization UID; derive it instead so a
    # rebuild of the same instance is the same object.
    dim_uid = derived_uid(sop_instance_uid, "dimension-organization")
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid
    if when is not None:
        pin_times(seg, when)
    if supersedes is not None:
        _add_predecessor(seg, supersedes)
    return seg


def _reference_frames(seg: Dataset, source: Dataset, frames: Sequence[Frame]) -> None:
    """Make each SEG frame's Source Image Sequence name exactly its source frame.

    ``frames`` are the source frames the mask was given on (one 3D volume, so
    their positions are distinct); a SEG frame is matched by its Plane Position.
    """
    by_position = {tuple(np.round(f.position, 3)): f for f in frames}
    purpose = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    for group in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(
            np.round([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient], 3)
        )
        frame = by_position.get(position)
        if frame is None or frame.frame_number is None:
            continue
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        ref.ReferencedFrameNumber = frame.frame_number
        ref.PurposeOfReferenceCodeSequence = [purpose]
        # the SEG frame lies exactly on its source frame (same plane, same pixel grid)
        ref.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationCodeSequence = [
            hd.sr.CodedConcept("113076", "DCM", "Segmentation")
        ]
        derivation.SourceImageSequence = [ref]
        group.DerivationImageSequence = [derivation]


def _add_predecessor(seg: Dataset, ref: InstanceReference) -> None:
    purpose = hd.sr.CodedConcept(
        REPLACED_PURPOSE.value, REPLACED_PURPOSE.scheme_designator, REPLACED_PURPOSE.meaning
    )
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    item.PurposeOfReferenceCodeSequence = [purpose]
    seg.ReferencedInstanceSequence = [item]

    instance = Dataset()
    instance.ReferencedSOPClassUID = ref.sop_class_uid
    instance.ReferencedSOPInstanceUID = ref.sop_instance_uid
    for series in seg.ReferencedSeriesSequence:
        if series.SeriesInstanceUID == ref.series_instance_uid:
            series.ReferencedInstanceSequence.append(instance)
            return
    series = Dataset()
    series.SeriesInstanceUID = ref.series_instance_uid
    series.ReferencedInstanceSequence = [instance]
    seg.ReferencedSeriesSequence.append(series)


# --------------------------------------------------------------------------- reading


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _referenced_uids(group: Dataset | None) -> list[str]:
    out: list[str] = []
    if group is None:
        return out
    for derivation in group.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            uid = source.get("ReferencedSOPInstanceUID")
            if uid:
                out.append(str(uid))
    return out


def _segment_specs(ds: Dataset) -> tuple[SegmentSpec, ...]:
    specs = []
    for i, item in enumerate(ds.get("SegmentSequence", [])):
        number = int(item.get("SegmentNumber", 0))
        if number == 0:
            continue  # the background segment of a LABELMAP SEG
        try:
            rgb = None
            if "RecommendedDisplayCIELabValue" in item:
                lab = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue)
                rgb = lab.to_rgb(clip=True)

            def code(keyword: str, item: Dataset = item) -> CodeTriple:
                c = item[keyword][0]
                return CodeTriple(
                    str(c.CodingSchemeDesignator), str(c.CodeValue), str(c.CodeMeaning)
                )

            specs.append(
                SegmentSpec(
                    number=number,
                    label=str(item.get("SegmentLabel", "")).strip() or f"Segment {number}",
                    category=code("SegmentedPropertyCategoryCodeSequence"),
                    type=code("SegmentedPropertyTypeCodeSequence"),
                    rgb=rgb,
                    algorithm_type=str(item.get("SegmentAlgorithmType", "AUTOMATIC")),
                )
            )
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise DatasetError(f"SegmentSequence item {i + 1} is not usable: {exc}") from None
    if not specs:
        raise DatasetError("SegmentSequence is missing or empty")
    return tuple(specs)


def read_seg(
    ds: Dataset,
    source_sop_instance_uids: Sequence[str],
    *,
    source_positions: np.ndarray | Sequence[Sequence[float]] | None = None,
    position_tolerance_mm: float = 0.05,
    allow_overlap: bool = False,
) -> tuple[np.ndarray, tuple[SegmentSpec, ...]]:
    """Read a Segmentation back as a label mask aligned to given source instances.

    Meant for SEGs that come back to the node (e.g. corrected by a
    radiologist) to become training labels. Tolerant in: BINARY, FRACTIONAL
    and LABELMAP segmentations from any writer are read; what it relies on is
    checked.

    Parameters
    ----------
    ds
        The Segmentation dataset, with Pixel Data.
    source_sop_instance_uids
        The source images in the order the mask should have (e.g.
        ``Volume.sop_instance_uids``).
    source_positions
        (z, 3) Image Position (Patient) of those images (``Volume.positions``),
        used for frames that do not reference a source instance: such a frame
        is placed on the source image at the same position (within
        ``position_tolerance_mm``).
    position_tolerance_mm
        Distance within which a frame's position matches a source position.
    allow_overlap
        Segments of a BINARY/FRACTIONAL SEG may overlap; a label mask cannot
        show that. False raises; True lets the higher segment number win.

    Returns
    -------
    mask : numpy.ndarray
        (len(source_sop_instance_uids), Rows, Columns) labels, uint8 (uint16
        if a segment number exceeds 255): 0 background, else Segment Number.
        Images no frame maps to are all 0 (empty frames are commonly omitted).
    segments : tuple of SegmentSpec
        The Segment Sequence (LABELMAP background left out); ``rgb`` is
        converted back from CIELab and may differ by one from the original.

    Raises
    ------
    DatasetError
        Not a Segmentation; unreadable pixel data; a non-empty frame that maps
        to none of the given images (by reference or position); overlapping
        segments without ``allow_overlap``; a frame without segment number.

    Notes
    -----
    Frames map to images by the Referenced SOP Instance UID in the
    Derivation Image Sequence / Source Image Sequence of their Per-Frame (or
    Shared) Functional Groups (PS3.3 C.7.6.16.2.6), else by Plane Position.
    The SEG's pixel grid is assumed to be the source's: a SEG of a different
    matrix size or in-plane position is not resampled (compare
    ``mask.shape[1:]`` with the source before use). FRACTIONAL values count
    as inside above half of Maximum Fractional Value.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SegmentationStorage, _LABEL_MAP_SEGMENTATION_STORAGE):
        raise DatasetError("dataset is not a Segmentation (SOPClassUID)", status=0xA900)
    if not position_tolerance_mm > 0:
        raise ValueError(f"position_tolerance_mm must be > 0, got {position_tolerance_mm}")
    uids = [str(u) for u in source_sop_instance_uids]
    if not uids:
        raise ValueError("source_sop_instance_uids is empty")
    index = {uid: k for k, uid in enumerate(uids)}
    if len(index) != len(uids):
        raise ValueError("source_sop_instance_uids contains the same UID more than once")
    positions = None
    if source_positions is not None:
        positions = np.asarray(source_positions, dtype=float)
        if positions.shape != (len(uids), 3):
            raise ValueError(
                f"source_positions has shape {positions.shape}, expected ({len(uids)}, 3)"
            )

    segmentation_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if segmentation_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise DatasetError("SegmentationType is not BINARY, FRACTIONAL or LABELMAP")
    segments = _segment_specs(ds)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1))
        transfer_syntax = ds.file_meta.TransferSyntaxUID
        frames, _ = get_decoder(transfer_syntax).as_array(ds)
    except Exception as exc:  # pydicom raises many kinds for undecodable data
        raise DatasetError(
            f"Segmentation pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    frames = frames.reshape(n_frames, rows, columns)

    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    if len(per_frame) not in (0, n_frames):
        raise DatasetError(
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items, "
            f"expected NumberOfFrames ({n_frames})"
        )
    max_fraction = float(ds.get("MaximumFractionalValue", 255))
    top = max([s.number for s in segments])
    out = np.zeros((len(uids), rows, columns), dtype=np.uint8 if top <= 255 else np.uint16)

    for f in range(n_frames):
        group = per_frame[f] if per_frame else None
        frame = frames[f]
        if not frame.any():
            continue
        target = next(
            (index[u] for u in _referenced_uids(group) + _referenced_uids(shared) if u in index),
            None,
        )
        if target is None and positions is not None:
            plane = _first(group, "PlanePositionSequence") or _first(
                shared, "PlanePositionSequence"
            )
            if plane is not None and "ImagePositionPatient" in plane:
                pos = np.array([float(v) for v in plane.ImagePositionPatient])
                dist = np.linalg.norm(positions - pos, axis=1)
                if dist.min() <= position_tolerance_mm:
                    target = int(np.argmin(dist))
        if target is None:
            raise DatasetError(
                f"frame {f + 1} is not empty but maps to none of the given source images "
                "(no matching Referenced SOP Instance UID or Image Position (Patient))"
            )
        if segmentation_type == "LABELMAP":
            labels = frame.astype(out.dtype)
            out[target] = np.where(labels > 0, labels, out[target])
            continue
        ident = _first(group, "SegmentIdentificationSequence") or _first(
            shared, "SegmentIdentificationSequence"
        )
        if ident is None or "ReferencedSegmentNumber" not in ident:
            raise DatasetError(
                f"frame {f + 1} has no SegmentIdentificationSequence/ReferencedSegmentNumber"
            )
        number = int(ident.ReferencedSegmentNumber)
        inside = frame > max_fraction / 2 if segmentation_type == "FRACTIONAL" else frame > 0
        current = out[target]
        clash = inside & (current != 0) & (current != number)
        if clash.any():
            if not allow_overlap:
                raise DatasetError(
                    f"segments {sorted({int(v) for v in current[clash]} | {number})} overlap; "
                    "pass allow_overlap=True to let the higher number win"
                )
            current[inside] = np.maximum(current[inside], number)
        else:
            current[inside] = number
    return out, segments

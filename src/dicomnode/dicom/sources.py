"""Sanitised copies of source headers, for building SEG and SR objects on real data.

highdicom's SEG and SR constructors copy the Patient, Study and Frame of Reference
modules from the source images and read their geometry directly; a quirk in an
optional (Type 2 or 3) attribute of a real header then stops the result from being
written at all. Headers seen in real data that did this:

- Type 2 attributes absent (Patient Sex, Accession Number, Study ID...);
- Specific Character Set present but empty, or a single ``ISO 2022`` term (code
  extensions without a second encoding, which pydicom refuses to encode);
- Slice Thickness absent (anonymisers drop it), Pixel Measures only per frame or no
  Shared Functional Groups Sequence at all (Enhanced MR from some vendors);
- Image Orientation (Patient) differing in the last written decimals between slices;
- no Frame of Reference UID;
- values that break their VR (a Patient's Age of ``0Y``), which highdicom copies into
  the result, making it invalid in turn.

:func:`sanitized_sources` returns *copies* with those repaired from the volume's own
geometry; the originals are never changed. What it writes into the copies (a
surrogate Frame of Reference UID, a Slice Thickness equal to the slice spacing, one
shared orientation) is therefore what the SEG states about its own frames; the SEG
still references each source instance (and frame) by its UID.

Pure: datasets in, datasets out.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds, validate_value

from dicomnode.dicom.findings import derived_uid
from dicomnode.dicom.frames import Frame

__all__ = [
    "TYPE2_SOURCE_KEYWORDS",
    "sanitized_header",
    "sanitized_sources",
    "surrogate_frame_of_reference",
]

TYPE2_SOURCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient and General Study modules that highdicom reads
from the first source image (PS3.3 C.7.1.1, C.7.2.1)."""

_UTF8 = "ISO_IR 192"


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2) for a computed number."""
    return format_number_as_ds(float(value))

_SURROGATE = "surrogate-frame-of-reference"


def surrogate_frame_of_reference(series_instance_uid: str) -> str:
    """The Frame of Reference UID a SEG states for a series that has none.

    Derived from the Series Instance UID (a name-based UID, so every rebuild gives the
    same one); it identifies the series' own geometry and nothing else.
    """
    return derived_uid(_SURROGATE, series_instance_uid)


def _fix_character_set(ds: Dataset) -> None:
    raw = ds.get("SpecificCharacterSet")
    if raw is None:
        return
    values = [raw] if isinstance(raw, str) else list(raw)
    values = [str(v).strip() for v in values]
    # Decode every text value with the charset the object was written in, then say
    # UTF-8: pydicom encodes the decoded strings in whatever the copy declares.
    ds.decode()
    if not any(values) or values in (["ISO_IR 6"], ["ISO 2022 IR 6"]):
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = _UTF8


_CHECKED_VRS = frozenset({"AS", "DA", "DT", "TM", "DS", "IS", "UI", "CS", "AE", "SH", "LO", "PN"})
_STUDY_KEYWORDS = frozenset(
    {"StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
     "StudyDescription", "StudyInstanceUID"}
)


def _copied(elem: object) -> bool:
    # What highdicom copies into a result: the Patient module (group 0010) and the
    # General Study module. Geometry is not touched here (the volume assembly checked it).
    tag = elem.tag  # type: ignore[attr-defined]
    return tag.group == 0x0010 or elem.keyword in _STUDY_KEYWORDS  # type: ignore[attr-defined]


def _drop_invalid_values(ds: Dataset) -> None:
    """Remove copied values that break their VR (PS3.5 6.2); Type 2 ones are emptied.

    Results are built on these copies, so an invalid value here would become an invalid
    value in the SEG or SR the node sends.
    """
    for elem in list(ds):
        if not _copied(elem) or elem.VR not in _CHECKED_VRS or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        try:
            for v in values:
                validate_value(elem.VR, v, config.RAISE)
        except (ValueError, TypeError):
            if elem.keyword in TYPE2_SOURCE_KEYWORDS:
                elem.value = ""
            else:
                del ds[elem.tag]


def _shared_item(ds: Dataset) -> Dataset:
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        ds.SharedFunctionalGroupsSequence = [Dataset()]
        shared = ds.SharedFunctionalGroupsSequence
    return shared[0]


def _fix_multi_frame(ds: Dataset, frame: Frame, slice_thickness: float) -> None:
    """Put one Pixel Measures and one Plane Orientation item in the shared groups.

    Frames of one volume share them within tolerance (checked by the volume
    assembly); some vendors write them per frame only.
    """
    shared = _shared_item(ds)
    measures = shared.get("PixelMeasuresSequence")
    if not measures:
        item = Dataset()
        shared.PixelMeasuresSequence = [item]
    else:
        item = measures[0]
    item.PixelSpacing = [_ds(v) for v in frame.pixel_spacing]
    if not item.get("SliceThickness"):
        item.SliceThickness = _ds(slice_thickness)
    if not shared.get("PlaneOrientationSequence"):
        orient = Dataset()
        orient.ImageOrientationPatient = [_ds(v) for v in frame.orientation]
        shared.PlaneOrientationSequence = [orient]
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        # the shared items now carry these; a per-frame copy would contradict nothing,
        # but highdicom reads whichever it finds first
        for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
            if keyword in group:
                del group[keyword]


def sanitized_sources(
    headers: Sequence[Dataset],
    frames: Sequence[Frame],
    *,
    slice_thickness: float,
    surrogate_frame_of_reference_uid: str,
) -> list[Dataset]:
    """Copies of ``headers`` that highdicom can build a SEG or SR on.

    Parameters
    ----------
    headers
        The source datasets (Pixel Data need not be present), as in
        ``Volume.headers``.
    frames
        The source frames of those datasets (``Volume.frames``); the first one gives
        the orientation and pixel spacing written into the copies.
    slice_thickness
        Written where Slice Thickness is absent: the volume's slice spacing.
    surrogate_frame_of_reference_uid
        Written where Frame of Reference UID is absent (derive it deterministically
        from the series, so a rebuild gives the same object).

    Returns
    -------
    list of Dataset
        Repaired copies, in ``headers`` order.
    """
    if not headers or not frames:
        raise ValueError("headers and frames must not be empty")
    first = frames[0]
    out = []
    for h in headers:
        ds = copy.deepcopy(h)
        _fix_character_set(ds)
        _drop_invalid_values(ds)
        for keyword in TYPE2_SOURCE_KEYWORDS:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if not str(ds.get("FrameOfReferenceUID", "")).strip():
            ds.FrameOfReferenceUID = surrogate_frame_of_reference_uid
        if "PerFrameFunctionalGroupsSequence" in ds:
            _fix_multi_frame(ds, first, slice_thickness)
        else:
            if not ds.get("SliceThickness"):
                ds.SliceThickness = _ds(slice_thickness)
            # one orientation for the whole stack: equal within the assembly's tolerance
            ds.ImageOrientationPatient = [_ds(v) for v in first.orientation]
            ds.PixelSpacing = [_ds(v) for v in first.pixel_spacing]
        out.append(ds)
    return out


def sanitized_header(ds: Dataset) -> Dataset:
    """A header copy of one image (no Pixel Data) repaired as :func:`sanitized_sources`
    repairs a volume's, minus the geometry: character set, invalid copied values, Type 2
    attributes present. For results about single 2D images."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0:
            out.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    _fix_character_set(out)
    _drop_invalid_values(out)
    for keyword in TYPE2_SOURCE_KEYWORDS:
        if keyword not in out:
            setattr(out, keyword, "")
    return out

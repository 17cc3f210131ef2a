"""Re-identify an outgoing object built on de-identified data, and the guard before sending.

The node builds SEG/SR with highdicom from the de-identified instances, so the result
references pseudonymous Study/Series/SOP Instance and Frame of Reference UIDs and
carries the pseudonymous Patient and Study modules. :func:`reidentify` maps them
back (deid.md 5.6), following PS3.15 E.1.2 for the markers:

1. every UI value, at any depth and in the File Meta, that the vault knows is
   replaced by the original; UIDs it does not know are the object's own (its SOP
   Instance UID, Series Instance UID, tracking UIDs) and are left alone; but a
   *reference* (Referenced SOP Instance UID, Frame of Reference UID, a Study or
   Series Instance UID inside a sequence...) that the vault does not know is an
   error (deid.md 6 #110);
2. the Patient and General Study modules are rewritten from the original values;
3. other dates are un-shifted where they came from the de-identified data. A date
   ``d`` is taken as shifted when ``d - shift`` is not in the future: the shift is at
   least a year into the past, so a date the builder wrote at creation time (Content
   Date, Series Date = today) would land a year or more in the future and is kept,
   while a date copied from the sources returns to its true, past value. Times are
   never shifted (whole-day shifts), so they need nothing;
4. Patient Identity Removed, De-identification Method (+ Code Sequence),
   Longitudinal Temporal Information Modified and the de-identifying equipment item
   are removed (E.1.2 sets Patient Identity Removed to NO or removes it; removing
   keeps the result like the original objects, which had none);
5. :func:`assert_no_pseudonyms` runs last and refuses the object if anything is left.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.dicom.deid._elements import decoded, elem_text, encode_text, raw_element
from dicomnode.dicom.deid.records import IdentityRecord
from dicomnode.dicom.deid.values import shift_values
from dicomnode.errors import ReidentificationError

__all__ = ["MARKER_KEYWORDS", "assert_no_pseudonyms", "reidentify"]

MARKER_KEYWORDS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)
"""Attributes that mark an object as de-identified (PS3.15 E.1.1, E.2)."""

_MARKER_TAGS = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})
_CONTRIB_EQUIP = 0x0018A001
_DEID_EQUIPMENT = "109104"

# UIDs that point at other objects: when the vault does not know one, the object
# references something this node never de-identified, or the vault lost a row.
_REFERENCE_TAGS = frozenset(
    {
        0x00081155,  # Referenced SOP Instance UID
        0x00041511,  # Referenced SOP Instance UID in File
        0x30060024,  # Referenced Frame of Reference UID
        0x00200052,  # Frame of Reference UID
        0x00640003,  # Source Frame of Reference UID
        0x3006_00C2,  # Related Frame of Reference UID
    }
)
_NESTED_REFERENCE_TAGS = frozenset({0x0020000D, 0x0020000E})  # Study/Series Instance UID in items

# Restored from the identity record; never un-shifted by rule.
_RESTORED = {
    0x00100010: ("patient_name", "PN"),
    0x00100020: ("patient_id", "LO"),
    0x00100021: ("issuer_of_patient_id", "LO"),
    0x00100030: ("patient_birth_date", "DA"),
    0x00100040: ("patient_sex", "CS"),
    0x0020000D: ("study_instance_uid", "UI"),
    0x00080050: ("accession_number", "SH"),
    0x00200010: ("study_id", "SH"),
    0x00080020: ("study_date", "DA"),
    0x00080030: ("study_time", "TM"),
    0x00080090: ("referring_physician_name", "PN"),
    0x00081030: ("study_description", "LO"),
}
# Type 2 in the modules: written empty when the original was absent.
_TYPE2 = frozenset(
    {
        0x00100010,
        0x00100020,
        0x00100030,
        0x00100040,
        0x00080050,
        0x00200010,
        0x00080020,
        0x00080030,
        0x00080090,
    }
)
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE", "UR"})
_BLOB_VRS = frozenset({"OB", "UN", "OW"})
_UID_LIKE = re.compile(rb"[0-9]+(?:\.[0-9]+)+")


def _vr(elem: Any, tag: int) -> str | None:
    vr = elem.VR
    if vr is None or vr == "UN":
        try:
            return str(dictionary_VR(tag))
        except KeyError:
            return vr
    return str(vr)


def _walk(
    ds: Dataset, path: str = "", depth: int = 0
) -> Iterator[tuple[Dataset, int, Any, str | None, str, int]]:
    """(dataset, tag, element, VR, path, depth) for every element, items included.

    Works on the raw elements: only sequences are converted, so that values
    which are not looked at are not decoded (nor warned about).
    """
    for tag, elem in list(ds._dict.items()):
        vr = _vr(elem, tag)
        kw = keyword_for_tag(tag) if not (tag >> 16) & 1 else ""
        here = f"{path}{kw or f'({tag >> 16:04X},{tag & 0xFFFF:04X})'}"
        yield ds, tag, elem, vr, here, depth
        if vr == "SQ":
            seq = ds[tag]
            if seq.VR == "SQ" and seq.value is not None:
                for i, item in enumerate(seq.value):
                    yield from _walk(item, f"{here}[{i}].", depth + 1)


def reidentify(
    ds: Dataset,
    lookup: Callable[[str], str | None] | Mapping[str, str],
    identity: IdentityRecord,
    *,
    is_pseudonym: Callable[[str], bool] | None = None,
    today: _dt.date | None = None,
) -> Dataset:
    """Map an object built on de-identified data back to the patient's identity.

    Parameters
    ----------
    ds
        The outgoing object (SEG, SR...), **modified in place** and returned. If this
        raises, the object is half-rewritten and must be discarded, not sent.
    lookup
        Pseudonymous UID -> original UID, or None when the vault has no row for it.
    identity
        The original Patient/Study values of the study the object belongs to.
    is_pseudonym
        Whether a UID is one of the node's pseudonyms (the vault index is the
        authority, deid.md 5.6.6); by default ``lookup(uid) is not None``.
    today
        The date the un-shifting rule compares with (module docstring); today's
        local date by default.

    Returns
    -------
    pydicom.dataset.Dataset
        ``ds``, re-identified.

    Raises
    ------
    ReidentificationError
        The object belongs to another patient or study than ``identity``; a
        referenced UID has no vault row; or :func:`assert_no_pseudonyms` finds a
        pseudonym or marker left. Messages name attributes, never values.
    """
    get = lookup.get if isinstance(lookup, Mapping) else lookup
    today = today or _dt.date.today()
    _check_belongs(ds, identity)
    shift = identity.date_shift_days
    own = {elem_text(ds.get_item(tag)) for tag in (0x00080018, 0x0020000E) if tag in ds}

    # highdicom shares item datasets between sequences (the same source reference in
    # ReferencedSeriesSequence and SourceImageSequence), so an item may be met again
    # after it was mapped: its UIDs are then originals produced here.
    restored: set[str] = set()
    for source in (getattr(ds, "file_meta", None), ds):
        if source is None:
            continue
        for parent, tag, elem, vr, path, depth in _walk(source):
            if source is ds and depth == 0 and tag in _RESTORED:
                continue
            if vr == "UI":
                text = elem_text(elem)
                values = text.split("\\") if text else []
                mapped = []
                for v in values:
                    original = get(v) if v and v not in restored else None
                    if original is not None:
                        restored.add(original)
                    elif (
                        v
                        and v not in own
                        and v not in restored
                        and (
                            tag in _REFERENCE_TAGS or (depth > 0 and tag in _NESTED_REFERENCE_TAGS)
                        )
                    ):
                        raise ReidentificationError(f"{path} references a UID with no vault entry")
                    mapped.append(original or v)
                if mapped != values:
                    new = encode_text("\\".join(mapped), "UI")
                    parent._dict[tag] = raw_element(tag, "UI", new, elem)
            elif vr in ("DA", "DT") and shift:
                _unshift(parent, tag, elem, vr, shift, today)
    _restore_modules(ds, identity)
    _remove_markers(ds)
    guard = is_pseudonym or (lambda uid: get(uid) is not None)
    assert_no_pseudonyms(ds, guard, pseudonyms=identity.pseudonyms())
    return ds


def _check_belongs(ds: Dataset, identity: IdentityRecord) -> None:
    study = elem_text(ds.get_item(0x0020000D)) if 0x0020000D in ds else ""
    if study not in (identity.pseudo_study_instance_uid, identity.study_instance_uid):
        raise ReidentificationError("StudyInstanceUID does not belong to the given identity record")
    patient_id = decoded(ds, 0x00100020).strip() if 0x00100020 in ds else ""
    if patient_id not in (identity.patient_pseudonym, identity.patient_id):
        raise ReidentificationError("PatientID does not belong to the given identity record")


def _unshift(ds: Dataset, tag: int, elem: Any, vr: str, shift: int, today: _dt.date) -> None:
    limit = (today + _dt.timedelta(days=1)).strftime("%Y%m%d")
    out = []
    changed = False
    text = elem_text(elem)
    for v in text.split("\\") if text else []:
        back = shift_values(v, vr, -shift)
        # Compare as text: DA/DT values sort like dates; a date that would move
        # into the future was not shifted (module docstring, step 3).
        if back and back[:8] <= limit:
            out.append(back)
            changed = True
        else:
            out.append(v)
    if changed:
        ds._dict[tag] = raw_element(tag, vr, encode_text("\\".join(out), vr), elem)


def _restore_modules(ds: Dataset, identity: IdentityRecord) -> None:
    values = {tag: getattr(identity, name) for tag, (name, _vr) in _RESTORED.items()}
    if any(v and not v.isascii() for v in values.values()):
        # The originals need a character set the object may not declare. Decode every
        # element under the current one first (iterating converts raw elements), then
        # declare UTF-8, which encodes them all (PS3.5 6.1.2.5.3, ISO_IR 192).
        for _elem in ds.iterall():
            pass
        ds.SpecificCharacterSet = "ISO_IR 192"
    for tag, (_name, vr) in _RESTORED.items():
        value = values[tag]
        if value is None and tag not in _TYPE2:
            if tag in ds:
                del ds[tag]
            continue
        # Restored as they were: an original that pydicom would call invalid is
        # still the value the PACS knows (tolerant in).
        ds[tag] = DataElement(tag, vr, value or "", validation_mode=config.IGNORE)


def _remove_markers(ds: Dataset) -> None:
    for tag in _MARKER_TAGS:
        if tag in ds:
            del ds[tag]
    seq = ds.get(_CONTRIB_EQUIP)
    if seq is not None and seq.VR == "SQ":
        items = [item for item in seq.value if not _is_deid_equipment(item)]
        if items:
            ds[_CONTRIB_EQUIP] = DataElement(_CONTRIB_EQUIP, "SQ", Sequence(items))
        else:
            del ds[_CONTRIB_EQUIP]


def _is_deid_equipment(item: Dataset) -> bool:
    for code in item.get("PurposeOfReferenceCodeSequence", []):
        if str(code.get("CodeValue", "")) == _DEID_EQUIPMENT:
            return True
    return False


def assert_no_pseudonyms(
    ds: Dataset,
    is_pseudonym: Callable[[str], bool],
    *,
    pseudonyms: Collection[str] = (),
) -> None:
    """Refuse an outgoing object that still carries a pseudonym or a de-identification marker.

    Checks every element at every depth and the File Meta: UI values against
    ``is_pseudonym``; text values for any of ``pseudonyms`` (pseudonymous Patient
    ID, Accession Number, Study ID) as substrings; private and unknown blobs (OB,
    OW, UN) for UID-shaped runs that ``is_pseudonym`` recognises and for
    ``pseudonyms``; and the markers of :data:`MARKER_KEYWORDS` and the de-identifying
    equipment item. Necessary but not sufficient: a pseudonym transformed into
    something else (truncated, re-encoded) is not found.

    Raises
    ------
    ReidentificationError
        Naming the attribute path (never the value).
    """
    needles = [p for p in pseudonyms if p]
    needles_b = [p.encode("ascii", "ignore") for p in needles]
    for source in (getattr(ds, "file_meta", None), ds):
        if source is None:
            continue
        for parent, tag, elem, vr, path, _depth in _walk(source):
            if tag in _MARKER_TAGS:
                raise ReidentificationError(f"{path}: de-identification marker present")
            if tag == _CONTRIB_EQUIP and vr == "SQ":
                if any(_is_deid_equipment(item) for item in parent[tag].value or []):
                    raise ReidentificationError(f"{path}: de-identifying equipment item present")
            elif vr == "UI":
                text = elem_text(elem)
                if any(v and is_pseudonym(v) for v in text.split("\\")):
                    raise ReidentificationError(f"{path} still carries a pseudonymous UID")
            elif vr in _TEXT_VRS and needles:
                text = decoded(parent, tag)
                if any(n in text for n in needles):
                    raise ReidentificationError(f"{path} still carries a pseudonym")
            elif (vr in _BLOB_VRS or vr is None) and tag != 0x7FE00010:
                blob = elem.value if elem.is_raw else parent[tag].value
                if not isinstance(blob, bytes):
                    continue
                if any(n in blob for n in needles_b) or any(
                    is_pseudonym(m.decode("ascii")) for m in _UID_LIKE.findall(blob)
                ):
                    raise ReidentificationError(f"{path} still carries a pseudonym")

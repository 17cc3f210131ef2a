"""De-identify one dataset: PS3.15 Annex E Basic Profile + options, keyed pseudonyms.

How an element is handled, in order (deid.md 5.2):

1. Private elements (odd group): removed, unless Retain Safe Private (113111) is on
   and an allow-list rule matches its Private Creator, element offset and VR; a kept
   block keeps its creator element. Private sequences and blobs are never kept.
2. Special attributes whose replacement serves re-use (Patient's Name and ID, Issuer
   of Patient ID, Accession Number, Study ID, Patient's Age) and the de-identification
   markers of the input (removed, then written anew).
3. Groups without a row per tag: command (0000) and file meta (0002) elements found
   in a dataset, group lengths, curves (50xx), overlays (60xx, the whole group) and
   retired variable pixel data (7Fxx) are removed.
4. Table E.1-1 (:mod:`~dicomnode.dicom.deid.table`), conditional codes resolved by the
   attribute's Type in the IOD (:mod:`~dicomnode.dicom.deid.iod`).
5. The VR safety net for everything the table does not name (new, retired or
   unknown attributes, at any depth): SQ recursed; PN emptied; DA/DT shifted; TM kept;
   UI remapped unless a registry UID or a class/transfer-syntax attribute; SH, LO,
   ST, LT, UT, UC, AE, UR removed unless on the keep-list (a Type 1 one gets a keyed
   dummy, a Type 2 one is emptied); UN of an unknown tag removed; everything else
   (codes, numbers, bulk data such as Pixel Data) kept.

Every sequence is recursed, at every depth, and a new dataset is built: the input
is not modified (except that pydicom converts the raw elements it is asked to read)
and unchanged raw elements, Pixel Data included, are shared without copying.

The markers, Contributing Equipment item and File Meta Information added to every
output are built by :mod:`~dicomnode.dicom.deid.markers`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID_dictionary,
)

from dicomnode.dicom.deid import markers as marks
from dicomnode.dicom.deid import pixels
from dicomnode.dicom.deid._elements import decoded as _decoded
from dicomnode.dicom.deid._elements import elem_text as _elem_text
from dicomnode.dicom.deid._elements import encode_text as _encode_text
from dicomnode.dicom.deid._elements import raw_element as _raw
from dicomnode.dicom.deid.descriptors import DescriptorCleaner
from dicomnode.dicom.deid.iod import NOT_IN_IOD, TYPE_1, TYPE_2, UNKNOWN, IODTypes, iod_types_for
from dicomnode.dicom.deid.options import DeidOptions, PatientNameStyle, PrivateTagRule
from dicomnode.dicom.deid.records import DeidentifiedInstance, IdentityRecord, UIDMapEntry
from dicomnode.dicom.deid.table import OPTION_COLUMNS, Action, compile_table
from dicomnode.dicom.deid.values import (
    age_string,
    cap_age,
    dummy_text,
    max_length,
    parse_da,
    shift_values,
)
from dicomnode.dicom.pseudonym import Pseudonymizer
from dicomnode.errors import DeidentificationError

__all__ = ["Deidentifier", "deidentify"]

# Operations (small ints: dispatch is the hot loop).
_KEEP, _REMOVE, _EMPTY, _DUMMY, _UID, _CLEAN_TEXT, _SHIFT, _RECURSE, _AE = range(9)
_PATIENT_NAME, _PATIENT_ID, _ISSUER, _ACCESSION, _STUDY_ID, _AGE = range(20, 26)

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "AE", "UR"})
_DATE_VRS = frozenset({"DA", "DT"})
# What a kept value of a VR with a grammar may contain (PS3.5 6.2, leniently: padding,
# multiple values, ACR-NEMA dates). A value outside it is not what the VR says it is
# (a name typed into Patient's Sex, a UID into Slice Thickness) and is not kept.
_GRAMMAR = {
    vr: re.compile(rb"[" + chars + rb"\\\x00 ]*")
    for vr, chars in {
        "AS": rb"0-9DWMY",
        "CS": rb"A-Z0-9_",
        "DA": rb"0-9.\-",
        "DT": rb"0-9.+\-",
        "DS": rb"0-9.+\-eE",
        "IS": rb"0-9+\-",
        "TM": rb"0-9.:",
    }.items()
}
_BINARY_SIZE = {
    "US": 2,
    "SS": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "FD": 8,
    "AT": 4,
    "SV": 8,
    "UV": 8,
    "OB": 2,
    "OW": 2,
    "OF": 4,
    "OD": 8,
    "OL": 4,
    "OV": 8,
    "UN": 2,
}
_MAX_DEPTH = 32

_T_PATIENT_NAME = 0x00100010
_T_PATIENT_ID = 0x00100020
_T_ISSUER = 0x00100021
_T_BIRTH_DATE = 0x00100030
_T_SEX = 0x00100040
_T_AGE = 0x00101010
_T_ACCESSION = 0x00080050
_T_STUDY_ID = 0x00200010
_T_STUDY_UID = 0x0020000D
_T_SERIES_UID = 0x0020000E
_T_SOP_UID = 0x00080018
_NO_PATIENT_ID = "\x1fno-patient-id\x1f"
"""Prefix of the surrogate patient key of a study sent without Patient ID."""
_T_SOP_CLASS = 0x00080016
_T_CHARSET = 0x00080005
_T_STUDY_DATE = 0x00080020
_T_STUDY_TIME = 0x00080030
_T_REFERRING = 0x00080090
_T_STUDY_DESC = 0x00081030
_T_PLACER_ORDER = 0x00402016
_T_FILLER_ORDER = 0x00402017
_T_REQUEST_ATTRIBUTES = 0x00400275
_T_CONTRIB_EQUIP = 0x0018A001

_MARKERS = {
    0x00120062: "PatientIdentityRemoved",
    0x00120063: "DeidentificationMethod",
    0x00120064: "DeidentificationMethodCodeSequence",
    0x00280303: "LongitudinalTemporalInformationModified",
}

_SPECIAL = {
    _T_PATIENT_NAME: _PATIENT_NAME,
    _T_PATIENT_ID: _PATIENT_ID,
    _T_ISSUER: _ISSUER,
    _T_ACCESSION: _ACCESSION,
    _T_STUDY_ID: _STUDY_ID,
    **dict.fromkeys(_MARKERS, _REMOVE),
}

# Type 2 in the Patient and General Study modules of every composite IOD: kept
# present (empty if need be) because highdicom reads them from source images
# (seg/sop.py reads PatientBirthDate, AccessionNumber, StudyID directly).
_ALWAYS_PRESENT = (
    (_T_PATIENT_NAME, "PN"),
    (_T_PATIENT_ID, "LO"),
    (_T_BIRTH_DATE, "DA"),
    (_T_SEX, "CS"),
    (_T_STUDY_DATE, "DA"),
    (_T_STUDY_TIME, "TM"),
    (_T_REFERRING, "PN"),
    (_T_STUDY_ID, "SH"),
    (_T_ACCESSION, "SH"),
)

# Names whose components Clean Descriptors never keeps.
_NAME_TAGS = (0x00100010, 0x00101001, 0x00101005, 0x00101060)

_CACHE_MAX = 100_000
_MISSING: Any = object()


def _load_keywords(name: str) -> frozenset[int]:
    text = resources.files(__package__).joinpath("data", name).read_text("utf-8")
    tags = set()
    for line in text.splitlines():
        kw = line.split("#", 1)[0].strip()
        if kw:
            tag = tag_for_keyword(kw)
            if tag is None:
                raise ValueError(f"data/{name}: {kw!r} is not a DICOM keyword")
            tags.add(tag)
    return frozenset(tags)


@lru_cache(maxsize=4096)
def _dict_vr(tag: int) -> str | None:
    """The dictionary VR, None for an unknown tag; ambiguous VRs ('US or SS') as is."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _is_class_uid_attribute(tag: int) -> bool:
    kw = keyword_for_tag(tag)
    return kw.endswith(("ClassUID", "SyntaxUID"))


@lru_cache(maxsize=1024)
def _name_words(names: tuple[str, ...]) -> frozenset[str]:
    """Upper-case components (two letters or more) of person names."""
    words: set[str] = set()
    for name in names:
        for part in name.replace("=", "^").replace("\\", "^").split("^"):
            words.update(p.upper() for p in part.split() if len(p) > 1)
    return frozenset(words)


@dataclass
class _Walk:
    """State of one de-identification (one instance)."""

    types: IODTypes
    shift: int
    patient_key: str
    patient_pseudonym: str
    study_uid: str
    root: Dataset
    uid_map: dict[str, str] = field(default_factory=dict)
    tag: int = 0

    @cached_property
    def forbidden_words(self) -> frozenset[str]:
        names = tuple(_decoded(self.root, tag) for tag in _NAME_TAGS if tag in self.root._dict)
        return _name_words(names)


class Deidentifier:
    """De-identifies datasets under one key and one set of options.

    Compiles Table E.1-1 for the options once and caches pseudonyms (UIDs, shifted
    dates) across calls, so one instance should serve a whole node. Thread-safe:
    the caches are plain dicts whose entries are deterministic.

    Parameters
    ----------
    pseudonymizer
        The keyed pseudonym source (the node's secret).
    options
        Profile options; the defaults of deid.md 5.1 when None.
    """

    def __init__(self, pseudonymizer: Pseudonymizer, options: DeidOptions | None = None) -> None:
        self.pseudonymizer = pseudonymizer
        self.options = options = options or DeidOptions()
        enabled = frozenset(f for f in OPTION_COLUMNS.values() if getattr(options, f))
        self._table = compile_table(enabled, options.retain_safe_private)
        self._keep_text = _load_keywords("keep_text.txt") | options.keep_text_tags
        self._keep_uid = _load_keywords("keep_uid.txt") | options.keep_uid_tags
        self._cleaner = DescriptorCleaner(options.descriptor_words)
        self._private_rules: dict[tuple[str, int], PrivateTagRule] = (
            {(r.creator.strip(), r.element): r for r in options.safe_private}
            if options.retain_safe_private
            else {}
        )
        self._ops: dict[tuple[str, int, int, str | None], int] = {}
        self._uids: dict[str, str] = {}
        self._shifted: dict[tuple[str, str, int], str | None] = {}
        self._patients: dict[str, tuple[str, int]] = {}
        self._texts: dict[tuple[str, str, int], str] = {}
        self._cleaned: dict[tuple[str, frozenset[str]], str] = {}
        self._codes = options.option_codes()
        self._templates: dict[Any, dict[int, Any]] = {}
        self._meta_template = marks.meta_template(options)

    # ------------------------------------------------------------------ public

    def deidentify(self, ds: Dataset) -> DeidentifiedInstance:
        """De-identify one composite instance.

        Parameters
        ----------
        ds
            The dataset as received (read from bytes or built in memory); not modified.

        Returns
        -------
        DeidentifiedInstance
            The clean dataset with new File Meta, the UID map entries, the original
            Patient/Study values and the pixel/content risk flags.

        Raises
        ------
        DeidentificationError
            SOP Class/Instance, Study or Series Instance UID missing; Patient ID missing
            or empty (no linking on name, deid.md 5.3); or the dataset cannot be parsed
            (malformed sequence, bad value). The message names the attribute, never a
            value. The caller quarantines the instance.
        """
        try:
            return self._deidentify(ds)
        except DeidentificationError:
            raise
        except Exception as exc:  # pydicom raises many kinds on malformed input
            # from None: a pydicom message may quote a value (patient data).
            raise DeidentificationError(
                f"dataset cannot be de-identified ({exc.__class__.__name__})"
            ) from None

    # ------------------------------------------------------------------ driver

    def _deidentify(self, ds: Dataset) -> DeidentifiedInstance:
        p = self.pseudonymizer
        opts = self.options
        required = {}
        for tag in (_T_SOP_CLASS, _T_SOP_UID, _T_STUDY_UID, _T_SERIES_UID):
            elem = ds._dict.get(tag)
            value = _elem_text(elem) if elem is not None else ""
            if not value:
                raise DeidentificationError(f"{keyword_for_tag(tag)} is missing or empty")
            required[tag] = value
        original = self._original_identity(ds)
        if (original["patient_id"] or "").strip():
            pk = p.patient_key(original["patient_id"], original["issuer_of_patient_id"] or "")
        else:
            # Patient ID is Type 2: emergency and unidentified patients arrive without one.
            # The study stands in for the patient (one pseudonym and date shift for all of
            # its instances); never the name (deid.md #98: no linking on name), so two
            # studies of an unidentified patient are not linked.
            pk = p.patient_key(f"{_NO_PATIENT_ID}{required[_T_STUDY_UID]}", "")
        pseudonym, shift = self._patient(pk)
        walk = _Walk(
            types=iod_types_for(required[_T_SOP_CLASS]),
            shift=shift if opts.shifts_dates else 0,
            patient_key=pk,
            patient_pseudonym=pseudonym,
            study_uid=required[_T_STUDY_UID],
            root=ds,
        )
        out = self._clean(ds, walk, 0, 0)
        self._complete_top_level(out, ds, walk, original)

        flags = pixels.assess(ds, opts)
        masked = False
        rule = pixels.matching_rule(ds, opts.mask_rules)
        methods = self._codes
        out.file_meta = marks.file_meta(out, ds, self._meta_template)
        out.preamble = b"\x00" * 128
        if rule is not None:
            masked = pixels.apply_mask(out, rule)
        if masked:
            flags = tuple(f for f in flags if f not in pixels.CLEARED_BY_MASKING)
            methods = tuple(sorted((*methods, "113101")))
            out[0x00280301] = DataElement(0x00280301, "CS", "NO")  # Burned In Annotation
        self._add_markers(out, methods)

        identity = IdentityRecord(
            **original,
            patient_pseudonym=walk.patient_pseudonym,
            date_shift_days=walk.shift,
            pseudo_study_instance_uid=_elem_text(out._dict[_T_STUDY_UID]),
            pseudo_accession_number=_elem_text(out._dict[_T_ACCESSION]),
            pseudo_study_id=_elem_text(out._dict[_T_STUDY_ID]),
        )
        return DeidentifiedInstance(
            dataset=out,
            uid_map=tuple(UIDMapEntry(k, v) for k, v in walk.uid_map.items()),
            identity=identity,
            flags=flags,
            quarantine=any(f in opts.quarantine_flags for f in flags),
            methods=methods,
            pixels_cleaned=masked,
        )

    def _patient(self, patient_key: str) -> tuple[str, int]:
        """(pseudonymous Patient ID, date shift) of a patient, cached."""
        cached = self._patients.get(patient_key)
        if cached is None:
            p = self.pseudonymizer
            cached = (p.patient_id(patient_key), p.date_shift_days(patient_key))
            if len(self._patients) > _CACHE_MAX:
                self._patients.clear()
            self._patients[patient_key] = cached
        return cached

    def _text(self, kind: str, value: str, length: int) -> str:
        """``Pseudonymizer.text``, cached (Accession Number and Study ID repeat per study)."""
        key = (kind, value, length)
        cached = self._texts.get(key)
        if cached is None:
            cached = self.pseudonymizer.text(kind, value, length)
            if len(self._texts) > _CACHE_MAX:
                self._texts.clear()
            self._texts[key] = cached
        return cached

    def _original_identity(self, ds: Dataset) -> dict[str, Any]:
        present = ds._dict

        def text(tag: int) -> str | None:
            return _decoded(ds, tag) if tag in present else None

        charset = text(_T_CHARSET)
        return {
            "patient_name": text(_T_PATIENT_NAME),
            "patient_id": text(_T_PATIENT_ID) or "",
            "issuer_of_patient_id": text(_T_ISSUER),
            "patient_birth_date": text(_T_BIRTH_DATE),
            "patient_sex": text(_T_SEX),
            "patient_age": text(_T_AGE),
            "study_instance_uid": _elem_text(present[_T_STUDY_UID]),
            "accession_number": text(_T_ACCESSION),
            "study_id": text(_T_STUDY_ID),
            "study_date": text(_T_STUDY_DATE),
            "study_time": text(_T_STUDY_TIME),
            "referring_physician_name": text(_T_REFERRING),
            "study_description": text(_T_STUDY_DESC),
            "specific_character_set": charset,
            # for the worklist notification (HL7 ORC/OBR-2 and -3); top level, else the
            # first Request Attributes item that has them
            "placer_order_number": text(_T_PLACER_ORDER)
            or _requested(ds, "PlacerOrderNumberImagingServiceRequest"),
            "filler_order_number": text(_T_FILLER_ORDER)
            or _requested(ds, "FillerOrderNumberImagingServiceRequest"),
        }

    # ------------------------------------------------------------------ the walk

    def _clean(self, src: Dataset, walk: _Walk, parent: int, depth: int) -> Dataset:
        """A cleaned copy of ``src`` (a dataset at ``depth`` inside sequence ``parent``)."""
        if depth > _MAX_DEPTH:
            raise DeidentificationError(f"sequences nested deeper than {_MAX_DEPTH} levels")
        # Internals used on purpose: a Dataset built on a dict of raw elements with the
        # source's encoding is written back byte for byte without decoding (the writer
        # only converts when encoding or character set changed).
        out = Dataset(parent_encoding=src._parent_encoding)
        imp, little = src.original_encoding
        out.set_original_encoding(imp, little, src.original_character_set)
        put = out._dict
        ops = self._ops
        iod = walk.types.iod
        private_tags: list[int] = []
        tag = 0
        try:
            for tag, elem in list(src._dict.items()):
                group = tag >> 16
                if group & 1:
                    if self._private_rules:
                        private_tags.append(tag)
                    continue
                vr = elem.VR
                if vr is None or vr == "UN":
                    vr = _dict_vr(tag) or vr
                # int(tag): BaseTag compares in Python, a plain int key hashes and
                # compares in C (this lookup runs for every element).
                key = (iod, parent, int(tag), vr)
                op = ops.get(key)
                if op is None:
                    op = ops[key] = self._resolve(tag, vr, parent, walk.types)
                if op == _KEEP:
                    grammar = _GRAMMAR.get(vr)
                    if grammar is not None and elem.value and not grammar.fullmatch(
                        elem.value if elem.is_raw else _elem_text(elem).encode("utf-8")
                    ):
                        new = self._malformed(tag, vr, elem, src, walk.types, parent)
                        if new is not None:
                            put[tag] = new
                        continue
                    # Raw elements are immutable tuples and shared; a converted one is
                    # copied so that changing the output never changes the input.
                    put[tag] = elem if elem.is_raw else copy.copy(elem)
                elif op != _REMOVE:
                    new = self._apply(op, tag, vr, elem, src, walk, parent, depth)
                    if new is not None:
                        put[tag] = new
            if private_tags:
                tag = private_tags[0]
                self._private(src, put, private_tags, walk)
        except DeidentificationError:
            raise
        except Exception as exc:  # malformed values and sequences; pydicom raises many kinds
            raise DeidentificationError(
                f"element {_tag_name(tag)} cannot be de-identified ({exc.__class__.__name__})"
            ) from None
        return out

    def _resolve(self, tag: int, vr: str | None, parent: int, types: IODTypes) -> int:
        """The operation for ``tag`` (see the module docstring for the order)."""
        opts = self.options
        special = _SPECIAL.get(tag)
        if special is not None:
            return special
        if tag == _T_AGE:
            return _AGE if opts.retain_patient_characteristics else _REMOVE
        group, element = tag >> 16, tag & 0xFFFF
        if group in (0x0000, 0x0002) or element == 0:
            return _REMOVE
        if group & 0xFF00 == 0x5000:
            return self._by_vr(self._table.curves, tag, vr, parent, types)
        if group & 0xFF00 == 0x6000:
            return _REMOVE
        if group & 0xFF00 == 0x7F00 and group != 0x7FE0:
            return _REMOVE
        action = self._table.exact.get(tag)
        if action is None:
            return self._net(tag, vr, parent, types)
        return self._by_vr(action, tag, vr, parent, types)

    def _by_vr(self, action: Action, tag: int, vr: str | None, parent: int, types: IODTypes) -> int:
        t = types.type_of(tag, parent)
        required = t in (TYPE_1, UNKNOWN)
        if action == Action.X_Z:
            action = Action.EMPTY if t in (TYPE_1, TYPE_2, UNKNOWN) else Action.REMOVE
        elif action == Action.X_D:
            action = Action.DUMMY if required else Action.EMPTY if t == TYPE_2 else Action.REMOVE
        elif action == Action.X_Z_D:
            action = Action.DUMMY if required else Action.EMPTY if t == TYPE_2 else Action.REMOVE
        elif action == Action.Z_D:
            action = Action.DUMMY if required else Action.EMPTY
        elif action == Action.X_Z_U:
            # Type 1 and 2 reference sequences keep their items, cleaned, with remapped
            # UIDs: for Type 2, Z allows "a non-zero length value that may be a dummy"
            # (E.1.1), and emptying would cut SEG frames from their source images.
            action = Action.KEEP if required or t == TYPE_2 else Action.REMOVE
        elif action in (Action.EMPTY, Action.DUMMY) and t == NOT_IN_IOD:
            # Z and D exist to keep the IOD valid; an attribute the IOD does not have
            # (e.g. Verifying Observer Sequence in an image, Table E.1-1 note) goes.
            action = Action.REMOVE
        if action == Action.REMOVE:
            return _REMOVE
        if vr == "SQ":
            return _EMPTY if action == Action.EMPTY else _RECURSE
        if action == Action.KEEP:
            return _KEEP
        if action == Action.SHIFT:
            return _SHIFT if vr in _DATE_VRS else _KEEP
        if action == Action.EMPTY:
            return _EMPTY
        if action == Action.UID or vr == "UI":
            return _UID
        if action == Action.DUMMY:
            return _DUMMY
        # Action.CLEAN (Clean Descriptors, Retain Patient Characteristics/Device Identity)
        if vr in _DATE_VRS:
            return _SHIFT if self.options.shifts_dates else _KEEP
        if vr == "AE":
            return _AE
        if vr in _TEXT_VRS:
            return _CLEAN_TEXT
        if vr == "PN":
            return _EMPTY
        return _KEEP  # TM under the date options, CS, AS and numbers

    def _net(self, tag: int, vr: str | None, parent: int, types: IODTypes) -> int:
        """The VR safety net for attributes Table E.1-1 does not name (deid.md 5.2 step 3)."""
        opts = self.options
        if vr == "SQ":
            return _RECURSE
        if vr == "PN":
            return _EMPTY
        if vr in _DATE_VRS:
            if opts.shifts_dates:
                return _SHIFT
            if opts.retain_longitudinal_full_dates:
                return _KEEP
            return _EMPTY if types.type_of(tag, parent) in (TYPE_1, TYPE_2) else _REMOVE
        if vr == "UI":
            if opts.retain_uids or tag in self._keep_uid or _is_class_uid_attribute(tag):
                return _KEEP
            return _UID
        if vr in _TEXT_VRS:
            if tag in self._keep_text:
                return _KEEP
            t = types.type_of(tag, parent)
            return _DUMMY if t == TYPE_1 else _EMPTY if t == TYPE_2 else _REMOVE
        if vr is None or vr == "UN":
            return _REMOVE  # an unknown tag with no usable VR cannot be checked
        return _KEEP

    def _apply(
        self,
        op: int,
        tag: int,
        vr: str | None,
        elem: Any,
        src: Dataset,
        walk: _Walk,
        parent: int,
        depth: int,
    ) -> Any:
        """The replacement element for ``op``, or None to drop the element."""
        p = self.pseudonymizer
        if op == _RECURSE:
            seq_elem = src[tag]
            if seq_elem.VR != "SQ":
                return None  # an unknown UN that did not decode as a sequence
            items = [self._clean(item, walk, tag, depth + 1) for item in seq_elem.value]
            return DataElement(tag, "SQ", Sequence(items))
        if op == _EMPTY:
            if vr == "SQ":
                return DataElement(tag, "SQ", Sequence())
            return _raw(tag, vr, b"", elem)
        if op == _UID:
            text = _elem_text(elem)
            if not text:
                return elem
            new = "\\".join(self._map_uid(v, walk) if v else v for v in text.split("\\"))
            return _raw(tag, "UI", _encode_text(new, "UI"), elem)
        if op == _SHIFT:
            text = _elem_text(elem)
            if not text:
                return elem
            key = (text, vr or "DA", walk.shift)
            new = self._shifted.get(key, _MISSING)
            if new is _MISSING:
                new = shift_values(text, vr or "DA", walk.shift)
                if len(self._shifted) > _CACHE_MAX:
                    self._shifted.clear()
                self._shifted[key] = new
            return _raw(tag, vr, _encode_text(new or "", vr), elem)
        if op == _PATIENT_ID:
            value = self._decoded(src, tag)
            if depth == 0:
                new = walk.patient_pseudonym
            elif not value.strip():
                new = ""
            else:
                issuer = self._decoded(src, _T_ISSUER) if _T_ISSUER in src else ""
                new = p.patient_id(p.patient_key(value, issuer))
            return _raw(tag, vr, _encode_text(new, vr), elem)
        if op == _PATIENT_NAME:
            if depth == 0:
                pid = walk.patient_pseudonym
            elif _T_PATIENT_ID in src and self._decoded(src, _T_PATIENT_ID).strip():
                issuer = self._decoded(src, _T_ISSUER) if _T_ISSUER in src else ""
                pid = p.patient_id(p.patient_key(self._decoded(src, _T_PATIENT_ID), issuer))
            else:
                return _raw(tag, vr, b"", elem)
            name = self._pseudonymous_name(pid)
            return _raw(tag, "PN", _encode_text(name, "PN"), elem)
        if op == _ISSUER:
            issuer = self.options.issuer_of_patient_id
            return None if issuer is None else _raw(tag, "LO", _encode_text(issuer, "LO"), elem)
        if op == _ACCESSION:
            value = self._decoded(src, tag).strip()
            if not value:
                return _raw(tag, vr, b"", elem)
            new = self._text("AccessionNumber", f"{walk.patient_key}\x1f{value}", 16)
            return _raw(tag, vr, _encode_text(new, vr), elem)
        if op == _STUDY_ID:
            if depth:
                return _raw(tag, vr, b"", elem)
            # Keyed on the study, so that two studies with the same (often "1") Study ID
            # stay distinct downstream (mmiv-center#19).
            new = self._text(
                "StudyID", f"{walk.study_uid}\x1f{self._decoded(src, tag).strip()}", 16
            )
            return _raw(tag, vr, _encode_text(new, vr), elem)
        if op == _AGE:
            new = cap_age(_elem_text(elem), self.options.age_cap_years)
            return _raw(tag, "AS", _encode_text(new, "AS"), elem)
        if op == _CLEAN_TEXT:
            value = self._decoded(src, tag)
            key = (value, walk.forbidden_words)
            cleaned = self._cleaned.get(key)
            if cleaned is None:
                cleaned = "\\".join(
                    self._cleaner.clean(v, walk.forbidden_words) for v in value.split("\\")
                )
                if len(self._cleaned) > _CACHE_MAX:
                    self._cleaned.clear()
                self._cleaned[key] = cleaned
            if not cleaned.strip("\\ ") and walk.types.type_of(tag, parent) in (TYPE_1, UNKNOWN):
                # Nothing safe left in a Type 1 descriptor (RT Plan Label, Structure Set
                # Label): a keyed dummy keeps the IOD valid, as D would.
                return self._dummy(tag, vr, elem, src)
            limit = max_length(vr or "LO")
            return _raw(tag, vr, _encode_text(cleaned[:limit] if limit else cleaned, vr), elem)
        if op == _AE:
            value = _elem_text(elem)
            new = "\\".join(p.text("AE", v, 16) if v else v for v in value.split("\\"))
            return _raw(tag, vr, _encode_text(new, vr), elem)
        if op == _DUMMY:
            return self._dummy(tag, vr, elem, src)
        raise AssertionError(f"unknown operation {op}")  # pragma: no cover

    def _pseudonymous_name(self, patient_id: str) -> str:
        # "ID^": the trailing caret marks a deliberate one-component name (PS3.5
        # 6.2.1.2); without it highdicom warns on every SEG/SR built from the instance.
        if self.options.patient_name_style is PatientNameStyle.ID:
            return f"{patient_id}^"
        return f"ANON^{patient_id}"

    def _malformed(
        self, tag: int, vr: str, elem: Any, src: Dataset, types: IODTypes, parent: int
    ) -> Any:
        """A kept element whose value breaks its VR's grammar: dummy (Type 1), empty
        (Type 2) or removed, as an unlisted free-text element would be."""
        if tag == 0x00080005:
            return None  # an unknown Specific Character Set: the default, as pydicom read it
        t = types.type_of(tag, parent)
        if t == TYPE_1:
            # Modality, Image Type, Photometric Interpretation in lower case: equipment
            # values a dummy would break; a number or time gets a dummy.
            return elem if vr == "CS" else self._dummy(tag, vr, elem, src)
        return _raw(tag, vr, b"", elem) if t == TYPE_2 else None

    def _dummy(self, tag: int, vr: str | None, elem: Any, src: Dataset) -> Any:
        """D: a non-empty value consistent with the VR (PS3.15 E.1.1)."""
        if vr in ("SH", "LO", "ST", "LT", "UT", "UC"):
            # Keyed, so identifiers (Clinical Trial Subject ID, Container Identifier)
            # stay consistent across instances without carrying the original.
            original = self._decoded(src, tag)
            limit = min(16, max_length(vr) or 16)
            new = self.pseudonymizer.text(f"{tag:08X}", original, limit)
            return _raw(tag, vr, _encode_text(new, vr), elem)
        if vr in _BINARY_SIZE:
            return _raw(tag, vr, b"\x00" * _BINARY_SIZE[vr], elem)
        return _raw(tag, vr, _encode_text(dummy_text(vr or "LO"), vr), elem)

    def _decoded(self, ds: Dataset, tag: int) -> str:
        """A text element decoded with the dataset's character set, ``\\``-joined."""
        return _decoded(ds, tag)

    def _map_uid(self, value: str, walk: _Walk) -> str:
        """The keyed pseudonym of a UID; registry UIDs (SOP classes, well-known frames of
        reference, coding schemes) are kept (PS3.15 E.3.9: structural UIDs unchanged)."""
        if value in UID_dictionary:
            return value
        new = self._uids.get(value)
        if new is None:
            new = self.pseudonymizer.uid(value)
            if len(self._uids) > _CACHE_MAX:
                self._uids.clear()
            self._uids[value] = new
        walk.uid_map.setdefault(new, value)
        return new

    def _private(self, src: Dataset, put: dict[Any, Any], tags: list[int], walk: _Walk) -> None:
        """Retain Safe Private (113111): keep allow-listed elements and their creators."""
        creators: dict[tuple[int, int], str] = {}
        for tag in tags:
            element = tag & 0xFFFF
            if 0x0010 <= element <= 0x00FF:
                raw = src._dict[tag]
                value = raw.value
                if isinstance(value, bytes):
                    text = value.decode("latin-1", "replace")
                else:
                    text = str(value if value is not None else "")
                creators[(tag >> 16, element)] = text.strip(" \x00")
        kept_blocks: set[tuple[int, int]] = set()
        for tag in tags:
            group, element = tag >> 16, tag & 0xFFFF
            if element < 0x1000:
                continue
            creator = creators.get((group, element >> 8))
            if creator is None:
                continue  # no Private Creator: never kept (deid.md 6 #37)
            rule = self._private_rules.get((creator, element & 0xFF))
            if rule is None:
                continue
            elem = src._dict[tag]
            vr = elem.VR
            if vr != rule.vr:
                # Implicit VR (None) or UN cannot be checked against the rule, and a
                # different explicit VR is not the element the rule describes
                # (deid.md 5.2 step 4: treat UN as unsafe).
                continue
            if rule.vr in _DATE_VRS:
                shifted = self._apply(_SHIFT, tag, rule.vr, elem, src, walk, 0, 1)
                if shifted is None:
                    continue
                elem = shifted
            put[tag] = elem
            kept_blocks.add((group, element >> 8))
        for group, block in kept_blocks:
            ctag = BaseTag((group << 16) | block)
            put[ctag] = src._dict[ctag]

    # ------------------------------------------------------------------ additions

    def _complete_top_level(
        self, out: Dataset, src: Dataset, walk: _Walk, original: dict[str, Any]
    ) -> None:
        put = out._dict
        if _T_PATIENT_ID not in put:
            # absent in the source (Type 2 left out): the pseudonym, as for an empty one
            put[BaseTag(_T_PATIENT_ID)] = _raw(
                _T_PATIENT_ID, "LO", _encode_text(walk.patient_pseudonym, "LO"), None
            )
        if _T_PATIENT_NAME not in put:
            name = self._pseudonymous_name(walk.patient_pseudonym)
            put[BaseTag(_T_PATIENT_NAME)] = _raw(
                _T_PATIENT_NAME, "PN", _encode_text(name, "PN"), None
            )
        for tag, vr in _ALWAYS_PRESENT:
            if tag not in put:
                put[BaseTag(tag)] = _raw(tag, vr, b"", None)
        if _T_AGE not in put and self.options.retain_patient_characteristics:
            # E.1.1 allows adding Patient's Age computed from the removed birth date.
            birth = parse_da(original["patient_birth_date"] or "")
            on = None
            for tag in (_T_STUDY_DATE, 0x00080021, 0x00080022, 0x00080023):
                if tag in src._dict:
                    on = parse_da(_elem_text(src._dict[tag]))
                    if on:
                        break
            age = age_string(birth, on, self.options.age_cap_years) if birth and on else None
            if age:
                put[BaseTag(_T_AGE)] = _raw(_T_AGE, "AS", _encode_text(age, "AS"), None)
        if self.options.add_contributing_equipment:
            existing = put.get(_T_CONTRIB_EQUIP)
            if existing is None:
                put[BaseTag(_T_CONTRIB_EQUIP)] = self._template(out)[_T_CONTRIB_EQUIP]
            else:
                items = list(out[_T_CONTRIB_EQUIP].value) if existing.VR == "SQ" else []
                item = marks.equipment_item()
                out[_T_CONTRIB_EQUIP] = DataElement(
                    _T_CONTRIB_EQUIP, "SQ", Sequence([*items, item])
                )

    def _template(self, out: Dataset, methods: tuple[str, ...] | None = None) -> dict[int, Any]:
        """The elements every output gets, pre-encoded in ``out``'s encoding.

        Building these as DataElements costs more than the whole table walk of a CT
        slice; encoded once per (encoding, methods) they are shared raw elements
        (immutable), which pydicom writes as they are and decodes on access.
        """
        encoding = out.original_encoding
        if None in encoding:
            encoding = (False, True)
        key = (encoding, methods or self._codes)
        cached = self._templates.get(key)
        if cached is None:
            ds = marks.markers(methods or self._codes, self.options)
            ds.ContributingEquipmentSequence = Sequence([marks.equipment_item()])
            cached = self._templates[key] = marks.encode_raw(ds, *encoding)
        return cached

    def _add_markers(self, out: Dataset, methods: tuple[str, ...]) -> None:
        put = out._dict
        for tag, elem in self._template(out, methods).items():
            if tag != _T_CONTRIB_EQUIP:
                put[tag] = elem

def _tag_name(tag: int) -> str:
    kw = keyword_for_tag(tag) if tag and not (tag >> 16) & 1 else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + kw if kw else ''}"


def deidentify(
    ds: Dataset, pseudonymizer: Pseudonymizer, options: DeidOptions | None = None
) -> DeidentifiedInstance:
    """De-identify one dataset (a convenience for one-off use; see :class:`Deidentifier`).

    Raises
    ------
    DeidentificationError
        As :meth:`Deidentifier.deidentify`.
    """
    return Deidentifier(pseudonymizer, options).deidentify(ds)


def _requested(ds: Dataset, keyword: str) -> str | None:
    """``keyword`` from the first Request Attributes Sequence item that has a value."""
    if _T_REQUEST_ATTRIBUTES not in ds._dict:
        return None
    try:
        for item in ds.RequestAttributesSequence:
            value = item.get(keyword)
            if value:
                return str(value).strip()
    except Exception:  # an unreadable sequence: the notification goes without it
        return None
    return None

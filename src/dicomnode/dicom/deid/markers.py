"""What every de-identified output gets besides its cleaned elements (PS3.15 E.1.1): the
de-identification markers, a Contributing Equipment item naming the de-identifier, and
new File Meta Information.

Pure functions over datasets; :class:`~dicomnode.dicom.deid.engine.Deidentifier` encodes
the markers and the equipment item once per (encoding, methods) and shares the result.
"""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.dicom.deid._elements import elem_text
from dicomnode.dicom.deid.options import CID_7050, DeidOptions
from dicomnode.dicom.deid.table import TABLE_EDITION

__all__ = ["VERSION", "encode_raw", "equipment_item", "file_meta", "markers", "meta_template"]

try:  # the package version, recorded in De-identification Method
    from importlib.metadata import version as _version

    VERSION = _version("dicomnode")
except Exception:  # pragma: no cover - not installed (source checkout)
    VERSION = "0"

_T_SOP_CLASS = 0x00080016
_T_SOP_UID = 0x00080018
_T_TRANSFER_SYNTAX = 0x00020010


def equipment_item() -> Dataset:
    """A Contributing Equipment Sequence item: dicomnode as De-identifying Equipment."""
    item = Dataset()
    item.Manufacturer = "dicomnode"
    item.SoftwareVersions = VERSION
    code = Dataset()
    code.CodeValue = "109104"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "De-identifying Equipment"
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    item.ContributionDescription = "De-identified: PS3.15 Annex E Basic Profile"
    return item


def method_description(methods: tuple[str, ...]) -> list[str]:
    """De-identification Method values: the profile, then each applied CID 7050 option."""
    # LO is at most 64 characters a value, so one value per statement (VM 1-n).
    return [f"dicomnode {VERSION} PS3.15 Table E.1-1 {TABLE_EDITION}"] + [
        CID_7050[c][:64] for c in methods
    ]


def markers(methods: tuple[str, ...], options: DeidOptions) -> Dataset:
    """PS3.15 E.1.1: Patient Identity Removed, the method and its CID 7050 codes, and
    Longitudinal Temporal Information Modified (E.2, E.3.6/E.3.7)."""
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method_description(methods)
    items = []
    for code in methods:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = CID_7050[code]
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    if options.shifts_dates:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    elif options.retain_longitudinal_full_dates:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds


def encode_raw(ds: Dataset, implicit: bool, little: bool) -> dict[int, Any]:
    """``ds``'s elements encoded in one encoding and read back as raw elements."""
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    raw = read_dataset(BytesIO(buf.getvalue()), implicit, little)
    return dict(raw._dict)


def meta_template(options: DeidOptions) -> dict[int, Any]:
    """The File Meta elements every output shares: version and our implementation."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = options.implementation_class_uid
    meta.ImplementationVersionName = options.implementation_version_name
    return dict(meta._dict)


def file_meta(out: Dataset, src: Dataset, template: dict[int, Any]) -> FileMetaDataset:
    """New File Meta Information for de-identified ``out`` (PS3.15 E.1.1): ``template``
    (:func:`meta_template`), ``out``'s SOP Class and Instance UIDs, and the transfer
    syntax of ``src``."""
    ts = None
    src_meta = getattr(src, "file_meta", None)
    if src_meta is not None and _T_TRANSFER_SYNTAX in src_meta:
        ts = elem_text(src_meta._dict[_T_TRANSFER_SYNTAX])
    if not ts:
        imp, little = src.original_encoding
        if imp is None:
            ts = ExplicitVRLittleEndian
        elif imp:
            ts = ImplicitVRLittleEndian
        else:
            ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    put = meta._dict
    # Built as converted elements: pydicom converts and validates every File Meta
    # element when writing anyway, and copying prepared ones is the cheapest way.
    for tag, elem in template.items():
        put[tag] = copy.copy(elem)
    for tag, value in (
        (0x00020002, elem_text(out._dict[_T_SOP_CLASS])),
        (0x00020003, elem_text(out._dict[_T_SOP_UID])),
        (_T_TRANSFER_SYNTAX, str(ts)),
    ):
        put[BaseTag(tag)] = DataElement(tag, "UI", UID(value), already_converted=True)
    return meta

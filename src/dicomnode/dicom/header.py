"""Read what the index needs from an encoded dataset, and check it is whole.

Pure functions on bytes: no files, no network. Used by the C-STORE handler, so
they are written to be cheap: the structure check walks element headers only
(about 0.1 ms for a CT slice) and the header read stops before Pixel Data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.errors import DatasetError

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "IndexHeader",
    "Part10",
    "check_structure",
    "encode_file_meta",
    "inflate",
    "read_index_header",
    "scan_dataset",
    "split_part10",
]

IMPLEMENTATION_CLASS_UID = "2.25.265855375540086932647479060004934457875"
"""The node's Implementation Class UID (PS3.7 D.3.3.2), in every file meta it writes."""
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_0_1"

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2)
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010

_REQUIRED_UIDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_CAPTURE = frozenset([*_REQUIRED_UIDS, 0x00080060, 0x00200011])  # + Modality, SeriesNumber

_INDEX_TAGS = [
    BaseTag(0x00080005),  # SpecificCharacterSet
    BaseTag(0x00080016),  # SOPClassUID
    BaseTag(0x00080018),  # SOPInstanceUID
    BaseTag(0x00080060),  # Modality
    BaseTag(0x0020000D),  # StudyInstanceUID
    BaseTag(0x0020000E),  # SeriesInstanceUID
    BaseTag(0x00200011),  # SeriesNumber
]


@dataclass(frozen=True)
class IndexHeader:
    """The attributes the index keeps (before pseudonymisation)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None


def inflate(stream: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw DEFLATE, RFC 1951)."""
    try:
        return zlib.decompress(stream, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise DatasetError(f"deflated dataset cannot be inflated: {exc}") from None


def _encoding(transfer_syntax_uid: str, stream: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a dataset.

    Tolerant in, as pydicom is: a dataset negotiated as explicit VR whose first
    element carries no VR (two upper-case letters) is read as implicit VR.
    """
    if transfer_syntax_uid == ImplicitVRLittleEndian:
        return True, True
    little = transfer_syntax_uid != ExplicitVRBigEndian
    vr = stream[4:6]
    if len(vr) == 2 and not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        return True, little
    return False, little


def check_structure(stream: bytes, transfer_syntax_uid: str) -> dict[int, bytes]:
    """Walk every element header at every depth and check the lengths add up.

    Catches truncated and garbled datasets (a length running past the end, an
    unterminated sequence or encapsulated Pixel Data). Necessary but not
    sufficient: element values themselves are not decoded.

    Returns
    -------
    dict
        The raw values of the top-level elements the index needs, by tag.

    Raises
    ------
    DatasetError
        Status 0xC210, naming the offset where the structure breaks.
    """
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        stream = inflate(stream)
    implicit, little = _encoding(transfer_syntax_uid, stream)
    captured: dict[int, bytes] = {}
    end = _walk(
        stream, 0, len(stream), implicit, little, depth=0, stop_at_delimiter=False, capture=captured
    )
    if end != len(stream):
        raise DatasetError(f"dataset structure broken at byte {end}")
    return captured


def scan_dataset(stream: bytes, transfer_syntax_uid: str) -> IndexHeader:
    """Check the structure and read the index attributes in one pass, without pydicom.

    About 0.1 ms for a CT slice: element headers only, values of six top-level
    ASCII elements.

    Raises
    ------
    DatasetError
        0xC210 when the structure is broken; 0xC220 when a required UID is
        missing or not a valid UID.
    """
    raw = check_structure(stream, transfer_syntax_uid)

    def text(tag: int) -> str:
        return raw.get(tag, b"").decode("ascii", "replace").strip(" \x00")

    uids = {}
    for tag, kw in _REQUIRED_UIDS.items():
        v = text(tag)
        if not v or not UID(v).is_valid:
            raise DatasetError(f"{kw} is missing or not a valid UID", status=0xC220)
        uids[kw] = v
    try:
        series_number: int | None = int(text(0x00200011)) if text(0x00200011) else None
    except ValueError:
        series_number = None
    return IndexHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        modality=text(0x00080060)[:16] or None,
        series_number=series_number,
    )


def _walk(
    buf: bytes,
    pos: int,
    limit: int,
    implicit: bool,
    little: bool,
    depth: int,
    stop_at_delimiter: bool,
    capture: dict[int, bytes] | None = None,
) -> int:
    if depth > 32:
        raise DatasetError("sequences nested deeper than 32 levels")
    e = "<" if little else ">"
    tag_fmt, u32, u16 = struct.Struct(e + "HH"), struct.Struct(e + "I"), struct.Struct(e + "H")
    while pos < limit:
        if pos + 8 > limit:
            raise DatasetError(f"dataset truncated in an element header at byte {pos}")
        group, elem = tag_fmt.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM_END, _SEQ_END):
            if not stop_at_delimiter:
                raise DatasetError(f"unexpected delimiter at byte {pos}")
            return pos  # caller consumes the delimiter
        if group == 0xFFFE:
            raise DatasetError(f"item tag outside a sequence at byte {pos}")
        if implicit:
            vr = None
            length = u32.unpack_from(buf, pos + 4)[0]
            pos += 8
        else:
            vr = buf[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > limit:
                    raise DatasetError(f"dataset truncated in an element header at byte {pos}")
                length = u32.unpack_from(buf, pos + 8)[0]
                pos += 12
            else:
                length = u16.unpack_from(buf, pos + 6)[0]
                pos += 8
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                pos = _walk_fragments(buf, pos, limit, u32, tag_fmt)
            else:  # a sequence (SQ, or UN holding an implicit-VR sequence)
                pos = _walk_items(buf, pos, limit, implicit or vr == b"UN", little, depth)
            continue
        if pos + length > limit:
            raise DatasetError(
                f"dataset truncated: element ({group:04X},{elem:04X}) runs past the end"
            )
        if capture is not None and tag in _CAPTURE:
            capture[tag] = buf[pos : pos + length]
        if vr == b"SQ" and length:
            inner = _walk_items(buf, pos, pos + length, implicit, little, depth, defined=True)
            if inner != pos + length:
                raise DatasetError(f"sequence ({group:04X},{elem:04X}) length mismatch")
        pos += length
    return pos


def _walk_items(
    buf: bytes,
    pos: int,
    limit: int,
    implicit: bool,
    little: bool,
    depth: int,
    defined: bool = False,
) -> int:
    e = "<" if little else ">"
    tag_fmt, u32 = struct.Struct(e + "HH"), struct.Struct(e + "I")
    while True:
        if defined and pos == limit:
            return pos
        if pos + 8 > limit:
            raise DatasetError(f"dataset truncated inside a sequence at byte {pos}")
        group, elem = tag_fmt.unpack_from(buf, pos)
        tag = (group << 16) | elem
        length = u32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise DatasetError(f"expected a sequence item at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, limit, implicit, little, depth + 1, stop_at_delimiter=True)
            if pos + 8 > limit or tag_fmt.unpack_from(buf, pos) != (0xFFFE, 0xE00D):
                raise DatasetError(f"unterminated sequence item at byte {pos}")
            pos += 8
        else:
            if pos + length > limit:
                raise DatasetError(f"sequence item runs past the end at byte {pos}")
            inner = _walk(
                buf, pos, pos + length, implicit, little, depth + 1, stop_at_delimiter=False
            )
            pos = inner


def _walk_fragments(
    buf: bytes, pos: int, limit: int, u32: struct.Struct, tag_fmt: struct.Struct
) -> int:
    while True:
        if pos + 8 > limit:
            raise DatasetError("encapsulated Pixel Data truncated")
        group, elem = tag_fmt.unpack_from(buf, pos)
        tag = (group << 16) | elem
        length = u32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM or length == _UNDEFINED or pos + length > limit:
            raise DatasetError("encapsulated Pixel Data fragment broken or truncated")
        pos += length


def read_index_header(stream: bytes, transfer_syntax_uid: str) -> IndexHeader:
    """Read the UIDs and the few attributes the index keeps.

    Raises
    ------
    DatasetError
        0xC210 when the header cannot be decoded; 0xC220 when a required UID
        is missing or not a valid UID.
    """
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        stream = inflate(stream)
    implicit, little = _encoding(transfer_syntax_uid, stream)
    try:
        ds: Dataset = read_dataset(
            BytesIO(stream),
            implicit,
            little,
            stop_when=lambda tag, vr, length: tag >= _PIXEL_DATA,
            specific_tags=list(_INDEX_TAGS),
        )
        values = {
            kw: ds.get(kw)
            for kw in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "Modality",
                "SeriesNumber",
            )
        }
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise DatasetError(f"dataset header cannot be decoded ({exc.__class__.__name__})") from None
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        v = values[kw]
        if not v or not isinstance(v, str) or not UID(v).is_valid:
            raise DatasetError(f"{kw} is missing or not a valid UID", status=0xC220)
    number = values["SeriesNumber"]
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    modality = values["Modality"]
    return IndexHeader(
        sop_class_uid=str(values["SOPClassUID"]),
        sop_instance_uid=str(values["SOPInstanceUID"]),
        study_instance_uid=str(values["StudyInstanceUID"]),
        series_instance_uid=str(values["SeriesInstanceUID"]),
        modality=str(modality)[:16] if modality else None,
        series_number=series_number,
    )


def _element(group_elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    head = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF) + vr
    if vr == b"OB":
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1), encoded.

    Written by hand rather than through pydicom: this runs once per received
    object in the C-STORE handler, where building a FileMetaDataset cost 0.2 ms.
    """
    body = b"".join(
        [
            _element(0x00020001, b"OB", b"\x00\x01", b"\x00"),
            _element(0x00020002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
            _element(0x00020003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
            _element(0x00020010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
            _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
            _element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
            *(
                [_element(0x00020016, b"AE", source_ae_title.encode("ascii", "replace"), b" ")]
                if source_ae_title
                else []
            ),
        ]
    )
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


@dataclass(frozen=True)
class Part10:
    """A PS3.10 file split into what the ingest needs: its File Meta UIDs and where
    the dataset starts."""

    media_storage_sop_class_uid: str
    media_storage_sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int


def split_part10(data: bytes | memoryview) -> Part10:
    """Read the File Meta Information of a PS3.10 file (preamble, "DICM", group 0002 in
    explicit VR little endian, PS3.10 7.1) without parsing the dataset. A meta group
    without preamble and prefix is accepted too.

    Raises
    ------
    DatasetError
        0xC210: not a PS3.10 file (no "DICM" prefix, truncated or malformed meta
        group); 0xC220: a required meta UID is missing.
    """
    view = memoryview(data)
    if len(view) >= 144 and bytes(view[128:132]) == b"DICM":
        pos = 132
    elif bytes(view[:2]) == b"\x02\x00" and bytes(view[4:6]).isalpha():
        # Tolerant in: pydicom's dcmwrite without enforce_file_format (dicomweb-client's
        # STOW-RS) writes the meta group with neither preamble nor "DICM" (nor its length).
        pos = 0
    else:
        raise DatasetError("not a DICOM file: no DICM prefix after the 128-byte preamble")
    values: dict[int, str] = {}
    end = None
    while pos + 8 <= len(view):
        group, elem = struct.unpack_from("<HH", view, pos)
        if group != 0x0002 or (end is not None and pos >= end):
            break
        vr = bytes(view[pos + 4:pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if pos + 12 > len(view):
                break
            length = struct.unpack_from("<I", view, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", view, pos + 6)[0]
            start = pos + 8
        if start + length > len(view):
            raise DatasetError("the File Meta Information is truncated")
        value = bytes(view[start:start + length])
        if elem == 0x0000 and length == 4:
            end = start + length + struct.unpack("<I", value)[0]
        values[elem] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if end is not None and pos != end:
        raise DatasetError("File Meta Information Group Length disagrees with the group")
    missing = [k for k, e in (("MediaStorageSOPClassUID", 0x0002),
                              ("MediaStorageSOPInstanceUID", 0x0003),
                              ("TransferSyntaxUID", 0x0010)) if not values.get(e)]
    if missing:
        raise DatasetError(f"File Meta Information lacks {', '.join(missing)}", status=0xC220)
    if pos >= len(view):
        raise DatasetError("the file has no dataset after its File Meta Information")
    return Part10(values[0x0002], values[0x0003], values[0x0010], pos)

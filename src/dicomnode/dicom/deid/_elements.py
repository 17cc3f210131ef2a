"""Element-level helpers shared by the engine and the re-identifier.

They work on pydicom's raw elements where they can: decoding a UID or a date from
its bytes and writing a new raw element back avoids pydicom's value conversion and
validation, which cost more than the de-identification itself and would warn about
invalid values in the input (tolerant in: those are replaced, not judged).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = ["decoded", "elem_text", "encode_text", "raw_element"]


def raw_element(tag: int, vr: str | None, value: bytes, like: Any) -> RawDataElement:
    """A raw element in the encoding of ``like`` (raw or not) holding encoded ``value``."""
    if like is not None and like.is_raw:
        return RawDataElement(
            BaseTag(tag), vr, len(value), value, 0, like.is_implicit_VR, like.is_little_endian
        )
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def encode_text(text: str, vr: str | None) -> bytes:
    """ASCII ``text`` padded to even length (NUL for UI, space otherwise, PS3.5 6.2)."""
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def elem_text(elem: Any) -> str:
    """An ASCII-safe element's value as one string (``\\``-joined), padding removed.

    For DA, DT, TM, UI, AS, CS values; text in other character sets goes through
    :func:`decoded` instead.
    """
    if elem.is_raw:
        value = elem.value
        return value.decode("latin-1").strip(" \x00") if value else ""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def decoded(ds: Dataset, tag: int) -> str:
    """A text element decoded with the dataset's character set, ``\\``-joined.

    Plain ASCII bytes decode the same in every character set DICOM allows except
    through ISO 2022 escape sequences (ESC is ASCII), so only those and non-ASCII
    values go through pydicom's (slower) conversion.
    """
    elem = ds._dict[tag]  # internal dict: get_item() converts the key to a Tag each call
    if elem.is_raw:
        raw = elem.value
        if not raw:
            return ""
        if raw.isascii() and b"\x1b" not in raw:
            return raw.decode("ascii").rstrip(" \x00")
    value = ds[tag].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)

"""Pixel data: risk flags (the caller's policy decides) and rectangle masking (113101).

PS3.15 E.1.1 requires that burned-in identification is absent, or that Clean Pixel
Data is applied; how to find it is out of the standard's scope. This module does
not look at pixels to find text. It flags objects by header (Burned In Annotation,
SOP Class, Modality, Image Type, Series Description; deid.md 5.5) and blanks
configured rectangles (:class:`~dicomnode.dicom.deid.options.MaskRule`), the only case
in which Clean Pixel Data is claimed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.dicom.deid.options import DeidOptions, MaskRule, RiskFlag

__all__ = ["CLEARED_BY_MASKING", "apply_mask", "assess", "matching_rule"]

CLEARED_BY_MASKING = frozenset(
    {
        RiskFlag.BURNED_IN_ANNOTATION,
        RiskFlag.RISKY_SOP_CLASS,
        RiskFlag.RISKY_MODALITY,
        RiskFlag.SCREEN_CAPTURE,
    }
)
"""Flags a matching mask rule resolves: the rule says where this device burns text in."""

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_DOCUMENT_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
_PHOTO_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.77.1.4",
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
_PHOTO_MODALITIES = frozenset({"XC", "ES", "GM", "OP"})
_COLOR = ("RGB", "YBR", "PALETTE")
_SCREEN_WORDS = (
    "SCREEN SAVE",
    "SCREENSAVE",
    "SCREENSHOT",
    "SCREEN CAPTURE",
    "DOSE REPORT",
    "DOSE INFO",
    "PATIENT PROTOCOL",
)


def _text(ds: Dataset, tag: int) -> str:
    elem = ds._dict.get(tag)
    if elem is None:
        return ""
    value = elem.value
    if elem.is_raw:
        return value.decode("latin-1").strip(" \x00").upper() if value else ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).upper()
    return str(value).strip().upper()


def assess(ds: Dataset, options: DeidOptions) -> tuple[RiskFlag, ...]:
    """The risk flags of an instance, from its (original) header.

    Burned In Annotation YES is always flagged; on a risky SOP Class or Modality
    anything but an explicit NO counts as YES (deid.md 6 #92), and NO does not
    clear the class flag (a header flag is not evidence, deid.md 2.3).
    """
    sop_class = _text(ds, 0x00080016)
    modality = _text(ds, 0x00080060)
    burned = _text(ds, 0x00280301)
    risky_class = sop_class in options.risky_sop_classes
    risky_modality = modality in options.risky_modalities
    flags = []
    if burned == "YES" or ((risky_class or risky_modality) and burned != "NO"):
        flags.append(RiskFlag.BURNED_IN_ANNOTATION)
    if risky_class:
        flags.append(RiskFlag.RISKY_SOP_CLASS)
    if risky_modality:
        flags.append(RiskFlag.RISKY_MODALITY)
    described = _text(ds, 0x00080008) + "\\" + _text(ds, 0x0008103E)
    if any(w in described for w in _SCREEN_WORDS):
        flags.append(RiskFlag.SCREEN_CAPTURE)
    if sop_class.startswith(_DOCUMENT_PREFIX):
        flags.append(RiskFlag.ENCAPSULATED_DOCUMENT)
    if sop_class.startswith(_SR_PREFIX):
        flags.append(RiskFlag.STRUCTURED_CONTENT)
    photometric = _text(ds, 0x00280004)
    if (
        sop_class in _PHOTO_CLASSES
        or modality in _PHOTO_MODALITIES
        or (modality == "OT" and photometric.startswith(_COLOR))
    ):
        flags.append(RiskFlag.RECOGNIZABLE_FEATURES)
    return tuple(flags)


def matching_rule(ds: Dataset, rules: tuple[MaskRule, ...]) -> MaskRule | None:
    """The first rule whose criteria all match ``ds`` (None when none does)."""
    if not rules or 0x7FE00010 not in ds:
        return None
    values: dict[str, Any] = {
        "sop_class_uid": _text(ds, 0x00080016),
        "modality": _text(ds, 0x00080060),
        "manufacturer": _text(ds, 0x00080070),
        "manufacturer_model_name": _text(ds, 0x00081090),
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "columns": int(ds.Columns) if "Columns" in ds else None,
    }
    for rule in rules:
        ok = True
        for name, value in values.items():
            want = getattr(rule, name)
            if want is None:
                continue
            if isinstance(want, str):
                want = want.strip().upper()
            if want != value:
                ok = False
                break
        if ok and rule.keep_ultrasound_regions and not ds.get("SequenceOfUltrasoundRegions"):
            ok = False
        if ok:
            return rule
    return None


def apply_mask(ds: Dataset, rule: MaskRule) -> bool:
    """Set the rule's pixels to 0 in every frame and sample of ``ds`` (in place).

    Compressed Pixel Data is decoded first (YBR decoded to RGB) and written back
    uncompressed in Explicit VR Little Endian; re-encoding a lossy syntax would lose
    more, and pydicom's lossless encoders do not cover every input syntax. Uncompressed
    input keeps its transfer syntax. ``ds.file_meta`` must be set.

    Returns
    -------
    bool
        False when the pixels cannot be masked here (1-bit data, float data, no
        Rows/Columns): the instance is then not claimed clean and keeps its flags.
    """
    if int(ds.get("BitsAllocated", 0)) not in (8, 16, 32) or "FloatPixelData" in ds:
        return False
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if not rows or not columns:
        return False
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # keep our pseudonymous SOP Instance UID
    arr = np.array(ds.pixel_array)  # a writable copy; pixel_array may view the bytes
    blank = np.zeros((rows, columns), dtype=bool)
    if rule.keep_ultrasound_regions:
        blank[:] = True
        for region in ds.SequenceOfUltrasoundRegions:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
            blank[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = False
    for r in rule.regions:
        blank[r.row : r.row + r.rows, r.column : r.column + r.columns] = True
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr[:, blank] = 0
    else:
        arr[blank] = 0
    vr = "OB" if int(ds.BitsAllocated) == 8 else "OW"
    ds[0x7FE00010] = DataElement(0x7FE00010, vr, arr.tobytes())
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = 0  # pixel_array is always colour-by-pixel
    return True

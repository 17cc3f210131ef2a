"""What the de-identifier does: profile options, pseudonym formats, pixel policy.

Defaults follow deid.md 5.1: Basic Profile (113100) with Retain Longitudinal
Temporal Information with Modified Dates (113107), Retain Patient Characteristics
(113108) and Clean Descriptors (113105); every other option off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from pydicom.datadict import tag_for_keyword

__all__ = [
    "CID_7050",
    "DEFAULT_RISKY_MODALITIES",
    "DEFAULT_RISKY_SOP_CLASSES",
    "DeidOptions",
    "MaskRule",
    "PatientNameStyle",
    "PrivateTagRule",
    "Region",
    "RiskFlag",
]

IMPLEMENTATION_CLASS_UID = "2.25.265855375540086932647479060004934457875"
"""dicomnode's Implementation Class UID: ``2.25.`` + uuid5(NAMESPACE_URL,
"dicomnode:implementation-class") as an integer (PS3.5 B.2), fixed."""

CID_7050: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}
"""CID 7050 "De-identification Method" (PS3.16), scheme DCM: code value -> meaning."""


class PatientNameStyle(Enum):
    """How the pseudonymous Patient's Name is formed from the pseudonymous Patient ID."""

    ID = "id"
    """Patient's Name = the pseudonymous Patient ID as family name (``PABCD...^``)."""
    ANON_ID = "anon^id"
    """Patient's Name = ``ANON^<pseudonymous Patient ID>`` (family name ANON)."""


class RiskFlag(Enum):
    """Why an instance's pixel data or content may still identify the patient.

    The engine only reports these; the caller's policy decides (quarantine by default,
    :attr:`DeidOptions.quarantine_flags`).
    """

    BURNED_IN_ANNOTATION = "burned-in-annotation"
    """Burned In Annotation is YES, or absent/unknown on a risky object (deid.md 6 #92)."""
    RISKY_SOP_CLASS = "risky-sop-class"
    """A SOP Class whose pixels typically carry text (US, SC, XA/RF, VL, video)."""
    RISKY_MODALITY = "risky-modality"
    """A Modality whose pixels typically carry text (configurable list)."""
    SCREEN_CAPTURE = "screen-capture"
    """Image Type or Series Description says SCREEN SAVE / screenshot / dose report."""
    ENCAPSULATED_DOCUMENT = "encapsulated-document"
    """An encapsulated PDF, CDA, STL...: the document itself is not de-identified."""
    STRUCTURED_CONTENT = "structured-content"
    """An SR: Clean Structured Content (113104) is not implemented, text items are
    replaced by dummies but the tree is kept."""
    RECOGNIZABLE_FEATURES = "recognizable-visual-features"
    """A photograph (XC, VL, OT in colour): a face may be recognisable (113102 not applied)."""


@dataclass(frozen=True)
class PrivateTagRule:
    """One private element allowed by Retain Safe Private (113111), matched by creator.

    Blocks are matched by Private Creator, never by group number, because a PACS may
    relocate a block to another group (deid#205).

    Parameters
    ----------
    creator
        Private Creator value (trailing spaces ignored, case-sensitive).
    element
        The element offset inside the block, 0x00-0xFF (``0x10`` for ``(gggg,xx10)``).
    vr
        The VR the element must have. Blobs (OB, OW, UN, SQ, UT, LT...) are refused:
        "Bulk binary data in OB ... is particularly unsafe" (PS3.15 E.3.10).

    Raises
    ------
    ValueError
        ``element`` out of range, or ``vr`` not a safe (numeric, code or date) VR.
    """

    creator: str
    element: int
    vr: str

    SAFE_VRS = frozenset(
        {"DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "CS", "DA", "DT", "TM"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.element <= 0xFF:
            raise ValueError(f"PrivateTagRule.element must be 0x00-0xFF, got {self.element:#x}")
        if self.vr not in self.SAFE_VRS:
            raise ValueError(
                f"PrivateTagRule.vr must be one of {sorted(self.SAFE_VRS)}, got {self.vr!r}"
            )
        if not self.creator.strip():
            raise ValueError("PrivateTagRule.creator must not be empty")


@dataclass(frozen=True)
class Region:
    """A rectangle of pixels, 0-based: ``rows`` x ``columns`` starting at (``row``, ``column``).

    ``row`` counts down from the top (the Rows direction), ``column`` across from the
    left (the Columns direction), as in PS3.3 C.7.6.3.1 (deid#59: not swapped).
    """

    row: int
    column: int
    rows: int
    columns: int

    def __post_init__(self) -> None:
        if min(self.row, self.column) < 0 or min(self.rows, self.columns) < 1:
            raise ValueError(
                f"Region must have row, column >= 0 and rows, columns >= 1, got {self}"
            )


@dataclass(frozen=True)
class MaskRule:
    """Pixels to blank for the objects it matches (Clean Pixel Data, 113101).

    A rule matches when every criterion that is not None equals the object's value;
    ``rows``/``columns`` make it specific to one image size (karnak#179). The first
    matching rule is applied to every frame.

    Parameters
    ----------
    regions
        Rectangles set to 0 in every frame and every sample.
    keep_ultrasound_regions
        Blank everything outside the Sequence of Ultrasound Regions instead (deid's
        ultrasound recipe); the object must have that sequence or the rule does not match.
    """

    regions: tuple[Region, ...] = ()
    sop_class_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    rows: int | None = None
    columns: int | None = None
    keep_ultrasound_regions: bool = False

    def __post_init__(self) -> None:
        if not self.regions and not self.keep_ultrasound_regions:
            raise ValueError("MaskRule needs regions or keep_ultrasound_regions=True")


DEFAULT_RISKY_SOP_CLASSES: frozenset[str] = frozenset(
    {
        # Secondary Capture (screenshots, scanned documents, dose sheets)
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        # Ultrasound (incl. retired), enhanced US volume, photoacoustic
        "1.2.840.10008.5.1.4.1.1.6",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.6.2",
        "1.2.840.10008.5.1.4.1.1.6.3",
        "1.2.840.10008.5.1.4.1.1.3",
        "1.2.840.10008.5.1.4.1.1.3.1",
        # X-ray angiography and radiofluoroscopy
        "1.2.840.10008.5.1.4.1.1.12.1",
        "1.2.840.10008.5.1.4.1.1.12.1.1",
        "1.2.840.10008.5.1.4.1.1.12.2",
        "1.2.840.10008.5.1.4.1.1.12.2.1",
        # Visible light: endoscopy, microscopy, photography, video, WSI labels, ophthalmic
        "1.2.840.10008.5.1.4.1.1.77.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.2",
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",
        "1.2.840.10008.5.1.4.1.1.77.1.3",
        "1.2.840.10008.5.1.4.1.1.77.1.4",
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",
        "1.2.840.10008.5.1.4.1.1.77.1.6",
        # Encapsulated documents (PDF, CDA, STL, OBJ, MTL) and raw data
        "1.2.840.10008.5.1.4.1.1.104.1",
        "1.2.840.10008.5.1.4.1.1.104.2",
        "1.2.840.10008.5.1.4.1.1.104.3",
        "1.2.840.10008.5.1.4.1.1.104.4",
        "1.2.840.10008.5.1.4.1.1.104.5",
        "1.2.840.10008.5.1.4.1.1.66",
    }
)
"""SOP Classes flagged :attr:`RiskFlag.RISKY_SOP_CLASS` (deid.md 5.5)."""

DEFAULT_RISKY_MODALITIES: frozenset[str] = frozenset(
    {
        "US",
        "IVUS",
        "XA",
        "RF",
        "OT",
        "XC",
        "ES",
        "GM",
        "SM",
        "OP",
        "DOC",
        "SC",
    }
)
"""Modalities flagged :attr:`RiskFlag.RISKY_MODALITY` (deid.md 5.5)."""

_ALL_FLAGS = frozenset(RiskFlag)


def _keywords_to_tags(keywords: Iterable[str], name: str) -> frozenset[int]:
    tags = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:
            raise ValueError(f"DeidOptions.{name}: {kw!r} is not a DICOM keyword")
        tags.add(tag)
    return frozenset(tags)


@dataclass(frozen=True)
class DeidOptions:
    """Options of the de-identifier (PS3.15 Annex E with CID 7050 options).

    Every field has the default of deid.md 5.1. Frozen and hashable: the compiled
    rule table is cached per options value.

    Raises
    ------
    ValueError
        Contradictory options (both longitudinal date options), an unknown keyword in
        ``keep_text``/``keep_uids``, or a bad shift/age setting.
    """

    retain_longitudinal_modified_dates: bool = True
    """113107: shift every date by the patient's keyed whole-day shift (default on)."""
    retain_patient_characteristics: bool = True
    """113108: keep sex, age, size, weight... (default on)."""
    clean_descriptors: bool = True
    """113105: keep descriptors after word cleaning instead of removing them (default on)."""
    retain_longitudinal_full_dates: bool = False
    """113106: keep dates unchanged. Exclusive with 113107."""
    retain_device_identity: bool = False
    """113109: keep device serial numbers, station names..."""
    retain_institution_identity: bool = False
    """113112: keep institution name, address, department."""
    retain_uids: bool = False
    """113110: keep UIDs (never recommended: re-identification by UID is trivial)."""
    retain_safe_private: bool = False
    """113111: keep the private elements listed in ``safe_private`` (empty by default)."""
    safe_private: tuple[PrivateTagRule, ...] = ()
    """Allow-list for 113111, matched by Private Creator."""

    patient_name_style: PatientNameStyle = PatientNameStyle.ID
    """Form of the pseudonymous Patient's Name."""
    issuer_of_patient_id: str | None = None
    """Issuer of Patient ID to write (the node's own); None removes it (Table E.1-1: X)."""
    age_cap_years: int | None = 90
    """Ages at or over this are written as this many years (None: no bucketing)."""

    keep_text: frozenset[str] = frozenset()
    """Keywords of free-text attributes kept by the VR safety net, besides
    ``data/keep_text.txt``."""
    keep_uids: frozenset[str] = frozenset()
    """Keywords of UI attributes never remapped, besides ``data/keep_uid.txt``."""
    descriptor_words: frozenset[str] = frozenset()
    """Words allowed by Clean Descriptors besides the built-in vocabulary."""

    risky_sop_classes: frozenset[str] = DEFAULT_RISKY_SOP_CLASSES
    risky_modalities: frozenset[str] = DEFAULT_RISKY_MODALITIES
    quarantine_flags: frozenset[RiskFlag] = _ALL_FLAGS
    """Flags that make :attr:`DeidentifiedInstance.quarantine` true."""
    mask_rules: tuple[MaskRule, ...] = ()
    """Clean Pixel Data rules; 113101 is claimed only for instances a rule masked."""

    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str = "DICOMNODE_0_1"
    add_contributing_equipment: bool = True
    """Add a Contributing Equipment item with purpose (109104, DCM, "De-identifying
    Equipment"), as PS3.3 C.12.1.1.7 suggests; no date or institution in it."""

    keep_text_tags: frozenset[int] = field(init=False, repr=False, compare=False)
    keep_uid_tags: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.retain_longitudinal_full_dates and self.retain_longitudinal_modified_dates:
            raise ValueError(
                "DeidOptions: retain_longitudinal_full_dates (113106) and "
                "retain_longitudinal_modified_dates (113107) are exclusive"
            )
        if self.age_cap_years is not None and not 1 <= self.age_cap_years <= 999:
            raise ValueError(f"DeidOptions.age_cap_years must be 1-999, got {self.age_cap_years}")
        if len(self.implementation_version_name) > 16:
            raise ValueError(
                "DeidOptions.implementation_version_name must be at most 16 characters"
            )
        object.__setattr__(self, "keep_text_tags", _keywords_to_tags(self.keep_text, "keep_text"))
        object.__setattr__(self, "keep_uid_tags", _keywords_to_tags(self.keep_uids, "keep_uids"))

    @property
    def shifts_dates(self) -> bool:
        """Whether dates are shifted (113107)."""
        return self.retain_longitudinal_modified_dates

    def option_codes(self) -> tuple[str, ...]:
        """CID 7050 codes of the profile and the enabled options (113101 excluded: it is
        claimed per instance)."""
        codes = ["113100"]
        for code, on in (
            ("113105", self.clean_descriptors),
            ("113106", self.retain_longitudinal_full_dates),
            ("113107", self.retain_longitudinal_modified_dates),
            ("113108", self.retain_patient_characteristics),
            ("113109", self.retain_device_identity),
            ("113110", self.retain_uids),
            ("113111", self.retain_safe_private),
            ("113112", self.retain_institution_identity),
        ):
            if on:
                codes.append(code)
        return tuple(codes)

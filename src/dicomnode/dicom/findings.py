"""Value objects and small helpers shared by the SEG and SR builders.

Codes, who produced a result (algorithm, device), what it found, references to
earlier results; argument checks; deterministic sub-UIDs.

Every class validates on construction (construct valid or raise): a bad value
raises ``ValueError`` naming the field and giving actual vs expected. They hold
no patient data.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

__all__ = [
    "ARTIFICIAL_INTELLIGENCE",
    "AlgorithmSpec",
    "CodeTriple",
    "ComponentFinding",
    "DeviceSpec",
    "Finding",
    "InstanceReference",
    "as_code",
    "check_lo",
    "check_uid",
    "derived_uid",
    "pin_times",
]


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# Namespace of the node's name-based UIDs (a fixed, random UUID).
_UID_NAMESPACE = uuid.UUID("5b0f3f1e-8c55-4d0e-9a64-3c1f2a6d9e27")


class CodeTriple(NamedTuple):
    """A coded concept as (Coding Scheme Designator, Code Value, Code Meaning), PS3.3 8.8."""

    scheme_designator: str
    value: str
    meaning: str

    def to_code(self) -> Code:
        """As a pydicom :class:`~pydicom.sr.coding.Code`, which highdicom accepts for codes."""
        return Code(
            value=self.value, scheme_designator=self.scheme_designator, meaning=self.meaning
        )


ARTIFICIAL_INTELLIGENCE = CodeTriple("DCM", "123110", "Artificial Intelligence")
"""Algorithm Family (DCM 123110) from CID 7162 "Surface Processing Algorithm Family"."""


def as_code(value: object, name: str) -> CodeTriple:
    """Coerce ``value`` (a (scheme, value, meaning) tuple, pydicom ``Code`` or highdicom
    ``CodedConcept``) to a :class:`CodeTriple`; ``name`` is the parameter named in errors.

    Raises
    ------
    ValueError
        Not a code, or an empty part; a Code Meaning over 64 characters (LO).
    """
    if isinstance(value, CodeTriple):
        triple = value
    elif (
        hasattr(value, "scheme_designator")
        and hasattr(value, "value")
        and hasattr(value, "meaning")
    ):
        triple = CodeTriple(str(value.scheme_designator), str(value.value), str(value.meaning))
    elif isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, str) for v in value):
        triple = CodeTriple(*value)
    else:
        raise ValueError(
            f"{name} must be a (scheme, value, meaning) tuple or a Code, got {type(value).__name__}"
        )
    if not all(part.strip() for part in triple):
        raise ValueError(f"{name} has an empty part: {triple!r}")
    check_lo(triple.meaning, f"{name}.meaning")
    return triple


def check_lo(value: str, name: str, *, max_len: int = 64) -> str:
    """Check ``value`` fits a LO (Long String, PS3.5 6.2): at most 64 characters, no
    backslash or control characters. Returns it unchanged.

    Raises
    ------
    ValueError
        It does not fit.
    """
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} has {len(value)} characters, expected at most {max_len}")
    if "\\" in value or re.search(r"[\x00-\x1f]", value):
        raise ValueError(f"{name} contains a backslash or a control character")
    return value


def check_uid(value: str, name: str) -> str:
    """Check ``value`` is a valid UID (PS3.5 9.1). Returns it as ``str``.

    Raises
    ------
    ValueError
        It is not.
    """
    # Checked here rather than by pydicom's UID.is_valid, which raises instead of
    # answering when pydicom's validation mode is RAISE.
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} is not a valid UID (digits and dots, at most 64 characters)")
    return str(value)


def derived_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID from ``parts`` (sub-identifiers of a deterministic object).

    The UUID-derived form of PS3.5 B.2, with a name-based (SHA-1, RFC 4122
    version 5) UUID. Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``:
    with ``prefix=None`` pydicom 3.0 ignores ``entropy_srcs`` and returns a random UID.
    """
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def pin_times(ds: Dataset, when: _dt.datetime) -> None:
    """Set the creation timestamps highdicom takes from the clock to ``when``.

    Instance Creation Date/Time (SOP Common) and the Contribution DateTime of
    highdicom's own Contributing Equipment item, so that rebuilding an instance
    with the same inputs gives the same bytes.
    """
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    equipment = ds.get("ContributingEquipmentSequence")
    if equipment and "ContributionDateTime" in equipment[-1]:
        equipment[-1].ContributionDateTime = DT(when)


@dataclass(frozen=True)
class AlgorithmSpec:
    """The model that produced a result (SEG Segmentation Algorithm Identification
    Sequence, PS3.3 C.8.20.2; SR TID 4019 Algorithm Identification)."""

    name: str
    version: str
    family: CodeTriple = ARTIFICIAL_INTELLIGENCE
    """CID 7162; a (scheme, value, meaning) tuple or a pydicom Code is coerced."""
    source: str | None = None
    """Who made the algorithm (Algorithm Source / Algorithm Manufacturer)."""
    parameters: Mapping[str, str] | None = field(default=None, hash=False)
    """Written as "key=value" pairs (Algorithm Parameters, SR TID 4019)."""

    def __post_init__(self) -> None:
        for attr in ("name", "version"):
            value = getattr(self, attr)
            check_lo(value, f"AlgorithmSpec.{attr}")
            if not value.strip():
                raise ValueError(f"AlgorithmSpec.{attr} must not be empty")
        object.__setattr__(self, "family", as_code(self.family, "AlgorithmSpec.family"))
        if self.source is not None:
            check_lo(self.source, "AlgorithmSpec.source")


@dataclass(frozen=True)
class DeviceSpec:
    """The node as the equipment that created an object (General Equipment Module,
    PS3.3 C.7.5.1) and as the SR device observer (TID 1004)."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    device_observer_uid: str | None = None
    """Device Observer UID (TID 1004); None derives a stable one from the other fields."""
    device_observer_name: str | None = None
    """Device Observer Name; None uses ``manufacturer_model_name``."""
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for attr in (
            "manufacturer",
            "manufacturer_model_name",
            "software_versions",
            "device_serial_number",
        ):
            value = getattr(self, attr)
            check_lo(value, f"DeviceSpec.{attr}")
            if not value.strip():
                raise ValueError(f"DeviceSpec.{attr} must not be empty")
        for attr in ("device_observer_name", "institution_name"):
            if getattr(self, attr) is not None:
                check_lo(getattr(self, attr), f"DeviceSpec.{attr}")
        if self.device_observer_uid is None:
            uid = derived_uid(
                "device", self.manufacturer, self.manufacturer_model_name, self.device_serial_number
            )
            object.__setattr__(self, "device_observer_uid", uid)
        else:
            check_uid(self.device_observer_uid, "DeviceSpec.device_observer_uid")


@dataclass(frozen=True)
class InstanceReference:
    """A reference to one stored instance, e.g. the earlier result a new one supersedes."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for attr in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_class_uid",
            "sop_instance_uid",
        ):
            check_uid(getattr(self, attr), f"InstanceReference.{attr}")


@dataclass(frozen=True)
class Finding:
    """What a model measured for one segment of its SEG (one TID 1411 measurement group).

    The SR's region of interest for a finding is the whole SEG segment
    ``label_number``, so there is at most one finding per segment: to report
    lesions separately, give each its own segment (label) in the SEG.
    """

    label_number: int
    """Segment Number in the SEG (1-based)."""
    label: str
    """Human-readable name; the SR's Tracking Identifier (e.g. "Lesion 1")."""
    volume_mm3: float
    max_diameter_mm: float | None = None
    """Largest diameter of the region in 3D (mm)."""
    mean_intensity: float | None = None
    """Mean value inside the region after rescale (HU for CT)."""
    centroid_mm: tuple[float, float, float] | None = None
    """Centre of mass in patient coordinates (mm, LPS). Kept for logs and worklists; the
    SR writes a location only for a :class:`ComponentFinding` (one lesion)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.label_number, bool)
            or not isinstance(self.label_number, numbers.Integral)
            or not 1 <= self.label_number <= 65535
        ):
            raise ValueError(
                f"Finding.label_number must be an int in 1..65535, got {self.label_number!r}"
            )
        object.__setattr__(self, "label_number", int(self.label_number))
        check_lo(self.label, "Finding.label")
        if not self.label.strip():
            raise ValueError("Finding.label must not be empty")
        # numpy scalars are accepted and stored as Python floats
        object.__setattr__(
            self, "volume_mm3", _number(self.volume_mm3, "Finding.volume_mm3", minimum=0.0)
        )
        if self.max_diameter_mm is not None:
            value = _number(self.max_diameter_mm, "Finding.max_diameter_mm", minimum=0.0)
            object.__setattr__(self, "max_diameter_mm", value)
        if self.mean_intensity is not None:
            object.__setattr__(
                self, "mean_intensity", _number(self.mean_intensity, "Finding.mean_intensity")
            )
        if self.centroid_mm is not None:
            if len(self.centroid_mm) != 3:
                raise ValueError(
                    f"Finding.centroid_mm must have 3 values, got {len(self.centroid_mm)}"
                )
            centroid = tuple(_number(v, "Finding.centroid_mm") for v in self.centroid_mm)
            object.__setattr__(self, "centroid_mm", centroid)


@dataclass(frozen=True)
class ComponentFinding:
    """One finding of a segmentation: one connected component of one SEG segment, with
    its tracking identity (one TID 1411 group of its own, IHE AI Results style).

    Frames are indices into the source frames in mask order (the order of
    ``source_datasets``, or of ``frame_numbers`` for one multi-frame source).
    """

    label_number: int
    """The SEG segment the component belongs to."""
    tracking_identifier: str
    """E.g. "Lesion 2"; kept across re-runs of the study while the finding persists."""
    tracking_uid: str
    volume_mm3: float
    centroid_mm: tuple[float, float, float]
    """Centre of mass in patient coordinates (mm, LPS)."""
    frames: tuple[int, ...]
    """Source frames the component lies in (its region in the SEG segment)."""
    centroid_frame: int
    """The source frame nearest the centroid along the slice normal."""
    centroid_pixel: tuple[float, float]
    """(column, row) of the centroid on ``centroid_frame`` (SCOORD image coordinates:
    the top left corner of the first pixel is (0, 0))."""
    max_diameter_mm: float | None = None
    """Largest 3D diameter."""
    long_axis_mm: float | None = None
    """Largest in-plane diameter in any one slice."""
    short_axis_mm: float | None = None
    """Largest extent perpendicular to the long axis in its slice; None where not
    meaningful (a long axis of 0)."""
    mean_intensity: float | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.label_number, bool)
            or not isinstance(self.label_number, numbers.Integral)
            or not 1 <= self.label_number <= 65535
        ):
            raise ValueError(
                "ComponentFinding.label_number must be an int in 1..65535, "
                f"got {self.label_number!r}"
            )
        object.__setattr__(self, "label_number", int(self.label_number))
        check_lo(self.tracking_identifier, "ComponentFinding.tracking_identifier")
        if not self.tracking_identifier.strip():
            raise ValueError("ComponentFinding.tracking_identifier must not be empty")
        check_uid(self.tracking_uid, "ComponentFinding.tracking_uid")
        object.__setattr__(
            self, "volume_mm3", _number(self.volume_mm3, "ComponentFinding.volume_mm3", 0.0)
        )
        for attr in ("max_diameter_mm", "long_axis_mm", "short_axis_mm"):
            if getattr(self, attr) is not None:
                value = _number(getattr(self, attr), f"ComponentFinding.{attr}", 0.0)
                object.__setattr__(self, attr, value)
        if self.mean_intensity is not None:
            value = _number(self.mean_intensity, "ComponentFinding.mean_intensity")
            object.__setattr__(self, "mean_intensity", value)
        if len(self.centroid_mm) != 3:
            raise ValueError(
                f"ComponentFinding.centroid_mm must have 3 values, got {len(self.centroid_mm)}"
            )
        object.__setattr__(
            self,
            "centroid_mm",
            tuple(_number(v, "ComponentFinding.centroid_mm") for v in self.centroid_mm),
        )
        if len(self.centroid_pixel) != 2:
            raise ValueError("ComponentFinding.centroid_pixel must have 2 values")
        object.__setattr__(
            self,
            "centroid_pixel",
            tuple(_number(v, "ComponentFinding.centroid_pixel", 0.0) for v in self.centroid_pixel),
        )
        frames = tuple(int(f) for f in self.frames)
        if not frames or min(frames) < 0:
            raise ValueError("ComponentFinding.frames must name at least one frame index >= 0")
        object.__setattr__(self, "frames", tuple(sorted(set(frames))))
        if isinstance(self.centroid_frame, bool) or int(self.centroid_frame) < 0:
            raise ValueError(
                f"ComponentFinding.centroid_frame must be >= 0, got {self.centroid_frame!r}"
            )
        object.__setattr__(self, "centroid_frame", int(self.centroid_frame))


def _number(value: object, name: str, minimum: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)

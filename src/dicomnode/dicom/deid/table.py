"""PS3.15 Table E.1-1, compiled into a tag -> action dictionary for one set of options.

The table is data (``data/ps3.15-annex-e-table.json``, the innolitics/dicom-standard
extract of the 2024b edition, 621 rows); nothing here names an attribute of it by
hand except the few overrides listed in :data:`FORCED_REMOVALS`, which implement
decisions of deid.md 5.1/5.2 that are stricter than the table.

Action codes (PS3.15 E.1.1, Table E.1-1 legend) are resolved in two steps:

1. here, per options: an option column, where the option is on, overrides the
   Basic Profile column ("A requirement for an Option, when implemented, overrides
   any requirement for the underlying Profile", E.3); where two enabled options
   disagree, the more protective action wins (X > Z > D > C > K);
2. in the engine, per attribute: the conditional codes X/Z, X/D, X/Z/D, Z/D and
   X/Z/U* are resolved by the attribute's Type in the IOD of the SOP Class
   (:mod:`dicomnode.dicom.deid.iod`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from importlib import resources

__all__ = [
    "FORCED_REMOVALS",
    "TABLE_EDITION",
    "Action",
    "CompiledTable",
    "compile_table",
    "load_rows",
]

TABLE_EDITION = "2024b"
"""Edition of Table E.1-1 in ``data/`` (recorded in De-identification Method)."""


class Action(IntEnum):
    """What to do with one attribute, after option columns are applied."""

    KEEP = 0
    """K: keep (sequences are still cleaned recursively)."""
    REMOVE = 1
    """X."""
    EMPTY = 2
    """Z: zero length (the engine may put a pseudonym where that serves re-use)."""
    DUMMY = 3
    """D: a non-empty value consistent with the VR."""
    UID = 4
    """U: consistent keyed replacement."""
    CLEAN = 5
    """C: clean (descriptor words, dates shifted, AE titles pseudonymised)."""
    X_Z = 6
    X_D = 7
    X_Z_D = 8
    Z_D = 9
    X_Z_U = 10
    """X/Z/U*: a reference sequence; kept and cleaned when Type 1 or 2."""
    SHIFT = 11
    """C of Retain Longitudinal Temporal Information with Modified Dates: DA and DT
    shifted, anything else of the row (TM, Timezone Offset From UTC) kept."""


_BASIC = {
    "X": Action.REMOVE,
    "Z": Action.EMPTY,
    "D": Action.DUMMY,
    "U": Action.UID,
    "K": Action.KEEP,
    "C": Action.CLEAN,
    "X/Z": Action.X_Z,
    "X/D": Action.X_D,
    "X/Z/D": Action.X_Z_D,
    "Z/D": Action.Z_D,
    "X/Z/U*": Action.X_Z_U,
}

# Most protective first; used when two enabled option columns disagree.
_PROTECTION = {"X": 0, "Z": 1, "D": 2, "C": 3, "K": 4}

# Option column of the JSON -> field of DeidOptions that enables it.
OPTION_COLUMNS: dict[str, str] = {
    "rtnLongFullDatesOpt": "retain_longitudinal_full_dates",
    "rtnLongModifDatesOpt": "retain_longitudinal_modified_dates",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnUIDsOpt": "retain_uids",
    "cleanDescOpt": "clean_descriptors",
    # Not implemented, so never enabled: Clean Graphics (113103), Clean Structured
    # Content (113104); Retain Safe Private (113111) is the private allow-list.
}

FORCED_REMOVALS: frozenset[int] = frozenset(
    {
        0x00400275,  # Request Attributes Sequence: X, even where Clean Descriptors says C (5.2.5)
        0x00700001,  # Graphic Annotation Sequence: D; removed, Clean Graphics not claimed (5.1)
        0x04000500,  # Encrypted Attributes Sequence of the source (5.2.5; not in Table E.1-1)
        0x04000550,  # Modified Attributes Sequence
        0x04000561,  # Original Attributes Sequence (fo-dicom#610)
        0x4FFE0001,  # MAC Parameters Sequence (E.1.1: signatures removed)
        0xFFFAFFFA,  # Digital Signatures Sequence
        0x04000404,  # MAC
        0x00880200,  # Icon Image Sequence (Note 11: removed when it cannot be cleaned)
        0x00101100,  # Referenced Patient Photo Sequence
        0xFFFCFFFC,  # Data Set Trailing Padding
    }
)
"""Tags removed whatever the options say (deid.md 5.1 and 5.2 step 5)."""


def load_rows() -> list[dict[str, str]]:
    """The rows of Table E.1-1 as stored in ``data/`` (JSON objects, see module docstring)."""
    text = (
        resources.files(__package__)
        .joinpath("data", "ps3.15-annex-e-table.json")
        .read_text("utf-8")
    )
    rows: list[dict[str, str]] = json.loads(text)
    return rows


@dataclass(frozen=True)
class CompiledTable:
    """Table E.1-1 resolved for one set of options.

    Attributes
    ----------
    exact
        Standard tag -> action.
    curves, overlays
        Action for every element of the repeating groups 50xx (curves) and 60xx
        (overlays), from the rows ``(50XX,XXXX)`` and ``(60XX,3000)``/``(60XX,4000)``;
        the engine applies it to the whole group since an overlay without its data
        is meaningless and its other elements (description, label) are free text.
    private
        Action for the row "(gggg,eeee) where gggg is odd" (X, or C = allow-list
        when Retain Safe Private is on).
    """

    exact: dict[int, Action]
    curves: Action
    overlays: Action
    private: Action


def _resolve(row: dict[str, str], enabled: frozenset[str]) -> Action:
    codes = [
        (row[col], col) for col, field in OPTION_COLUMNS.items() if field in enabled and col in row
    ]
    if not codes:
        return _BASIC[row["basicProfile"]]
    code, column = min(codes, key=lambda c: _PROTECTION[c[0]])
    if code == "C" and column == "rtnLongModifDatesOpt":
        return Action.SHIFT
    return _BASIC[code]


@lru_cache(maxsize=16)
def compile_table(enabled: frozenset[str], retain_safe_private: bool = False) -> CompiledTable:
    """Compile Table E.1-1 for the options whose :data:`OPTION_COLUMNS` fields are ``enabled``.

    Parameters
    ----------
    enabled
        Names of the enabled :class:`~dicomnode.dicom.deid.options.DeidOptions` fields.
    retain_safe_private
        Retain Safe Private (113111): the private row becomes C (allow-list).

    Raises
    ------
    ValueError
        The table data has a row whose tag or action this code does not understand.
    """
    exact: dict[int, Action] = {}
    curves = overlays = private = Action.REMOVE
    for row in load_rows():
        ident = row["id"]
        if row["basicProfile"] not in _BASIC:
            raise ValueError(
                f"Table E.1-1 row {row['tag']}: unknown action {row['basicProfile']!r}"
            )
        action = _resolve(row, enabled)
        if re.fullmatch(r"[0-9a-fA-F]{8}", ident):
            exact[int(ident, 16)] = action
        elif ident.startswith("50xx"):
            curves = action
        elif ident.startswith("60xx"):
            overlays = action
        elif ident.startswith("gggg"):
            private = Action.CLEAN if retain_safe_private else Action.REMOVE
        else:
            raise ValueError(f"Table E.1-1 row {row['tag']}: tag pattern not understood")
    for tag in FORCED_REMOVALS:
        exact[tag] = Action.REMOVE
    return CompiledTable(exact=exact, curves=curves, overlays=overlays, private=private)

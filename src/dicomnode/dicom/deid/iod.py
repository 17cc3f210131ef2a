"""Attribute Types (1, 2, 3) per IOD, to resolve X/Z, X/D, X/Z/D, Z/D and X/Z/U*.

PS3.15 E.1.1 resolves these codes by the Type of the attribute in the IOD: "Z unless
D is required to maintain IOD conformance (Type 2 versus Type 1)" and so on. The
types come from ``data/iod_types.json``, generated (``tests/deid/generate_data.py``)
from the PS3.3 module tables bundled with highdicom. For a nested attribute the
type is the strongest one it has under the same parent sequence in any module of
the IOD; 1C and 2C count as 1 and 2, because an attribute present in the input
usually meets its condition.

What this does not guarantee: the types are per IOD, not per module instance, so
an attribute of a macro used in several places gets the strongest of its types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["IODTypes", "UNKNOWN", "iod_types_for"]

UNKNOWN = 0
"""Type of an attribute whose IOD (or parent sequence) is not in the data."""
TYPE_1, TYPE_2, TYPE_3 = 1, 2, 3
NOT_IN_IOD = 4
"""The IOD is known and does not have this attribute at this level."""


@lru_cache(maxsize=1)
def _data() -> dict[str, dict]:  # type: ignore[type-arg]
    text = resources.files(__package__).joinpath("data", "iod_types.json").read_text("utf-8")
    data: dict[str, dict] = json.loads(text)  # type: ignore[type-arg]
    return data


@dataclass(frozen=True)
class IODTypes:
    """Types of the attributes of one IOD.

    Attributes
    ----------
    iod
        The IOD key (e.g. ``"ct-image"``), or ``""`` when the SOP Class is unknown.
    top
        Top-level tag -> type (1, 2 or 3).
    nested
        (parent sequence tag, tag) -> type (1 or 2); Type 3 nested attributes are
        not listed.
    """

    iod: str
    top: dict[int, int]
    nested: dict[tuple[int, int], int]

    def type_of(self, tag: int, parent: int) -> int:
        """The Type of ``tag`` inside a sequence ``parent`` (0 = top level).

        Returns
        -------
        int
            1, 2 or 3; :data:`NOT_IN_IOD` for a top-level attribute the IOD does not
            have; :data:`UNKNOWN` when the IOD is unknown. Nested attributes that are
            not Type 1 or 2 give 3.
        """
        if not self.iod:
            return UNKNOWN
        if parent == 0:
            return self.top.get(tag, NOT_IN_IOD)
        return self.nested.get((parent, tag), TYPE_3)


@lru_cache(maxsize=256)
def iod_types_for(sop_class_uid: str) -> IODTypes:
    """The attribute types of the IOD of ``sop_class_uid`` (empty when unknown)."""
    data = _data()
    iod = data["sop_classes"].get(sop_class_uid, "")
    if not iod or iod not in data["iods"]:
        return IODTypes("", {}, {})
    top: dict[int, int] = {}
    nested: dict[tuple[int, int], int] = {}
    for module in data["iods"][iod]:
        entry = data["modules"].get(module)
        if entry is None:
            continue
        for key, t in entry["top"].items():
            tag = int(key, 16)
            top[tag] = min(top.get(tag, 3), int(t))
        for key, t in entry["nested"].items():
            p, _, c = key.partition("/")
            k = (int(p, 16), int(c, 16))
            nested[k] = min(nested.get(k, 3), int(t))
    return IODTypes(iod, top, nested)

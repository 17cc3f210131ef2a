"""Label names → coded concepts (SNOMED CT category, type, colour) for imported models.

nnU-Net's ``dataset.json`` and a MONAI bundle's ``channel_def`` name labels in plain
words ("liver", "tumor"); a DICOM SEG needs a coded category and type per segment
(PS3.3 C.8.20.2). The importer codes each label from, in order: the operator's mapping
file, then the defaults below (common anatomy and lesion names; the code values are taken
from pydicom's copy of the DICOM code dictionary, PS3.16, so they cannot be mistyped
here). A label left uncoded makes the import fail, naming it, unless the operator asks
for the generic code (category and type "Anatomical Structure", SCT 91723000), which is
then recorded in the package's provenance.

The mapping file is JSON or TOML, one entry per label name (case and ``_``/``-`` ignored)::

    [liver]
    category = { scheme = "SCT", value = "91723000", meaning = "Anatomical Structure" }
    type = { scheme = "SCT", value = "10200004", meaning = "Liver" }
    color = [221, 130, 101]
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicomnode.errors import ImportRefused

__all__ = ["DEFAULT_NAMES", "GENERIC", "code_labels", "load_mapping", "normalise_name"]

ANATOMY = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
ALTERED = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}
TISSUE = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}
GENERIC = {"category": ANATOMY, "type": ANATOMY}

# name → (pydicom codedict keyword, category); type codes come from pydicom at run time
DEFAULT_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    **{n: (k, ANATOMY) for n, k in {
        "liver": "Liver", "spleen": "Spleen", "kidney": "Kidney", "pancreas": "Pancreas",
        "gallbladder": "Gallbladder", "stomach": "Stomach", "aorta": "Aorta",
        "inferior vena cava": "InferiorVenaCava", "ivc": "InferiorVenaCava",
        "portal vein": "PortalVein", "lung": "Lung", "heart": "Heart",
        "prostate": "Prostate", "brain": "Brain", "esophagus": "Esophagus",
        "duodenum": "Duodenum", "colon": "Colon", "small intestine": "SmallIntestine",
        "small bowel": "SmallIntestine", "adrenal gland": "AdrenalGland",
        "trachea": "Trachea", "spinal cord": "SpinalCord", "rectum": "Rectum",
        "uterus": "Uterus", "vertebra": "Vertebra", "rib": "Rib", "femur": "Femur",
        "hippocampus": "Hippocampus", "bone": "Bone", "muscle": "Muscle",
        "sacrum": "Sacrum", "skull": "Skull", "sternum": "Sternum", "clavicle": "Clavicle",
        "scapula": "Scapula", "humerus": "Humerus",
    }.items()},
    **{n: (k, ALTERED) for n, k in {
        "tumor": "Tumor", "tumour": "Tumor", "neoplasm": "Neoplasm", "lesion": "Lesion",
        "mass": "Mass", "nodule": "Nodule", "cyst": "Cyst", "edema": "Edema",
        "oedema": "Edema", "necrosis": "Necrosis",
    }.items()},
    "fat": ("Fat", TISSUE),
}

# a distinct, stable colour per label number when the mapping gives none
_PALETTE = [(221, 130, 101), (157, 108, 162), (128, 174, 128), (241, 214, 145),
            (216, 101, 79), (183, 156, 220), (111, 184, 210), (250, 250, 225),
            (144, 238, 144), (255, 192, 203), (0, 151, 206), (230, 220, 70)]


def normalise_name(name: str) -> str:
    """Case, ``_``/``-`` and repeated spaces do not matter: ``Inferior_Vena-Cava`` →
    ``inferior vena cava``."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip().lower()


def _default(name: str) -> dict[str, Any] | None:
    from pydicom.sr.codedict import codes  # the DICOM dictionary, not our own typing

    entry = DEFAULT_NAMES.get(normalise_name(name))
    if entry is None:
        return None
    code = getattr(codes.SCT, entry[0])
    return {"category": dict(entry[1]),
            "type": {"scheme": "SCT", "value": str(code.value), "meaning": str(code.meaning)}}


def _code(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not all(
            isinstance(raw.get(k), str) and raw.get(k) for k in ("scheme", "value", "meaning")):
        raise ImportRefused(f"{where}: expected a code with scheme, value and meaning")
    return {"scheme": raw["scheme"], "value": raw["value"], "meaning": raw["meaning"]}


def load_mapping(path: Path | str) -> dict[str, dict[str, Any]]:
    """Read a mapping file (``.json`` or ``.toml``): normalised name → category, type and
    optional colour.

    Raises
    ------
    ImportRefused
        The file cannot be read or an entry is not a valid code.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path.name}: not a label code mapping ({exc})") from None
    if not isinstance(raw, Mapping):
        raise ImportRefused(f"{path.name}: expected a table of label names")
    out = {}
    for name, entry in raw.items():
        where = f"{path.name}: {name}"
        if not isinstance(entry, Mapping):
            raise ImportRefused(f"{where}: expected category, type and color")
        item: dict[str, Any] = {"category": _code(entry.get("category"), f"{where}.category"),
                                "type": _code(entry.get("type"), f"{where}.type")}
        color = entry.get("color")
        if color is not None:
            if (not isinstance(color, list) or len(color) != 3
                    or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
                raise ImportRefused(f"{where}.color: expected three integers 0-255")
            item["color"] = list(color)
        out[normalise_name(str(name))] = item
    return out


def code_labels(labels: Sequence[tuple[int, str]], *,
                mapping: Mapping[str, Mapping[str, Any]] | None = None,
                generic: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Format 2 ``[[outputs.labels]]`` tables for ``(number, name)`` pairs, and the names
    that got the generic code.

    Raises
    ------
    ImportRefused
        A label has no code in the mapping or the defaults and ``generic`` is false.
    """
    mapping = mapping or {}
    out, generic_names, missing = [], [], []
    for number, name in labels:
        entry = mapping.get(normalise_name(name)) or _default(name)
        if entry is None:
            if not generic:
                missing.append(name)
                continue
            entry = GENERIC
            generic_names.append(name)
        color = entry.get("color") or list(_PALETTE[(number - 1) % len(_PALETTE)])
        out.append({"number": int(number), "name": _safe_name(name),
                    "category": dict(entry["category"]), "type": dict(entry["type"]),
                    "color": list(color)})
    if missing:
        raise ImportRefused(
            "labels without a code: " + ", ".join(repr(m) for m in missing)
            + "; give them SNOMED CT codes in a mapping file (--codes FILE) or accept the "
            "generic 'Anatomical Structure' code (--generic-codes)")
    return out, generic_names


def _safe_name(name: str) -> str:
    # segment labels are DICOM LO (64 chars, no backslash or control characters)
    cleaned = re.sub(r"[\\\x00-\x1f]", " ", name).strip()
    return cleaned[:64] or "label"

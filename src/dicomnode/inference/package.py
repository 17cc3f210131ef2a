"""Model packages for serving: the format lives in :mod:`dicomnode.modelpkg.format1`.

The format (``model.toml`` + ``model.onnx``, checks against the graph) is shared
with :mod:`dicomnode.training`, which may not import this package; this module
re-exports it for callers of the inference side and adds the bundled demo model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dicomnode.modelpkg.format1 import (
    Code,
    InputContract,
    Label,
    ModelPackage,
    Normalization,
    OutputContract,
    load_model_package,
    read_model_package,
)

__all__ = [
    "DEMO_3D_MODEL",
    "DEMO_CXR_MODEL",
    "DEMO_MODEL",
    "Code",
    "InputContract",
    "Label",
    "ModelPackage",
    "Normalization",
    "OutputContract",
    "demo_model_path",
    "demo_model_paths",
    "load_model_package",
    "read_model_package",
]

DEMO_MODEL = "demo-lesion"
DEMO_CXR_MODEL = "demo-cxr-nodule"
"""The bundled radiograph demo: a nodule classifier on synthetic chest films (rebuild it
with ``python -m dicomnode.training.cxr_demo --out DIR``)."""
DEMO_3D_MODEL = "demo-lesion-3d"
"""The bundled 3D demo: a 3D U-Net for phantom lesions run by sliding window, format 2
(rebuild it with ``python -m dicomnode.training.demo3d --out DIR``). Registered and
active, but no default routing rule runs it: on a CT it would answer the same question as
the 2D demo with a second SEG; route CT to it in ``[[routing.rules]]`` instead of (or
beside) ``demo-lesion``."""


def demo_model_path() -> Path:
    """The bundled demo lesion model's package directory (package data).

    Rebuild it with ``python -m dicomnode.training.demo --out DIR``.
    """
    # The wheel is never zipped (hatchling installs files), so the resource is a real path.
    return Path(str(resources.files("dicomnode.inference") / "models" / DEMO_MODEL))


def demo_model_paths() -> list[Path]:
    """Every bundled demo package: the 2D and 3D lesion segmenters and the radiograph
    classifier."""
    base = Path(str(resources.files("dicomnode.inference") / "models"))
    return [demo_model_path(), base / DEMO_CXR_MODEL, base / DEMO_3D_MODEL]

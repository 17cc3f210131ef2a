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
    "DEMO_MODEL",
    "Code",
    "InputContract",
    "Label",
    "ModelPackage",
    "Normalization",
    "OutputContract",
    "demo_model_path",
    "load_model_package",
    "read_model_package",
]

DEMO_MODEL = "demo-lesion"


def demo_model_path() -> Path:
    """The bundled demo lesion model's package directory (package data).

    Rebuild it with ``python -m dicomnode.training.demo --out DIR``.
    """
    # The wheel is never zipped (hatchling installs files), so the resource is a real path.
    return Path(str(resources.files("dicomnode.inference") / "models" / DEMO_MODEL))

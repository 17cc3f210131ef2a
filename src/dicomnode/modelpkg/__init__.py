"""The model package: its format, its checks against the graph, and its semantics.

A model package is what a site puts into service: the network(s) as ONNX plus
``model.toml``, which names every convention the network was trained with (input
axes, spacing, resampling, normalisation, tiling, blending, outputs, labels and
their codes). This package reads and writes packages and holds the pure numpy
semantics of the contract, shared by :mod:`dicomnode.inference` (which runs
packages) and :mod:`dicomnode.training` (which makes them); the two may not import
each other. :mod:`dicomnode.storage.registry` keeps registered versions.

Format 1 (:mod:`.format1`): 2D slice networks. Format 2 (:mod:`.format2`): volumes
and images, patch networks run by sliding window, several members (folds).
"""

from dicomnode.modelpkg.format1 import (
    FORMAT_VERSION,
    Code,
    InputContract,
    Label,
    ModelPackage,
    Normalization,
    OutputContract,
    load_model_package,
    read_model_package,
    sha256_of,
)

__all__ = [
    "FORMAT_VERSION",
    "Code",
    "InputContract",
    "Label",
    "ModelPackage",
    "Normalization",
    "OutputContract",
    "load_model_package",
    "read_model_package",
    "sha256_of",
]

"""Run model packages on volumes with ONNX Runtime (never imports torch).

::

    model = OnnxModel.load(demo_model_path(), RuntimeOptions(providers="auto"))
    out = model.run(hu_volume, (dz, dy, dx))   # out.mask, out.findings
"""

from dicomnode.inference.package import (
    DEMO_MODEL,
    ModelPackage,
    demo_model_path,
    load_model_package,
)
from dicomnode.inference.postprocess import Finding
from dicomnode.inference.runtime import InferenceOutput, ModelSessions, OnnxModel, RuntimeOptions

__all__ = [
    "DEMO_MODEL",
    "Finding",
    "InferenceOutput",
    "ModelPackage",
    "ModelSessions",
    "OnnxModel",
    "RuntimeOptions",
    "demo_model_path",
    "load_model_package",
]

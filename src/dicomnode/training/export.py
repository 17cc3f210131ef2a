"""A trained network → ONNX → a checked model package directory.

Export uses the TorchScript exporter (``dynamo=False``, opset 17) with a dynamic
batch, height and width; the torch.export-based exporter needs onnxscript,
which the train extra does not install. The export is accepted only if ONNX
Runtime (or, without it, ``onnx.reference``) reproduces the PyTorch logits to
within ``tolerance`` on a real batch and on a second batch of another shape.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.errors import ModelError
from dicomnode.modelpkg.format1 import (
    InputContract,
    Label,
    ModelPackage,
    OutputContract,
    load_model_package,
)
from dicomnode.modelpkg.graph import cpu_session
from dicomnode.modelpkg.write import write_model_package
from dicomnode.training.unet import UNet2d

__all__ = ["export_onnx", "export_package", "max_abs_difference"]

OPSET = 17
OUTPUT_NAME = "logits"


def export_onnx(
    model: torch.nn.Module,
    *,
    input_name: str = "image",
    output_name: str = OUTPUT_NAME,
    size: tuple[int, int] = (64, 64),
) -> bytes:
    """Serialise ``model`` (eval mode, CPU) to ONNX bytes, NCHW with C = 1.

    Batch, height and width are dynamic; ``size`` is only the tracing shape.
    """
    model = model.cpu().eval()
    dummy = torch.zeros(2, 1, *size)
    dyn = {0: "batch", 2: "height", 3: "width"}
    return _export(model, dummy, input_name, output_name, {input_name: dyn, output_name: dyn})


def export_static(model: Any, input_shape: tuple[int, ...], *, input_name: str = "input",
                  output_name: str = "logits") -> bytes:
    """Serialise ``model`` (eval mode, CPU) to ONNX bytes with every dimension static.

    Format 2 packages feed exactly ``[batch, channels, *patch]``: each new input shape
    costs ONNX Runtime a kernel search on GPUs (microsoft/onnxruntime#6978).
    """
    model = model.cpu().eval()
    return _export(model, torch.zeros(*input_shape), input_name, output_name, None)


def _export(model: Any, dummy: Any, input_name: str, output_name: str,
            dynamic_axes: dict[str, dict[int, str]] | None) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.9+ deprecates the TorchScript exporter (two DeprecationWarnings per
        # call). It is the one that works without onnxscript; ignore exactly those.
        warnings.filterwarnings(
            "ignore",
            message="You are using the legacy TorchScript-based ONNX export",
            category=DeprecationWarning,
        )
        # tracing warns on shape checks in norm layers; with static shapes they hold
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # instance norm without running statistics normalises per sample in eval mode too
        warnings.filterwarnings("ignore", message="ONNX export mode is set to TrainingMode.EVAL",
                                category=UserWarning)
        warnings.filterwarnings(
            "ignore",
            message="The feature will be removed",
            category=DeprecationWarning,
            module=r"torch\.onnx",
        )
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            opset_version=OPSET,
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return buf.getvalue()


def _run_onnx(model_bytes: bytes, input_name: str, x: np.ndarray) -> np.ndarray:
    sess = cpu_session(model_bytes)
    if sess is not None:
        return np.asarray(sess.run(None, {input_name: x})[0])
    from onnx.reference import ReferenceEvaluator  # slow, but needs only the onnx package

    return np.asarray(ReferenceEvaluator(model_bytes).run(None, {input_name: x})[0])


def max_abs_difference(
    model: torch.nn.Module, model_bytes: bytes, x: np.ndarray, input_name: str = "image"
) -> float:
    """max |ONNX - PyTorch| over the logits for the batch ``x`` (N, 1, H, W)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with torch.inference_mode():
        ref = model.cpu().eval()(torch.from_numpy(x)).numpy()
    got = _run_onnx(model_bytes, input_name, x)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max())


def export_package(
    model: torch.nn.Module,
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    contract: InputContract,
    labels: Sequence[Label],
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
    sample: np.ndarray | None = None,
    tolerance: float = 1e-4,
    min_component_mm3: float = 0.0,
) -> ModelPackage:
    """Export ``model`` and write a complete, checked model package directory.

    Parameters
    ----------
    model
        A network with one sigmoid logit channel per label (e.g. :class:`UNet2d`).
    out_dir
        The package directory (created; model.onnx and model.toml replaced).
    contract
        The input contract the model was trained with.
    labels
        Output labels in channel order, numbered 1, 2, ...
    sample
        A prepared (N, 1, H, W) batch for the parity check; None = random values in [0, 1].
    tolerance
        Largest accepted |Δ| between ONNX and PyTorch logits.
    min_component_mm3
        Written to ``outputs.min_component_mm3``.

    Returns
    -------
    ModelPackage
        As :func:`~dicomnode.modelpkg.format1.load_model_package` reads it back
        (graph checked).

    Raises
    ------
    ModelError
        The exported graph differs from PyTorch by more than ``tolerance``.
    ModelLoadError
        The written package does not load (a bug).
    """
    multiple = model.size_multiple if isinstance(model, UNet2d) else 1
    rng = np.random.default_rng(0)
    if sample is None:
        h = w = max(64, multiple)
        sample = rng.random((2, 1, h, w), dtype=np.float32)
    # A second batch of another size and count proves the dynamic axes.
    n, _, h, w = sample.shape
    other = rng.random((n + 1, 1, h + multiple, w + 2 * multiple), dtype=np.float32)
    model_bytes = export_onnx(model, input_name=contract.name, size=(h, w))
    diffs = [max_abs_difference(model, model_bytes, x, contract.name) for x in (sample, other)]
    if not max(diffs) < tolerance:
        raise ModelError(
            f"{name} {version}: ONNX export differs from PyTorch by {max(diffs):.3g} "
            f"(tolerance {tolerance:g})"
        )
    outputs = OutputContract(
        OUTPUT_NAME, "logits", "sigmoid", tuple(labels), float(min_component_mm3)
    )
    prov = {
        **dict(provenance or {}),
        "onnx_opset": OPSET,
        "parity_max_abs_diff": float(f"{max(diffs):.3g}"),
    }
    write_model_package(
        out_dir,
        model_bytes,
        name=name,
        version=version,
        task="segmentation",
        input=contract,
        outputs=outputs,
        description=description,
        provenance=prov,
    )
    return load_model_package(out_dir)

"""The ONNX graph of a model package: its inputs and outputs, and their check against
``model.toml`` (:func:`check_against_graph`).

Reading uses onnxruntime when installed (the serving extras), else the ``onnx`` package
(the train extra); neither is imported at module import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.errors import ModelError, ModelLoadError
from dicomnode.modelpkg.format1 import ModelPackage
from dicomnode.modelpkg.format2 import ModelPackage2

__all__ = [
    "GraphSignature",
    "TensorInfo",
    "check_against_graph",
    "check_format2_against_graph",
    "cpu_session",
    "read_graph_signature",
]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, shape (int = static, str/None = dynamic), element type."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str
    """numpy-style name: ``float32``, ``int64``, ..."""


@dataclass(frozen=True)
class GraphSignature:
    """The inputs and outputs of an ONNX graph (initializers excluded)."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @classmethod
    def from_session(cls, session: Any) -> GraphSignature:
        """From an ``onnxruntime.InferenceSession``."""

        def info(arg: Any) -> TensorInfo:
            dtype = str(arg.type).removeprefix("tensor(").removesuffix(")")
            dtype = {"float": "float32", "double": "float64", "float16": "float16"}.get(
                dtype, dtype
            )
            return TensorInfo(arg.name, tuple(arg.shape or ()), dtype)

        return cls(
            tuple(info(a) for a in session.get_inputs()),
            tuple(info(a) for a in session.get_outputs()),
        )


def cpu_session(model: bytes) -> Any | None:
    """A quiet onnxruntime CPU session over ``model``; None when onnxruntime is not installed.

    Raises whatever onnxruntime raises for bytes it cannot load.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def read_graph_signature(model: bytes | Path) -> GraphSignature:
    """Read the graph's inputs and outputs with onnxruntime, or with ``onnx`` if that is missing.

    Raises
    ------
    ModelLoadError
        The bytes are not a loadable ONNX model.
    ModelError
        Neither onnxruntime nor onnx is installed.
    """
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    try:
        session = cpu_session(data)
    except Exception as exc:  # ORT raises its own untyped exceptions here
        raise ModelLoadError(f"model.onnx: onnxruntime cannot load it: {exc}") from exc
    if session is not None:
        return GraphSignature.from_session(session)
    try:
        import onnx
    except ImportError as exc:
        raise ModelError(
            "neither onnxruntime nor onnx is installed; install dicomnode[cpu]"
        ) from exc
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(f"model.onnx: not an ONNX model: {exc}") from exc
    inits = {i.name for i in proto.graph.initializer}

    def info(vi: Any) -> TensorInfo:
        tt = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        return TensorInfo(vi.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))

    return GraphSignature(
        tuple(info(v) for v in proto.graph.input if v.name not in inits),
        tuple(info(v) for v in proto.graph.output),
    )


def check_against_graph(pkg: ModelPackage, graph: GraphSignature) -> None:
    """Check that ``model.toml`` agrees with the graph: names, types, ranks, static dims.

    Dynamic dimensions are accepted wherever a static one would be checked,
    except the output's channel dimension, which must be static so that the
    label count can be checked.

    Raises
    ------
    ModelLoadError
        Naming the model.toml field and the graph's actual value, e.g.
        ``model.toml: outputs.labels: 2 labels declared, graph output "logits" has 3 channels``.
    """

    def fail(key: str, msg: str) -> ModelLoadError:
        return ModelLoadError(f"model.toml: {key}: {msg} (package: {pkg.source})")

    inp, out = pkg.input, pkg.outputs
    if len(graph.inputs) != 1:
        raise fail(
            "input.name",
            f"the graph must have exactly one input, it has "
            f"{', '.join(repr(i.name) for i in graph.inputs) or 'none'}",
        )
    g_in = graph.inputs[0]
    if g_in.name != inp.name:
        raise fail("input.name", f'declared "{inp.name}", the graph input is "{g_in.name}"')
    if g_in.dtype != "float32":
        raise fail("input.name", f'graph input "{g_in.name}" is {g_in.dtype}, expected float32')
    if len(g_in.shape) != len(inp.layout):
        raise fail(
            "input.layout",
            f"{inp.layout} needs rank {len(inp.layout)}, graph input "
            f'"{g_in.name}" has rank {len(g_in.shape)} {_shape(g_in.shape)}',
        )
    n, c, h, w = g_in.shape
    if isinstance(n, int) and n != inp.batch_size:
        raise fail(
            "input.batch_size",
            f'declared {inp.batch_size}, graph input "{g_in.name}" has a static batch of {n}',
        )
    if isinstance(c, int) and c != 1:
        raise fail("input.layout", f'NCHW with C = 1, graph input "{g_in.name}" has {c} channels')
    if inp.size is None:
        if isinstance(h, int) or isinstance(w, int):
            raise fail(
                "input.size",
                f'"any" declared, graph input "{g_in.name}" has static H x W '
                f"{_shape(g_in.shape)}; declare size = [H, W]",
            )
    else:
        for axis, dim, want in (("H", h, inp.size[0]), ("W", w, inp.size[1])):
            if isinstance(dim, int) and dim != want:
                raise fail(
                    "input.size",
                    f'declared {list(inp.size)}, graph input "{g_in.name}" has '
                    f"{axis} = {dim} {_shape(g_in.shape)}",
                )
    names = [o.name for o in graph.outputs]
    if out.name not in names:
        raise fail(
            "outputs.name",
            f'declared "{out.name}", the graph outputs are {", ".join(repr(x) for x in names)}',
        )
    g_out = graph.outputs[names.index(out.name)]
    if g_out.dtype != "float32":
        raise fail(
            "outputs.name", f'graph output "{g_out.name}" is {g_out.dtype}, expected float32'
        )
    rank = 4 if pkg.task == "segmentation" else 2
    if len(g_out.shape) != rank:
        raise fail(
            "task",
            f'{pkg.task} needs an output of rank {rank}, graph output "{g_out.name}" '
            f"has rank {len(g_out.shape)} {_shape(g_out.shape)}",
        )
    channels = g_out.shape[1]
    if not isinstance(channels, int):
        raise fail(
            "outputs.labels",
            f'graph output "{g_out.name}" has a dynamic channel dimension '
            f"({channels}); it must be static",
        )
    if channels != out.channels:
        extra = " plus background (softmax)" if out.activation == "softmax" else ""
        raise fail(
            "outputs.labels",
            f"{len(out.labels)} labels{extra} declared, graph output "
            f'"{g_out.name}" has {channels} channels',
        )
    if isinstance(g_out.shape[0], int) and g_out.shape[0] != inp.batch_size:
        raise fail(
            "input.batch_size",
            f'declared {inp.batch_size}, graph output "{g_out.name}" has a '
            f"static batch of {g_out.shape[0]}",
        )


def _shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_format2_against_graph(pkg: ModelPackage2, index: int, graph: GraphSignature) -> None:
    """Check member ``index`` of a format 2 package against its graph.

    The graph must take exactly one float32 input ``[batch, channels, *patch]`` and give
    an output ``[batch, output channels, *patch]`` (sliding window) or ``[batch, output
    channels]`` (classification), all dimensions static: each new shape costs ONNX
    Runtime a kernel search on GPUs (microsoft/onnxruntime#6978), so the runtime feeds
    exactly this shape, padding the last batch.

    Raises
    ------
    ModelLoadError
        Naming the member and what disagrees (actual vs expected).
    """
    member = pkg.members[index].file
    where = f"(package: {pkg.source})"
    inp = pkg.input
    spec = pkg.inference
    expected_in = (spec.batch, inp.channels, *spec.patch)
    inputs = {t.name: t for t in graph.inputs}
    if inp.name not in inputs or len(graph.inputs) != 1:
        raise ModelLoadError(
            f"{member}: expected one input named {inp.name!r}, the graph has "
            f"{sorted(inputs)} {where}"
        )
    t = inputs[inp.name]
    if t.dtype != "float32":
        raise ModelLoadError(f"{member}: input {t.name} is {t.dtype}, expected float32 {where}")
    if tuple(t.shape) != expected_in:
        raise ModelLoadError(
            f"{member}: input {t.name} has shape [{_shape(t.shape)}], expected static "
            f"[{_shape(expected_in)}] (inference.batch, input.channels, inference.patch) {where}"
        )
    outputs = {o.name: o for o in graph.outputs}
    out = pkg.outputs
    if out.name not in outputs:
        raise ModelLoadError(
            f"{member}: no output named {out.name!r} (graph outputs: {sorted(outputs)}; an "
            f"nnU-Net network exported with deep supervision has several) {where}"
        )
    o = outputs[out.name]
    if o.dtype not in ("float32", "float16"):
        raise ModelLoadError(f"{member}: output {o.name} is {o.dtype}, expected float {where}")
    expected_out: tuple[int, ...] = (
        (spec.batch, out.channels) if pkg.task == "classification"
        else (spec.batch, out.channels, *spec.patch)
    )
    if tuple(o.shape) != expected_out:
        raise ModelLoadError(
            f"{member}: output {o.name} has shape [{_shape(o.shape)}], expected "
            f"[{_shape(expected_out)}] (batch, channels of outputs.labels/regions, patch) "
            f"{where}"
        )
    explain = getattr(pkg, "explain", None)
    if explain is not None and explain.output is not None and explain.output not in outputs:
        raise ModelLoadError(
            f"{member}: no output named {explain.output!r} for [explain] (graph outputs: "
            f"{sorted(outputs)})")

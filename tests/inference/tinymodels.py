"""Tiny hand-made ONNX graphs and contracts for the inference tests.

The graphs are built with ``onnx.helper`` (no torch): a 1x1 convolution gives a
logit ``weight * x + bias`` per channel, so a window-normalised CT voxel is
"found" exactly where its HU passes a known threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dicomnode.modelpkg.format1 import (
    Code,
    InputContract,
    Label,
    Normalization,
)

# x = (HU + 160) / 400 under window 40/400; logit 0 at x = 0.6, i.e. HU 80.
WEIGHT, BIAS = 20.0, -12.0


def build_graph(
    *,
    in_name: str = "image",
    out_name: str = "logits",
    in_shape: list[Any] | None = None,
    channels: int = 1,
    classification: bool = False,
    biases: list[float] | None = None,
) -> bytes:
    """ONNX bytes: Conv1x1(1 -> channels) [+ GlobalAveragePool + Flatten]."""
    in_shape = in_shape or ["N", 1, "H", "W"]
    biases = biases or [BIAS - 2.0 * c for c in range(channels)]
    nodes, inits = [], []
    x = in_name
    if len(in_shape) == 3:  # rank-3 input: add the channel axis inside the graph
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        nodes.append(helper.make_node("Unsqueeze", [in_name, "axes"], ["x4"]))
        x = "x4"
    inits.append(numpy_helper.from_array(np.full((channels, 1, 1, 1), WEIGHT, np.float32), "w"))
    inits.append(numpy_helper.from_array(np.array(biases, np.float32), "b"))
    conv_out = "conv" if classification else out_name
    nodes.append(helper.make_node("Conv", [x, "w", "b"], [conv_out]))
    if classification:
        nodes.append(helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]))
        nodes.append(helper.make_node("Flatten", ["pooled"], [out_name], axis=1))
        out_shape: list[Any] = ["N", channels]
    else:
        out_shape = ["N", channels, *in_shape[-2:]]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_label(number: int, name: str = "") -> Label:
    return Label(
        number,
        name or f"Label {number}",
        Code("SCT", "49755003", "Morphologically abnormal structure"),
        Code("SCT", "108369006", "Neoplasm"),
        (255, 0, 0),
        0.5,
    )


def make_contract(**overrides: Any) -> InputContract:
    fields: dict[str, Any] = {
        "name": "image",
        "modality": "CT",
        "orientation": "axial",
        "layout": "NCHW",
        "spacing_mm": None,
        "size": None,
        "size_multiple": 1,
        "batch_size": 4,
        "normalization": Normalization("window", center=40.0, width=400.0),
        "pad_value": -1000.0,
    }
    fields.update(overrides)
    return InputContract(**fields)

"""Fixtures of the inference tests: model packages built from tiny ONNX graphs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tinymodels import build_graph, make_contract, make_label

from dicomnode.modelpkg.format1 import OutputContract
from dicomnode.modelpkg.write import write_model_package

PackageFactory = Callable[..., Path]


@pytest.fixture
def make_package(tmp_path: Path) -> PackageFactory:
    """Write a package: ``make_package(graph=..., labels=..., task=..., **contract fields)``."""
    counter = iter(range(1000))

    def factory(
        *,
        graph: bytes | None = None,
        n_labels: int = 1,
        task: str = "segmentation",
        out_name: str = "logits",
        activation: str = "sigmoid",
        min_component_mm3: float = 0.0,
        **contract: Any,
    ) -> Path:
        if graph is None:
            channels = n_labels + (1 if activation == "softmax" else 0)
            graph = build_graph(channels=channels, classification=task == "classification")
        labels = tuple(make_label(i + 1) for i in range(n_labels))
        outputs = OutputContract(out_name, "logits", activation, labels, min_component_mm3)  # type: ignore[arg-type]
        directory = tmp_path / f"pkg{next(counter)}"
        write_model_package(
            directory,
            graph,
            name="tiny",
            version="1",
            task=task,  # type: ignore[arg-type]
            input=make_contract(**contract),
            outputs=outputs,
            provenance={"test": True},
        )
        return directory

    return factory

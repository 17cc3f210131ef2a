"""Model packages: round trip, archives, and refusal of metadata that disagrees with the graph."""

from __future__ import annotations

import dataclasses
import tarfile
import zipfile
from pathlib import Path

import pytest
from tinymodels import build_graph

from dicomnode.errors import ModelLoadError
from dicomnode.inference.package import load_model_package, read_model_package
from dicomnode.modelpkg.format1 import parse_model_toml
from dicomnode.modelpkg.graph import (
    GraphSignature,
    TensorInfo,
    check_against_graph,
    read_graph_signature,
)
from dicomnode.modelpkg.write import render_model_toml


def _edit(pkg_dir: Path, old: str, new: str) -> None:
    toml = pkg_dir / "model.toml"
    text = toml.read_text()
    assert old in text, old
    toml.write_text(text.replace(old, new, 1))


def test_construction(make_package) -> None:
    pkg = load_model_package(make_package(n_labels=2, spacing_mm=(1.5, 1.5), size=(64, 64)))
    assert pkg.name == "tiny" and pkg.task == "segmentation"
    assert pkg.input.spacing_mm == (1.5, 1.5) and pkg.input.size == (64, 64)
    assert [lb.number for lb in pkg.labels] == [1, 2]
    assert pkg.labels[0].category.value == "49755003"
    assert pkg.provenance == {"test": True}
    assert dataclasses.is_dataclass(pkg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pkg.name = "other"  # type: ignore[misc]


def test_toml_round_trip(make_package) -> None:
    pkg = read_model_package(make_package(n_labels=3))
    text = render_model_toml(
        name=pkg.name,
        version=pkg.version,
        task=pkg.task,
        input=pkg.input,
        outputs=pkg.outputs,
        sha256=pkg.sha256,
        description='quote " and \\ and é',
        provenance={"a b": 1.5, "ok": False},
    )
    fields = parse_model_toml(text, pkg.source)
    assert fields["input"] == pkg.input and fields["outputs"] == pkg.outputs
    assert fields["description"] == 'quote " and \\ and é'
    assert fields["provenance"] == {"a b": 1.5, "ok": False}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_construction_archive(make_package, tmp_path: Path, kind: str) -> None:
    src = make_package()
    archive = tmp_path / f"model.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in src.iterdir():
                zf.write(f, f"tiny/{f.name}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src, arcname="tiny")
    pkg = load_model_package(archive)
    assert pkg.onnx_path is None and pkg.onnx_member == "tiny/model.onnx"
    assert pkg.read_onnx_bytes() == (src / "model.onnx").read_bytes()


def test_construction_archive_unsafe_member(make_package, tmp_path: Path) -> None:
    src = make_package()
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src / "model.toml", "model.toml")
        zf.write(src / "model.onnx", "model.onnx")
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ModelLoadError, match="unsafe member"):
        load_model_package(archive)


def test_construction_wrong_sha256(make_package) -> None:
    pkg_dir = make_package()
    (pkg_dir / "model.onnx").write_bytes(build_graph(channels=1, biases=[0.0]))
    with pytest.raises(
        ModelLoadError, match=r"model\.toml: sha256: declared [0-9a-f]{12}\.\.\., model\.onnx has"
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_output_name(make_package) -> None:
    pkg_dir = make_package()
    _edit(pkg_dir, 'name = "logits"', 'name = "scores"')
    with pytest.raises(
        ModelLoadError,
        match=r'model\.toml: outputs\.name: declared "scores", the graph outputs are \'logits\'',
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_label_count(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(channels=3), n_labels=2)
    with pytest.raises(
        ModelLoadError,
        match=r"model\.toml: outputs\.labels: 2 labels declared, "
        r'graph output "logits" has 3 channels',
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_label_count_softmax(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(channels=2), n_labels=2, activation="softmax")
    with pytest.raises(
        ModelLoadError,
        match=r"outputs\.labels: 2 labels plus background \(softmax\) declared, .* has 2 channels",
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_input_rank(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(in_shape=["N", "H", "W"]))
    with pytest.raises(
        ModelLoadError,
        match=r'model\.toml: input\.layout: NCHW needs rank 4, graph input "image" has rank 3',
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_input_name(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(in_name="ct"))
    with pytest.raises(
        ModelLoadError, match=r'model\.toml: input\.name: declared "image", the graph input is "ct"'
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_static_size(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(in_shape=["N", 1, 96, 96]), size=(64, 64))
    with pytest.raises(
        ModelLoadError, match=r"model\.toml: input\.size: declared \[64, 64\], .* H = 96"
    ):
        load_model_package(pkg_dir)


def test_construction_static_size_undeclared(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(in_shape=["N", 1, 96, 96]))
    with pytest.raises(ModelLoadError, match=r'input\.size: "any" declared, .* static H x W'):
        load_model_package(pkg_dir)


def test_construction_wrong_static_batch(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(in_shape=[1, 1, "H", "W"]), batch_size=8)
    with pytest.raises(
        ModelLoadError, match=r"input\.batch_size: declared 8, .* static batch of 1"
    ):
        load_model_package(pkg_dir)


def test_construction_wrong_task_rank(make_package) -> None:
    pkg_dir = make_package(graph=build_graph(classification=True))
    with pytest.raises(
        ModelLoadError, match=r"model\.toml: task: segmentation needs an output of rank 4"
    ):
        load_model_package(pkg_dir)


def test_construction_dynamic_channels(make_package) -> None:
    pkg = read_model_package(make_package())
    sig = GraphSignature(
        (TensorInfo("image", ("N", 1, "H", "W"), "float32"),),
        (TensorInfo("logits", ("N", "C", "H", "W"), "float32"),),
    )
    with pytest.raises(ModelLoadError, match="dynamic channel dimension"):
        check_against_graph(pkg, sig)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'task = "segmentation"',
            'task = "detection"',
            r"task: expected one of segmentation, classification",
        ),
        (
            "color = [255, 0, 0]",
            "color = [300, 0, 0]",
            r"outputs\.labels\[0\]\.color: expected 3 integers 0-255",
        ),
        (
            "threshold = 0.5",
            "threshold = 1.5",
            r"outputs\.labels\[0\]\.threshold: must be strictly between 0 and 1",
        ),
        ("number = 1", "number = 2", r"outputs\.labels\[0\]\.number: labels must be numbered 1, 2"),
        ("batch_size = 4", "batch_size = 0", r"input\.batch_size: must be 1-4096"),
        ("batch_size = 4", 'batch_size = "4"', r"input\.batch_size: expected an integer"),
        ('modality = "CT"', 'modality = "ct"', r"input\.modality: expected a DICOM Modality"),
        (
            'spacing_mm = "native"',
            "spacing_mm = [1.5]",
            r"input\.spacing_mm: expected two positive numbers",
        ),
        (
            'kind = "window"',
            'kind = "gamma"',
            r"input\.normalization\.kind: expected one of window, zscore, none",
        ),
        ('layout = "NCHW"', 'layout = "NCDHW"', r"input\.layout: expected one of NCHW"),
        ("format = 1", "format = 3", r"format: this node reads formats 1 and 2, got 3"),
        ("format = 1", "format = 2", r"members: missing"),
        ("[outputs]", "[outputs]\nextra = 1", r"outputs\.extra: unknown key"),
        ('name = "tiny"\n', "", r"model\.toml: name: missing"),
    ],
)
def test_construction_invalid_toml(make_package, old: str, new: str, message: str) -> None:
    pkg_dir = make_package()
    _edit(pkg_dir, old, new)
    with pytest.raises(ModelLoadError, match=message):
        read_model_package(pkg_dir)


def test_construction_window_shorthand(make_package) -> None:
    pkg_dir = make_package()
    _edit(
        pkg_dir, '{ kind = "window", center = 40.0, width = 400.0 }', "{center = 40, width = 400}"
    )
    assert read_model_package(pkg_dir).input.normalization.kind == "window"


def test_construction_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.toml: missing"):
        load_model_package(tmp_path)


def test_graph_signature_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = build_graph(channels=2)
    with_ort = read_graph_signature(graph)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    without = read_graph_signature(graph)
    assert with_ort.inputs[0].name == without.inputs[0].name == "image"
    assert with_ort.outputs[0].shape[1] == without.outputs[0].shape[1] == 2
    assert without.inputs[0].dtype == "float32"

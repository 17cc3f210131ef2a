"""The ONNX Runtime wrapper: geometry, batching, tasks, providers and errors (tiny graphs)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from tinymodels import BIAS, WEIGHT, build_graph

from dicomnode.errors import InferenceError, ModelError, ModelLoadError
from dicomnode.inference.runtime import ModelSessions, OnnxModel, RuntimeOptions, resolve_providers


def _hu(shape: tuple[int, int, int] = (5, 24, 28), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-200, 300, size=shape).astype(np.float32)


def _expected(hu: np.ndarray) -> np.ndarray:
    x = (np.clip(hu, -160, 240) + 160) / 400
    return (WEIGHT * x + BIAS >= 0).astype(np.uint8)


def test_run_native_geometry(make_package) -> None:
    model = OnnxModel.load(make_package(batch_size=2), RuntimeOptions(intra_op_threads=1))
    hu = _hu()
    out = model.run(hu, (3.0, 1.0, 1.0), return_probabilities=True)
    assert out.mask is not None and out.mask.shape == hu.shape and out.mask.dtype == np.uint8
    near = np.abs(hu - 80.0) < 0.01  # float rounding at the threshold itself
    np.testing.assert_array_equal(out.mask[~near], _expected(hu)[~near])
    assert out.probabilities is not None and out.probabilities.shape == (1, *hu.shape)
    assert out.probabilities.dtype == np.float16
    np.testing.assert_array_equal((out.probabilities[0] >= 0.5)[~near], out.mask[~near] == 1)
    assert out.providers == ("CPUExecutionProvider",)
    assert out.model_name == "tiny" and out.task == "segmentation"
    assert set(out.seconds) == {"run", "other", "total"}
    assert out.positive_labels == ((1,) if out.findings else ())


def test_run_batches_do_not_change_the_result(make_package) -> None:
    hu = _hu((7, 16, 16), seed=1)
    a = OnnxModel.load(make_package(batch_size=3)).run(hu, (1.0, 1.0, 1.0))
    b = OnnxModel.load(make_package(batch_size=16)).run(hu, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(a.mask, b.mask)


def test_run_resamples_and_returns_original_grid(make_package) -> None:
    hu = np.full((4, 64, 48), 0.0, np.float32)
    hu[:, 16:48, 12:36] = 200.0  # a bright block, 24 x 18 mm at 0.75 mm
    model = OnnxModel.load(make_package(spacing_mm=(1.5, 1.5), size_multiple=8))
    out = model.run(hu, (2.0, 0.75, 0.75))
    assert out.mask.shape == hu.shape
    truth = hu > 100
    dice = 2 * (out.mask.astype(bool) & truth).sum() / (out.mask.sum() + truth.sum())
    assert dice > 0.97
    (f,) = out.findings
    assert f.volume_mm3 == pytest.approx(truth.sum() * 2.0 * 0.75 * 0.75, rel=0.08)


def test_run_pads_and_crops_to_a_fixed_size(make_package) -> None:
    hu = _hu((3, 40, 24), seed=2)
    model = OnnxModel.load(make_package(size=(32, 32)))
    out = model.run(hu, (1.0, 1.0, 1.0))
    exp = _expected(hu)
    # 40 rows are cropped to 32 (4 lost at each edge, reported as 0); 24 columns padded.
    np.testing.assert_array_equal(out.mask[:, 4:36], exp[:, 4:36])
    assert not out.mask[:, :4].any() and not out.mask[:, 36:].any()


def test_run_min_component_volume(make_package) -> None:
    hu = np.zeros((3, 16, 16), np.float32)
    hu[1, 2:6, 2:6] = 200.0
    hu[1, 12, 12] = 200.0  # one voxel: 1 mm3, below the limit
    out = OnnxModel.load(make_package(min_component_mm3=5.0)).run(hu, (1.0, 1.0, 1.0))
    assert len(out.findings) == 1 and out.findings[0].voxel_count == 16
    assert out.mask[1, 12, 12] == 0


def test_run_classification(make_package) -> None:
    model = OnnxModel.load(make_package(task="classification", n_labels=2))
    hu = _hu((4, 8, 8), seed=3)
    out = model.run(hu, (1.0, 1.0, 1.0))
    x = (np.clip(hu, -160, 240) + 160) / 400
    logits = WEIGHT * x.mean(axis=(1, 2))[:, None] + np.array([BIAS, BIAS - 2.0])
    expected = (1 / (1 + np.exp(-logits))).mean(axis=0)
    assert out.mask is None and out.findings == ()
    assert [out.label_probabilities[1], out.label_probabilities[2]] == pytest.approx(
        expected, abs=1e-5
    )
    assert out.positive_labels == tuple(i + 1 for i, p in enumerate(expected) if p >= 0.5)


def test_run_is_thread_safe(make_package) -> None:
    model = OnnxModel.load(make_package())
    hu = _hu((6, 32, 32), seed=4)
    ref = model.run(hu, (1.0, 1.0, 1.0)).mask
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(model.run(hu, (1.0, 1.0, 1.0)).mask))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(np.array_equal(r, ref) for r in results)
    assert not model.lock.locked()


@pytest.mark.parametrize(
    ("volume", "spacing", "message"),
    [
        (np.zeros((4, 4)), (1.0, 1.0, 1.0), "expected a 3D"),
        (np.zeros((0, 4, 4)), (1.0, 1.0, 1.0), "empty"),
        (np.zeros((2, 4, 4), np.complex64), (1.0, 1.0, 1.0), "real numbers"),
        (np.zeros((2, 4, 4)), (1.0, 0.0, 1.0), "three positive numbers"),
        (np.zeros((2, 4, 4)), (1.0, 1.0), "three positive numbers"),
        (
            np.full((2, 4, 4), np.nan, np.float32),
            (1.0, 1.0, 1.0),
            "non-finite values in slices 0-1",
        ),
    ],
)
def test_run_invalid_volume(make_package, volume: np.ndarray, spacing: tuple, message: str) -> None:
    model = OnnxModel.load(make_package())
    with pytest.raises(InferenceError, match=message):
        model.run(volume, spacing)


def test_resolve_providers() -> None:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert resolve_providers("auto", [cpu]) == [cpu]
    assert resolve_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert resolve_providers([cpu], [cuda, cpu]) == [cpu]
    with pytest.raises(
        ModelError, match=r"providers: CUDAExecutionProvider not available .*dicomnode\[gpu\]"
    ):
        resolve_providers([cuda], [cpu])


def test_runtime_options_from_mapping() -> None:
    opts = RuntimeOptions.from_mapping(
        {"providers": ["CPUExecutionProvider"], "intra_op_threads": 2, "x": 1}
    )
    assert opts.providers == ("CPUExecutionProvider",) and opts.intra_op_threads == 2
    with pytest.raises(ModelError, match="providers"):
        RuntimeOptions(providers="gpu")
    with pytest.raises(ModelError, match="intra_op_threads"):
        RuntimeOptions(intra_op_threads=-1)


def test_load_explicit_unavailable_provider(make_package) -> None:
    with pytest.raises(ModelError, match="not available"):
        OnnxModel.load(make_package(), RuntimeOptions(providers=("CUDAExecutionProvider",)))


def test_load_without_onnxruntime(make_package, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = make_package()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r"onnxruntime is not installed: install dicomnode\[cpu\]"):
        OnnxModel.load(pkg)


def test_load_refuses_a_graph_mismatch(make_package) -> None:
    with pytest.raises(ModelLoadError, match="outputs.labels: 2 labels declared"):
        OnnxModel.load(make_package(graph=build_graph(channels=1), n_labels=2))


def test_load_refuses_a_changed_file(make_package) -> None:
    from dicomnode.modelpkg.format1 import read_model_package

    pkg_dir = make_package()
    pkg = read_model_package(pkg_dir)
    (pkg_dir / "model.onnx").write_bytes(build_graph(biases=[1.0]))
    with pytest.raises(ModelLoadError, match="changed since loading"):
        OnnxModel.load(pkg)


def test_sessions_one_per_version(make_package) -> None:
    sessions = ModelSessions(RuntimeOptions(intra_op_threads=1))
    pkg_dir = make_package()
    first = sessions.get(pkg_dir)
    assert sessions.get(pkg_dir) is first
    # A rebuilt package with the same name/version but other weights gets its own session.
    (pkg_dir / "model.onnx").write_bytes(build_graph(biases=[1.0]))
    toml = pkg_dir / "model.toml"
    from dicomnode.modelpkg.format1 import sha256_of

    toml.write_text(
        toml.read_text().replace(first.package.sha256, sha256_of(pkg_dir / "model.onnx"))
    )
    second = sessions.get(pkg_dir)
    assert second is not first and second.package.sha256 != first.package.sha256
    assert sessions.evict("tiny", "1") == 2
    sessions.clear()

"""Model package format 2: its checks, its conventions and its runtime, on graphs made here.

The graphs are made with onnx.helper (no training): a pointwise 1x1x1 convolution whose
channels are ``w_c * x + b_c`` turns the runtime into an exact, predictable threshold
segmenter, so geometry and decision rules can be checked voxel by voxel; the pitfalls
numbered below are those a runner of nnU-Net and MONAI models must get right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from dicomnode.errors import InferenceError, ModelError, ModelLoadError
from dicomnode.inference.golden import golden_validator, run_golden_cases
from dicomnode.inference.sliding import SlidingWindowModel, prepare_volume
from dicomnode.modelpkg import read_model_package
from dicomnode.modelpkg.axes import axcodes, reorientation
from dicomnode.modelpkg.format2 import NormStep, Resample, VolumeInput
from dicomnode.modelpkg.normalize import normalize
from dicomnode.modelpkg.resample import AxisMap, new_shape, resample_volume
from dicomnode.modelpkg.tiling import gaussian_weights, pad_to_patch, tile_starts
from dicomnode.modelpkg.write import write_format2_package

LABEL = {"category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
         "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}, "color": [9, 9, 9]}


def pointwise(weights: list[float], biases: list[float], batch: int,
              patch: tuple[int, ...], *, input_shape: list[Any] | None = None,
              extra_output: bool = False) -> bytes:
    """ONNX: channel c = weights[c] * x + biases[c], static [batch, 1, *patch]."""
    c = len(weights)
    w = numpy_helper.from_array(np.array(weights, np.float32).reshape(c, 1, 1, 1, 1), "w")
    b = numpy_helper.from_array(np.array(biases, np.float32), "b")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c, *patch])]
    if extra_output:  # as an nnU-Net export with deep supervision left on
        nodes.append(helper.make_node("Identity", ["logits"], ["deep"]))
        outputs.append(helper.make_tensor_value_info("deep", TensorProto.FLOAT,
                                                     [batch, c, *patch]))
    graph = helper.make_graph(
        nodes, "pointwise",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       input_shape or [batch, 1, *patch])],
        outputs, [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def document(*, labels: int = 1, activation: str = "softmax", patch: tuple[int, ...] = (8, 16, 16),
             batch: int = 2, axes: str = "SPL", spacing: Any = "native", flavour: str = "nnunet",
             regions: list[dict[str, int]] | None = None, **extra: Any) -> dict[str, Any]:
    outputs: dict[str, Any] = {
        "name": "logits", "kind": "logits", "activation": activation,
        "labels": [{"number": i, "name": f"Structure {i}", **LABEL} for i in range(1, labels + 1)],
    }
    if regions:
        outputs["regions"] = regions
    doc = {
        "name": "pointwise", "version": "1", "task": "segmentation",
        "input": {"kind": "volume", "name": "input", "modality": ["CT"], "axes": axes,
                  "spacing_mm": spacing, "resample": {"grid": "center", "order": 1},
                  "normalization": [{"kind": "none"}]},
        "inference": {"mode": "sliding_window", "patch": list(patch), "batch": batch,
                      "tiling": {"flavour": flavour, "step": 0.5, "overlap": 0.5},
                      "blend": {"kind": "gaussian", "flavour": flavour}},
        "outputs": outputs,
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        doc[section][field] = value
    return doc


def axial(spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)) -> np.ndarray:
    sz, sy, sx = spacing
    return np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1.0]])


def package(tmp_path: Path, members: dict[str, bytes], doc: dict[str, Any],
            extra: dict[str, bytes] | None = None) -> Any:
    return write_format2_package(tmp_path / "pkg", members, doc, extra_files=extra)


# ----------------------------------------------------------------------------- the format


def test_package_round_trip_and_identity(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"fold_0.onnx": pointwise([0, 1], [0, -0.5], 2, (8, 16, 16)),
                             "fold_1.onnx": pointwise([0, 1], [0, -0.4], 2, (8, 16, 16))},
                  document())
    again = read_model_package(tmp_path / "pkg")
    assert again.format == 2 and len(again.members) == 2 and again.sha256 == pkg.sha256
    assert again.inference.patch == (8, 16, 16) and again.input.axes == "SPL"
    SlidingWindowModel.load(again)  # both members agree with their graphs


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("input__axes", "SPP", "three patient directions"),
        ("input__spacing_mm", [1.0, 0.0, 1.0], "positive"),
        ("inference__patch", [8, 16], "3 positive sizes"),
        ("inference__mirror_axes", [0, 3], "distinct axes"),
        ("input__min_slices", 0, "at least 1"),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, key: str, value: Any, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        package(tmp_path, {"m.onnx": pointwise([0, 1], [0, 0], 2, (8, 16, 16))},
                document(**{key: value}))


def test_changed_member_is_refused(tmp_path: Path) -> None:
    package(tmp_path, {"m.onnx": pointwise([0, 1], [0, 0], 2, (8, 16, 16))}, document())
    (tmp_path / "pkg" / "m.onnx").write_bytes(pointwise([0, 2], [0, 0], 2, (8, 16, 16)))
    with pytest.raises(ModelLoadError, match=r"members\[0\]\.sha256"):
        read_model_package(tmp_path / "pkg")


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (pointwise([0, 1], [0, 0], 2, (8, 16, 16), input_shape=["n", 1, 8, 16, 16]),
         "expected static"),
        (pointwise([0, 1], [0, 0], 1, (8, 16, 16)), "expected static"),
        (pointwise([0, 1, 1], [0, 0, 0], 2, (8, 16, 16)), "channels of outputs"),
    ],
    ids=["dynamic-batch", "other-batch", "other-channels"],
)
def test_graph_disagreements_are_refused(tmp_path: Path, graph: bytes, message: str) -> None:
    pkg = package(tmp_path, {"m.onnx": graph}, document())
    with pytest.raises(ModelLoadError, match=message):
        SlidingWindowModel.load(pkg)


def test_deep_supervision_outputs_do_not_hide_the_named_one(tmp_path: Path) -> None:
    graph = pointwise([0, 1], [0, 0], 2, (8, 16, 16), extra_output=True)
    pkg = package(tmp_path, {"m.onnx": graph}, document())
    SlidingWindowModel.load(pkg)  # the output named in model.toml is used
    doc = document()
    doc["outputs"]["name"] = "seg"
    with pytest.raises(ModelLoadError, match="deep supervision"):
        SlidingWindowModel.load(package(tmp_path / "b", {"m.onnx": graph}, doc))


# ------------------------------------------------------------------------- the conventions


def test_pitfall_1_axes_marker_lands_where_each_convention_puts_it() -> None:
    # axial head-first supine: slices toward S, rows toward P, columns toward L
    volume = np.zeros((10, 12, 14), np.float32)
    volume[7, 2, 11] = 1.0  # superior, anterior (small row index), left (large column)
    codes = axcodes(axial()[:3, :3])
    assert codes == "SPL"
    for target, expected in {"SPL": (7, 2, 11), "SAR": (7, 9, 2), "RAS": (2, 9, 7),
                             "LPS": (11, 2, 7)}.items():
        ro = reorientation(codes, target)
        moved = ro.apply(volume)
        assert tuple(int(i) for i in np.argwhere(moved)[0]) == expected, target
        np.testing.assert_array_equal(ro.invert(moved), volume)


def test_pitfall_2_spacing_follows_the_axes() -> None:
    # pixel spacing 0.6 (rows) x 0.9 (columns), slices 2.5 mm; model axes RAS, spacing in
    # network-axis order (x, y, z)
    ro = reorientation("SPL", "RAS")
    assert ro.spacing((2.5, 0.6, 0.9)) == (0.9, 0.6, 2.5)
    assert new_shape((40, 100, 80), (2.5, 0.6, 0.9), (0.5, 1.0, 3.0), "center") == (200, 60, 24)


def test_pitfall_4_grids() -> None:
    # 512 voxels of 0.7 mm to 1.5 mm: 239 both ways; the first sample at 0.571 vs 0
    assert new_shape((512,), (0.7,), (1.5,), "center") == (239,)
    assert new_shape((512,), (0.7,), (1.5,), "corner") == (239,)
    center = AxisMap.center(512, 239, 1)
    corner = AxisMap.corner(512, 239, 1.5 / 0.7, 1)
    assert center.lo[0] + center.w[0] == pytest.approx(0.5 * 512 / 239 - 0.5)
    assert corner.lo[0] + corner.w[0] == 0.0


def test_pitfall_5_anisotropic_axis_nearest() -> None:
    ramp = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    out = resample_volume(ramp, (5.0, 0.7, 0.7), (2.5, 0.7, 0.7),
                          Resample(grid="center", order=3, anisotropic_order=0))
    assert out.shape == (16, 4, 4)
    assert set(np.unique(out)) <= set(range(8)), "order 0 along the coarse axis adds no values"


def test_pitfall_6_ct_clip_before_zscore_and_unclipped_scale_range() -> None:
    x = np.array([-3024.0, 0.0, 3071.0], np.float32)
    out = normalize(x, [NormStep("clip", lower=-1000.0, upper=1500.0),
                        NormStep("zscore", mean=50.0, std=300.0)])
    np.testing.assert_allclose(out, [(-1000 - 50) / 300, -50 / 300, (1500 - 50) / 300],
                               rtol=1e-6)
    scaled = normalize(x, [NormStep("scale_range", a_min=-1000.0, a_max=1000.0, b_min=0.0,
                                    b_max=1.0, clip=False)])
    assert scaled.min() < 0 and scaled.max() > 1


def test_pitfall_7_window_positions() -> None:
    assert tile_starts(110, 64, flavour="nnunet", step=0.5) == [0, 23, 46]
    assert tile_starts(110, 64, flavour="monai", overlap=0.5) == [0, 32, 46]
    assert tile_starts(64, 64, flavour="monai", overlap=0.5) == [0]
    g = gaussian_weights((9, 9, 9), flavour="nnunet")
    assert g.max() == pytest.approx(10.0, rel=1e-3) and g.min() > 0
    m = gaussian_weights((9, 9, 9), flavour="monai")
    assert m.max() == pytest.approx(1.0) and m.min() >= 1e-3


def test_pitfall_11_padding_is_centred_and_undone() -> None:
    x = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    padded, unpad = pad_to_patch(x, (8, 8, 8), mode="constant", value=-1.0)
    assert padded.shape == (8, 8, 8)
    np.testing.assert_array_equal(padded[unpad], x)
    assert unpad[0] == slice(2, 5)  # 5 missing: 2 before, 3 after


# ----------------------------------------------------------------------------- the runtime


def _threshold_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, shape).astype(np.float32)


def test_threshold_network_segments_exactly_at_native_spacing(tmp_path: Path) -> None:
    # channel 1 - channel 0 = x - 0.25: label 1 exactly where x > 0.25, whatever the
    # windows, blending, padding and reorientation did (they must all cancel)
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))},
                  document(axes="RAS"))
    volume = _threshold_volume((13, 37, 29))
    out = SlidingWindowModel.load(pkg).run(volume, axial())
    np.testing.assert_array_equal(out.labels, (volume > 0.25).astype(np.uint8))


def test_pitfall_7_constant_logits_stay_constant(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 0], [0.3, 1.7], 2, (8, 16, 16))},
                  document())
    out = SlidingWindowModel.load(pkg).run(_threshold_volume((11, 30, 30)), axial(),
                                           keep_logits=True)
    assert out.logits is not None
    np.testing.assert_allclose(out.logits[0], 0.3, atol=1e-5)
    np.testing.assert_allclose(out.logits[1], 1.7, atol=1e-5)


def test_pitfall_8_mirroring_flips_back(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))},
                  document(inference__mirror_axes=[0, 1, 2]))
    volume = _threshold_volume((13, 37, 29), seed=1)
    out = SlidingWindowModel.load(pkg).run(volume, axial())
    assert out.plan["passes_per_window"] == 8
    np.testing.assert_array_equal(out.labels, (volume > 0.25).astype(np.uint8))


def test_pitfall_9_members_average_logits(tmp_path: Path) -> None:
    # thresholds 0.1 and 0.5: averaged logits cut at 0.3 (not a vote, not averaged softmax)
    pkg = package(tmp_path, {"a.onnx": pointwise([0, 1], [0, -0.1], 2, (8, 16, 16)),
                             "b.onnx": pointwise([0, 1], [0, -0.5], 2, (8, 16, 16))}, document())
    volume = _threshold_volume((9, 20, 20), seed=2)
    out = SlidingWindowModel.load(pkg).run(volume, axial())
    np.testing.assert_array_equal(out.labels, (volume > 0.3).astype(np.uint8))


def test_pitfall_10_regions_painted_in_order(tmp_path: Path) -> None:
    # region 0 (label 1): x > -0.5; region 1 (label 2): x > 0.5, painted later, wins
    pkg = package(tmp_path, {"m.onnx": pointwise([10, 10], [5, -5], 2, (8, 16, 16))},
                  document(labels=2, activation="sigmoid",
                           regions=[{"channel": 0, "label": 1}, {"channel": 1, "label": 2}]))
    volume = _threshold_volume((9, 20, 20), seed=3)
    out = SlidingWindowModel.load(pkg).run(volume, axial())
    expected = np.where(volume > 0.5, 2, np.where(volume > -0.5, 1, 0))
    np.testing.assert_array_equal(out.labels, expected)


def test_pitfall_11_small_volume_padded_and_cropped_back(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))},
                  document())
    volume = _threshold_volume((3, 5, 7), seed=4)
    out = SlidingWindowModel.load(pkg).run(volume, axial())
    assert out.labels.shape == (3, 5, 7)
    np.testing.assert_array_equal(out.labels, (volume > 0.25).astype(np.uint8))


def test_resampled_round_trip_keeps_a_block(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, -0.5], 2, (8, 16, 16))},
                  document(spacing=[2.0, 2.0, 2.0]))
    volume = np.zeros((20, 40, 40), np.float32)
    volume[6:14, 10:30, 12:28] = 1.0
    out = SlidingWindowModel.load(pkg).run(volume, axial((1.0, 1.0, 1.0)))
    inside = out.labels[7:13, 11:29, 13:27]
    assert inside.all() and out.labels.sum() < 1.3 * volume.sum()


def test_memory_budget_refuses_with_the_estimate(tmp_path: Path) -> None:
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, 0], 2, (8, 16, 16))}, document())
    model = SlidingWindowModel.load(pkg)
    model.memory_budget_mb = 0.5
    with pytest.raises(InferenceError,
                       match=r"needs about \d+ MB beyond the input .*memory_budget_mb is 0"):
        model.run(_threshold_volume((40, 64, 64)), axial())


def test_oblique_volume_refused_unless_allowed(tmp_path: Path) -> None:
    a = np.radians(40)
    affine = np.eye(4)
    affine[:3, 0] = [0, -np.sin(a), np.cos(a)]
    affine[:3, 1] = [0, np.cos(a), np.sin(a)]
    affine[:3, 2] = [1, 0, 0]
    volume = _threshold_volume((9, 20, 20))
    pkg = package(tmp_path, {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))},
                  document())
    with pytest.raises(InferenceError, match="oblique"):
        SlidingWindowModel.load(pkg).run(volume, affine)
    doc = document(input__allow_oblique=True)
    allowed = package(tmp_path / "b", {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))},
                      doc)
    out = SlidingWindowModel.load(allowed).run(volume, affine)
    np.testing.assert_array_equal(out.labels, (volume > 0.25).astype(np.uint8))


def test_prepare_volume_crop_and_normalise_inside_the_mask() -> None:
    volume = np.zeros((10, 20, 20), np.float32)
    volume[2:8, 4:16, 5:15] = np.linspace(100, 200, 6)[:, None, None]
    spec = VolumeInput(name="input", modality=("MR",), axes="SPL", spacing_mm=None,
                       resample=Resample(), crop_to_nonzero=True,
                       normalization=(NormStep("zscore", mask="nonzero_filled"),))
    prep = prepare_volume(volume, axial(), spec, (4, 8, 8), "constant", 0.0, "normalized")
    data = prep.data[0]
    assert prep.crop == (slice(2, 8), slice(4, 16), slice(5, 15))
    assert data.shape == (6, 12, 10)
    assert abs(float(data.mean())) < 1e-5 and abs(float(data.std()) - 1) < 1e-4


# ----------------------------------------------------------------------------- golden cases


def _golden(volume: np.ndarray, labels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, volume=volume, affine=axial(), labels=labels)
    return buf.getvalue()


def test_golden_case_passes_and_a_wrong_one_is_refused_with_its_dice(tmp_path: Path) -> None:
    volume = _threshold_volume((9, 20, 20), seed=5)
    right = (volume > 0.25).astype(np.uint8)
    doc = document()
    doc["validation"] = {"cases": [{"file": "golden/case0.npz", "min_dice": 0.99}]}
    graph = {"m.onnx": pointwise([0, 1], [0, -0.25], 2, (8, 16, 16))}
    good = package(tmp_path / "good", graph, doc, {"golden/case0.npz": _golden(volume, right)})
    [result] = run_golden_cases(good.source)
    assert result["passed"] and result["dice"] == {"1": 1.0}
    # the package's axes declared wrong: the case catches it before service
    wrong = np.flip(right, 2).copy()
    bad = package(tmp_path / "bad", graph, doc, {"golden/case0.npz": _golden(volume, wrong)})
    with pytest.raises(ModelError, match=r"golden case golden/case0.npz fails: Dice label 1: "):
        golden_validator()(bad.source)

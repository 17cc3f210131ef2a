"""Activation, label assignment, connected components and measurements."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodels import make_label

from dicomnode.inference.postprocess import (
    activate,
    assign_labels,
    connected_components,
    find_components,
    max_diameter,
)
from dicomnode.modelpkg.format1 import OutputContract


def _outputs(n: int, activation: str = "sigmoid", kind: str = "logits") -> OutputContract:
    return OutputContract("logits", kind, activation, tuple(make_label(i + 1) for i in range(n)))  # type: ignore[arg-type]


def test_activate_sigmoid_extremes() -> None:
    p = activate(np.array([[-1e4, 0.0, 1e4]], np.float32), _outputs(1))
    np.testing.assert_allclose(p, [[0.0, 0.5, 1.0]], atol=1e-7)


def test_activate_softmax_sums_to_one() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32) * 50
    p = activate(x, _outputs(2, "softmax"))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_activate_probabilities_pass_through() -> None:
    x = np.full((1, 1, 2, 2), 0.3, np.float32)
    np.testing.assert_array_equal(activate(x, _outputs(1, kind="probabilities")), x)


def test_assign_labels_sigmoid_most_probable_above_threshold() -> None:
    probs = np.array(
        [[[[0.9]], [[0.6]]], [[[0.4]], [[0.7]]], [[[0.2]], [[0.3]]]], np.float32
    )  # (3, 2, 1, 1)
    np.testing.assert_array_equal(assign_labels(probs, _outputs(2))[:, 0, 0], [1, 2, 0])


def test_assign_labels_softmax_background_wins() -> None:
    probs = np.array([[[[0.5]], [[0.3]], [[0.2]]], [[[0.1]], [[0.2]], [[0.7]]]], np.float32)
    np.testing.assert_array_equal(assign_labels(probs, _outputs(2, "softmax"))[:, 0, 0], [0, 2])


@pytest.mark.parametrize("use_scipy", [False, None])
def test_connected_components_face_connectivity(use_scipy: bool | None) -> None:
    m = np.zeros((3, 5, 5), bool)
    m[0, 0, 0] = m[0, 0, 1] = True  # one component
    m[1, 1, 1] = True  # diagonal to the first: separate under face connectivity
    m[2, 3:5, 3:5] = True
    m[1, 4, 4] = True  # joins the block above through z
    labels, n = connected_components(m, use_scipy=use_scipy if use_scipy is False else None)
    assert n == 3
    assert labels[0, 0, 0] == labels[0, 0, 1] == 1  # raster order of the first voxel
    assert labels[1, 1, 1] == 2 and labels[1, 4, 4] == labels[2, 3, 3] == 3


def test_connected_components_union_find_matches_flood_fill() -> None:
    rng = np.random.default_rng(3)
    m = rng.random((6, 20, 20)) < 0.35
    labels, n = connected_components(m, use_scipy=False)
    # Reference: a plain BFS flood fill.
    ref = np.zeros(m.shape, np.int32)
    k = 0
    for start in zip(*np.nonzero(m), strict=True):
        if ref[start]:
            continue
        k += 1
        stack = [start]
        ref[start] = k
        while stack:
            z, y, x = stack.pop()
            for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                q = (z + dz, y + dy, x + dx)
                if all(0 <= q[i] < m.shape[i] for i in range(3)) and m[q] and not ref[q]:
                    ref[q] = k
                    stack.append(q)
    assert n == k
    np.testing.assert_array_equal(labels, ref)


def test_connected_components_empty() -> None:
    labels, n = connected_components(np.zeros((2, 3, 3), bool), use_scipy=False)
    assert n == 0 and not labels.any()


def test_max_diameter_exact_and_approximate() -> None:
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(5000, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True) / 10.0  # a sphere of radius 10
    exact = max_diameter(pts, exact_limit=10_000)
    approx = max_diameter(pts)
    assert 19.9 < exact <= 20.0
    assert exact * 0.99 <= approx <= exact
    assert max_diameter(np.zeros((1, 3))) == 0.0


def test_find_components_measures_a_box() -> None:
    mask = np.zeros((10, 20, 20), np.uint8)
    mask[2:6, 5:9, 10:13] = 1  # 4 x 4 x 3 voxels
    mask[8, 0, 0] = 1  # a one-voxel speck
    volume = np.where(mask > 0, 100.0, 0.0).astype(np.float32)
    cleaned, findings = find_components(mask, volume, (2.0, 1.0, 0.5), {1: "Lesion"})
    assert cleaned is mask and len(findings) == 2
    box = findings[0]
    assert (box.index, box.voxel_count, box.volume_mm3) == (1, 48, 48.0)
    assert box.max_diameter_mm == pytest.approx(np.sqrt(6.0**2 + 3.0**2 + 1.0**2))
    assert box.max_axial_diameter_mm == pytest.approx(np.sqrt(3.0**2 + 1.0**2))
    assert box.mean_value == 100.0
    assert box.centroid_voxel == pytest.approx((3.5, 6.5, 11.0))
    assert box.bbox == (2, 5, 10, 6, 9, 13)
    assert findings[1].voxel_count == 1 and findings[1].max_diameter_mm == 0.0


def test_find_components_drops_small() -> None:
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[0:2, 0:2, 0:2] = 1
    mask[3, 6, 6] = 1
    cleaned, findings = find_components(
        mask, mask.astype(np.float32), (1.0, 1.0, 1.0), {1: "L"}, min_volume_mm3=2.0
    )
    assert len(findings) == 1 and findings[0].voxel_count == 8
    assert cleaned[3, 6, 6] == 0 and mask[3, 6, 6] == 1  # the input is left alone

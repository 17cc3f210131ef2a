"""Annotator agreement, majority vote, STAPLE and the review flag."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from learningtools import dilate, erode
from pydicom import dcmread

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec, derived_uid
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.seg import SegmentSpec, build_seg, read_seg
from dicomnode.dicom.volume import assemble_volume
from dicomnode.training.labels import (
    ConsensusMethodValues,
    assess_annotations,
    dice_per_label,
    majority_vote,
    pairwise_agreement,
    staple,
    staple_binary,
)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """A 16 x 64 x 64 phantom lesion mask (label 1)."""
    st = make_ct_study(seed=9400, n_slices=16, rows=64, columns=64, n_lesions=3,
                       lesion_radius_mm=(5.0, 9.0))
    assert st.mask.sum() > 200
    return st.mask


def _noisy(truth: np.ndarray, rng: np.random.Generator, miss: float, extra: float) -> np.ndarray:
    """Drop a fraction ``miss`` of the lesion voxels, add ``extra`` x |lesion| false positives."""
    out = truth.copy()
    fg = np.flatnonzero(truth)
    out.flat[rng.choice(fg, int(miss * fg.size), replace=False)] = 0
    bg = np.flatnonzero(truth == 0)
    out.flat[rng.choice(bg, int(extra * fg.size), replace=False)] = 1
    return out


def test_identical_annotators_agree(truth: np.ndarray) -> None:
    for method in ("majority", "staple"):
        res = assess_annotations({"ae-a": truth, "ae-b": truth.copy()}, threshold=0.8,
                                 method=method)
        assert res.agreement == 1.0 and not res.flagged
        assert res.labels[0].pairs == (("ae-a", "ae-b", 1.0),)
        assert res.method is ConsensusMethodValues(method)
        np.testing.assert_array_equal(res.consensus, truth)
        assert "agree" in res.reason


def test_very_different_annotators_are_flagged(truth: np.ndarray) -> None:
    other = np.roll(truth, 20, axis=2)  # the same shapes, somewhere else
    res = assess_annotations({"ae-a": truth, "ae-b": other, "ae-c": truth}, threshold=0.7)
    assert res.flagged and res.agreement is not None and res.agreement < 0.7
    assert res.reason.startswith("3 annotators disagree: label 1: mean pairwise Dice")
    assert "worst pair ae-a/ae-b" in res.reason
    # Majority of 3: a and c outvote b.
    np.testing.assert_array_equal(res.consensus, truth)


def test_flag_is_agreement_below_threshold(truth: np.ndarray) -> None:
    b = dilate(truth)
    d = dice_per_label(truth, b, [1])[1]
    assert 0.5 < d < 0.95
    assert not assess_annotations([truth, b], threshold=d).flagged  # equal: not below
    assert assess_annotations([truth, b], threshold=min(1.0, d + 1e-6)).flagged


def test_agreement_is_the_worst_label() -> None:
    a = np.zeros((2, 8, 8), np.uint8)
    a[0, :4, :4], a[1, 4:, 4:] = 1, 2
    b = a.copy()
    b[1] = 0
    b[1, :2, :2] = 2  # label 2 disputed, label 1 identical
    res = assess_annotations({"x": a, "y": b}, threshold=0.5)
    by_label = {la.label: la for la in res.labels}
    assert by_label[1].mean_dice == 1.0 and by_label[2].mean_dice == 0.0
    assert res.agreement == 0.0 and res.flagged and "label 2" in res.reason
    assert "label 1" not in res.reason


def test_one_annotator_is_not_flagged(truth: np.ndarray) -> None:
    res = assess_annotations({"ae-a": truth}, threshold=0.99)
    assert res.agreement is None and not res.flagged and res.labels == ()
    assert "one annotator" in res.reason
    np.testing.assert_array_equal(res.consensus, truth)


def test_nobody_labelled_anything() -> None:
    empty = np.zeros((2, 4, 4), np.uint8)
    res = assess_annotations([empty, empty, empty])
    assert res.agreement == 1.0 and not res.flagged and res.labels == ()
    assert not res.consensus.any()


def test_pairwise_agreement_mean_and_min() -> None:
    a = np.zeros((1, 1, 10), np.uint8)
    a[..., :4] = 1
    b, c = a.copy(), np.zeros_like(a)
    c[..., :2] = 1
    (la,) = pairwise_agreement({"a": a, "b": b, "c": c})
    assert [p[:2] for p in la.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [p[2] for p in la.pairs] == pytest.approx([1.0, 4 / 6, 4 / 6])
    assert la.mean_dice == pytest.approx((1 + 4 / 6 + 4 / 6) / 3)
    assert la.min_dice == pytest.approx(4 / 6)


def test_majority_vote() -> None:
    a = np.array([[[1, 1, 0, 2, 2, 0]]], np.uint8)
    b = np.array([[[1, 0, 0, 2, 0, 1]]], np.uint8)
    c = np.array([[[1, 1, 2, 0, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(majority_vote([a, b, c])[0, 0], [1, 1, 0, 2, 0, 0])
    # Two annotators: the intersection of each label; an even split is background.
    np.testing.assert_array_equal(majority_vote([a, b])[0, 0], [1, 0, 0, 2, 0, 0])
    np.testing.assert_array_equal(majority_vote([a, b, c, c])[0, 0], [1, 1, 0, 0, 0, 0])
    # Restricting the labels drops the others.
    np.testing.assert_array_equal(majority_vote([a, b, c], labels=[2])[0, 0], [0, 0, 0, 2, 0, 0])


def test_staple_recovers_truth_better_than_the_worst_annotator(truth: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    annotators = {
        "good": _noisy(truth, rng, miss=0.05, extra=0.05),
        "wide": dilate(truth),  # systematically generous outline
        "poor": _noisy(erode(truth), rng, miss=0.3, extra=0.6),
    }
    scores = {k: dice_per_label(v, truth, [1])[1] for k, v in annotators.items()}
    consensus, results = staple(annotators)
    got = dice_per_label(consensus, truth, [1])[1]
    assert got > min(scores.values()) + 0.1, (got, scores)
    assert got >= 0.9, (got, scores)
    r = results[1]
    assert r.converged and 1 < r.iterations <= 100
    sens = dict(zip(annotators, r.sensitivity, strict=True))
    spec = dict(zip(annotators, r.specificity, strict=True))
    # STAPLE finds who is who: the eroded, noisy reader misses most, the wide one over-calls.
    assert sens["poor"] < sens["good"] and sens["poor"] < sens["wide"]
    assert spec["wide"] < spec["good"]
    assert r.probability.dtype == np.float32 and r.probability.shape == truth.shape
    np.testing.assert_array_equal(r.mask(), consensus)


def _staple_per_voxel(d: np.ndarray, prior: float, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook STAPLE over voxels (R, N), the reference for the pattern-count version."""
    p = np.full(d.shape[0], 0.99)
    q = np.full(d.shape[0], 0.99)
    for _ in range(iters):
        a = prior * np.prod(np.where(d == 1, p[:, None], 1 - p[:, None]), axis=0)
        b = (1 - prior) * np.prod(np.where(d == 0, q[:, None], 1 - q[:, None]), axis=0)
        w = a / (a + b)
        p = (w * d).sum(1) / w.sum()
        q = ((1 - w) * (1 - d)).sum(1) / (1 - w).sum()
    return p, q


def test_staple_matches_the_textbook_iteration() -> None:
    rng = np.random.default_rng(3)
    truth = (rng.random((4, 10, 10)) < 0.3).astype(np.uint8)
    decisions = [np.where(rng.random(truth.shape) < e, 1 - truth, truth) for e in (0.05, 0.1, 0.3)]
    res = staple_binary(decisions, max_iterations=25, tolerance=0.0)
    prior = float(np.mean([d.mean() for d in decisions]))
    p, q = _staple_per_voxel(np.stack([d.ravel() for d in decisions]), prior, 25)
    np.testing.assert_allclose(res.sensitivity, p, rtol=1e-9)
    np.testing.assert_allclose(res.specificity, q, rtol=1e-9)
    assert res.prior == pytest.approx(prior) and res.iterations == 25 and not res.converged


def test_staple_of_nothing_and_of_identical_annotators(truth: np.ndarray) -> None:
    empty = np.zeros((2, 3, 3), bool)
    res = staple_binary([empty, empty])
    assert res.prior == 0.0 and not res.probability.any() and res.converged
    same = staple_binary([truth, truth, truth])
    np.testing.assert_array_equal(same.mask(), truth)


def test_staple_multi_label_picks_the_likelier_label() -> None:
    a = np.array([[[1, 1, 2, 2, 0, 0, 0, 0]]], np.uint8)
    consensus, results = staple([a, a, a])
    np.testing.assert_array_equal(consensus, a)
    assert set(results) == {1, 2}


@pytest.mark.parametrize(
    ("masks", "kwargs", "message"),
    [
        ([], {}, "at least one annotator"),
        ([np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8)], {}, "same shape"),
        ([np.zeros((2, 2, 2), np.float32)], {}, "integer label numbers"),
        ([np.full((2, 2, 2), -1, np.int16)], {}, "must be >= 0"),
        ([np.zeros((2, 2, 2), np.uint8)], {"threshold": 1.5}, "threshold must be in"),
        ([np.zeros((2, 2, 2), np.uint8)], {"method": "vote"}, "'vote' is not a valid"),
        ([np.zeros((2, 2, 2), np.uint8)], {"labels": [0]}, "label numbers are >= 1"),
    ],
)
def test_assess_annotations_invalid(masks: list[np.ndarray], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assess_annotations(masks, **kwargs)


def test_staple_binary_invalid() -> None:
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        staple_binary([np.array([0, 2])])


def test_pairwise_agreement_needs_two() -> None:
    with pytest.raises(ValueError, match="needs two or more annotators"):
        pairwise_agreement([np.zeros((1, 1, 1), np.uint8)])


def test_labels_from_seg_round_trip(tmp_path: Path) -> None:
    """Two annotators' SEGs, read back onto the source instances, give the agreement."""
    st = make_ct_study(seed=9401, n_slices=12, rows=64, columns=64, lesion_radius_mm=(5.0, 9.0))
    vol = assemble_volume(st.datasets)
    lesion = SegmentSpec(1, "Lesion", ("SCT", "49755003", "Morphologically Abnormal Structure"),
                         ("SCT", "108369006", "Neoplasm"), (255, 64, 0), algorithm_type="MANUAL")
    device = DeviceSpec(manufacturer="reader workstation", manufacturer_model_name="viewer",
                        software_versions="1", device_serial_number="ws-1")
    algorithm = AlgorithmSpec(name="manual", version="1", source="tests", parameters={})
    annotated = {"ae-reader1": st.mask, "ae-reader2": dilate(st.mask)}
    read_back = {}
    for n, (ae, mask) in enumerate(annotated.items()):
        seg = build_seg(
            vol.headers, mask, [lesion], algorithm, device=device,
            series_instance_uid=derived_uid("learning", ae, "series"),
            sop_instance_uid=derived_uid("learning", ae, "sop"), series_number=900 + n,
            content_datetime=dt.datetime(2026, 3, 1, 12, 0),
        )
        path = tmp_path / f"{ae}.dcm"
        seg.save_as(path, enforce_file_format=True)
        read_back[ae], _ = read_seg(dcmread(path), vol.sop_instance_uids)
    res = assess_annotations(read_back, threshold=0.9)
    expected = dice_per_label(st.mask, dilate(st.mask), [1])[1]
    assert res.agreement == pytest.approx(expected)
    assert res.flagged  # a one-pixel-wider outline of small lesions is a real disagreement
    np.testing.assert_array_equal(res.consensus, st.mask)  # two readers: the intersection

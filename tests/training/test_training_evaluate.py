"""Dice, bootstrap intervals and the evaluation over cases."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.training.data import Case, phantom_cases
from dicomnode.training.evaluate import (
    bootstrap_ci,
    dice,
    evaluate,
    paired_bootstrap_ci,
    threshold_predictor,
)


def test_dice() -> None:
    a = np.array([0, 1, 1, 0, 2], np.uint8)
    b = np.array([0, 1, 0, 0, 2], np.uint8)
    assert dice(a, b) == pytest.approx(2 / 3)
    assert dice(a, b, label=2) == 1.0
    assert dice(a, b, label=3) == 1.0  # absent in both


def test_bootstrap_ci() -> None:
    values = np.random.default_rng(0).normal(0.8, 0.05, size=40)
    lo, hi = bootstrap_ci(values, seed=1)
    assert lo < values.mean() < hi and hi - lo < 0.05
    assert bootstrap_ci(values, seed=1) == (lo, hi)  # seeded
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    lo_m, hi_m = bootstrap_ci(values, statistic=np.median, n_resamples=200)
    assert lo_m < np.median(values) < hi_m
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])


def test_paired_bootstrap_ci() -> None:
    base = np.random.default_rng(0).uniform(0.6, 0.9, size=30)
    lo, hi = paired_bootstrap_ci(base + 0.02, base)
    assert (lo, hi) == pytest.approx((0.02, 0.02))
    with pytest.raises(ValueError, match="3 candidate scores vs 2 baseline"):
        paired_bootstrap_ci([1, 2, 3], [1, 2])


def test_evaluate_perfect_and_threshold() -> None:
    cases = phantom_cases(
        range(300, 303), n_slices=12, rows=64, columns=64, lesion_radius_mm=(5.0, 8.0)
    )
    perfect = {id(c.volume): c.mask for c in cases}
    ev = evaluate(cases, lambda v, s: perfect[id(v)])
    assert ev.mean == {1: 1.0} and ev.pooled == {1: 1.0} and ev.ci[1] == pytest.approx((1.0, 1.0))
    # The fixed threshold also takes the vessels (and, unsmoothed, the noise): far from perfect.
    smooth = evaluate(cases, threshold_predictor(80.0, smooth=3))
    raw = evaluate(cases, threshold_predictor(80.0))
    assert raw.mean[1] < smooth.mean[1] < 0.85
    assert len(ev.values(1)) == 3


def test_evaluate_wrong_shape() -> None:
    case = Case(
        np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), (1.0, 1.0, 1.0), "c1"
    )
    with pytest.raises(ValueError, match=r"case 'c1': prediction \(2, 4\)"):
        evaluate([case], lambda v, s: np.zeros((2, 4), np.uint8))

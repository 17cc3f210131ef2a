"""The promotion gate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicomnode.training.evaluate import CaseScore, Evaluation
from dicomnode.training.gate import GatePolicy, decide, decide_evaluations

RNG = np.random.default_rng(0)
ACTIVE = np.clip(0.70 + 0.05 * RNG.standard_normal(20), 0, 1)


def test_clearly_better_candidate_is_promoted() -> None:
    cand = np.clip(ACTIVE + 0.15 + 0.02 * RNG.standard_normal(20), 0, 1)
    d = decide({1: cand}, {1: ACTIVE}, GatePolicy(margin=0.05))
    assert d.promote
    assert d.difference == pytest.approx(float((cand - ACTIVE).mean()))
    assert d.difference_ci is not None and d.difference_ci[0] > 0
    assert d.reason.startswith("candidate ") and "CI above 0" in d.reason
    assert d.n_cases == 20 and d.labels == (1,)


def test_worse_candidate_is_rejected_with_reason() -> None:
    d = decide({1: ACTIVE - 0.1}, {1: ACTIVE}, GatePolicy(margin=0.02))
    assert not d.promote
    assert "mean improvement -0.1000 < margin 0.0200" in d.reason
    assert "does not exclude 0" in d.reason


@pytest.mark.parametrize("margin", [0.0, 0.02])
def test_equal_candidate_is_rejected(margin: float) -> None:
    d = decide({1: ACTIVE}, {1: ACTIVE.copy()}, GatePolicy(margin=margin))
    assert not d.promote and d.difference == 0.0
    assert d.difference_ci == (0.0, 0.0)
    assert "does not exclude 0" in d.reason


def test_improvement_below_margin_is_rejected() -> None:
    d = decide({1: ACTIVE + 0.01}, {1: ACTIVE}, GatePolicy(margin=0.02))
    assert not d.promote
    assert d.difference_ci is not None and d.difference_ci[0] > 0  # real, but too small
    assert "< margin" in d.reason and "does not exclude 0" not in d.reason


def test_noisy_improvement_is_rejected() -> None:
    rng = np.random.default_rng(1)
    noise = np.clip(ACTIVE + 0.03 + 0.3 * rng.standard_normal(20), 0, 1)
    d = decide({1: noise}, {1: ACTIVE}, GatePolicy(margin=0.0))
    assert not d.promote and "does not exclude 0" in d.reason


def test_no_active_model_first_promotion() -> None:
    d = decide({1: [0.8, 0.9, 0.85]}, None, GatePolicy(floor=0.6))
    assert d.promote and d.active_mean is None and d.difference is None
    assert d.reason.startswith("no active model; candidate mean Dice 0.8500")
    low = decide({1: [0.3, 0.4, 0.5]}, None, GatePolicy(floor=0.6))
    assert not low.promote
    assert low.reason == "no active model; candidate mean Dice 0.4000 below the floor 0.6000"


def test_floor_applies_with_an_active_model_too() -> None:
    d = decide({1: ACTIVE * 0.3 + 0.2}, {1: ACTIVE * 0.3}, GatePolicy(floor=0.5))
    assert not d.promote and "below the floor" in d.reason


def test_too_few_cases() -> None:
    d = decide({1: [0.9, 0.9]}, {1: [0.1, 0.1]}, GatePolicy(min_cases=3))
    assert not d.promote and "only 2 test cases, 3 needed" in d.reason


def test_a_label_that_gets_worse_blocks_promotion() -> None:
    cand = {1: ACTIVE * 0.5 + 0.5, 2: ACTIVE - 0.1}
    act = {1: ACTIVE * 0.5, 2: ACTIVE}
    d = decide(cand, act, GatePolicy(margin=0.02, max_label_drop=0.05))
    assert d.difference is not None and d.difference > 0.02
    assert not d.promote and "label(s) worse by more than 0.0500: 2 (-0.1000)" in d.reason
    assert d.label_differences == pytest.approx({1: 0.5, 2: -0.1})


def test_per_case_score_is_the_mean_over_labels() -> None:
    d = decide({1: [1.0, 0.5, 0.9], 2: [0.0, 0.5, 0.7]}, None, GatePolicy(floor=0.0))
    assert d.candidate_mean == pytest.approx(np.mean([0.5, 0.5, 0.8]))
    assert d.candidate_label_means == pytest.approx({1: 0.8, 2: 0.4})


def test_decision_is_reproducible_and_json_ready() -> None:
    cand = np.clip(ACTIVE + 0.05 + 0.05 * RNG.standard_normal(20), 0, 1)
    a = decide({1: cand}, {1: ACTIVE})
    assert a == decide({1: cand}, {1: ACTIVE})
    d = json.loads(json.dumps(a.as_dict()))
    assert d["promote"] == a.promote and d["policy"]["margin"] == 0.02
    assert d["label_differences"] == {"1": a.label_differences[1]}  # type: ignore[index]


def test_empty_test_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="no test cases"):
        decide({1: []}, {1: []})


def test_unpaired_scores_are_an_error() -> None:
    with pytest.raises(ValueError, match="do not pair up"):
        decide({1: [0.5, 0.6, 0.7]}, {1: [0.5, 0.6]})


def test_other_labels_are_an_error() -> None:
    with pytest.raises(ValueError, match="do not pair up"):
        decide({1: [0.5, 0.6, 0.7]}, {2: [0.5, 0.6, 0.7]})


def test_scores_out_of_range_are_an_error() -> None:
    with pytest.raises(ValueError, match="finite and in"):
        decide({1: [0.5, float("nan"), 0.7]}, None)


def test_no_labels_is_an_error() -> None:
    with pytest.raises(ValueError, match="no labels scored"):
        decide({}, None)


def test_policy_invalid() -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        GatePolicy(confidence=1.0)


def _evaluation(ids: list[str], values: list[float]) -> Evaluation:
    per_case = tuple(CaseScore(i, {1: v}) for i, v in zip(ids, values, strict=True))
    m = float(np.mean(values))
    return Evaluation(per_case, {1: m}, {1: (m, m)}, {1: m})


def test_decide_evaluations() -> None:
    ids = ["s1", "s2", "s3", "s4"]
    d = decide_evaluations(_evaluation(ids, [0.9, 0.92, 0.88, 0.95]),
                           _evaluation(ids, [0.6, 0.65, 0.5, 0.7]))
    assert d.promote and d.n_cases == 4
    with pytest.raises(ValueError, match="evaluated on different cases"):
        decide_evaluations(_evaluation(ids, [0.9] * 4), _evaluation(ids[::-1], [0.6] * 4))

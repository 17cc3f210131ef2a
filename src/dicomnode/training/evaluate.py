"""Held-out metrics for model promotion: Dice per label per case, bootstrap intervals.

The model under test is any ``predict(volume, spacing) -> label mask`` callable.
For a model package, pass the serving runtime's
``dicomnode.inference.OnnxModel.load(path).predict_mask`` so the gate measures
exactly what the node will run (this package may not import the inference side
itself; the composition root wires the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dicomnode.training.data import Case

__all__ = [
    "CaseScore",
    "Evaluation",
    "Predictor",
    "bootstrap_ci",
    "dice",
    "evaluate",
    "paired_bootstrap_ci",
    "threshold_predictor",
]

Predictor = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]


def dice(pred: np.ndarray, truth: np.ndarray, label: int = 1) -> float:
    """Dice coefficient of ``label`` between two label masks; 1.0 when both lack it."""
    p, t = pred == label, truth == label
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


@dataclass(frozen=True)
class CaseScore:
    """Dice per label for one case (label number → Dice)."""

    case_id: str
    dice: dict[int, float]


@dataclass(frozen=True)
class Evaluation:
    """Dice over a set of cases.

    ``mean``: mean over cases of the per-case Dice, with a percentile bootstrap
    interval over cases in ``ci``. ``pooled``: one Dice over all voxels of all
    cases (large lesions weigh more).
    """

    per_case: tuple[CaseScore, ...]
    mean: dict[int, float]
    ci: dict[int, tuple[float, float]]
    pooled: dict[int, float]

    def values(self, label: int) -> np.ndarray:
        """Per-case Dice of ``label``, in case order (for paired comparisons)."""
        return np.array([c.dice[label] for c in self.per_case])


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over ``values``.

    Resamples the values (cases) with replacement. With fewer than two values
    the interval is the statistic itself (no spread can be estimated).

    Raises
    ------
    ValueError
        No values, or ``confidence`` not in (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if v.size < 2:
        s = float(statistic(v))
        return s, s
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_resamples, v.size))
    stats = (
        np.array([statistic(v[i]) for i in idx])
        if statistic is not np.mean
        else v[idx].mean(axis=1)
    )
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    candidate: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    **kwargs: object,
) -> tuple[float, float]:
    """Bootstrap interval of mean(candidate - baseline) over the same cases.

    For a promotion gate: promote when the lower bound is above a margin.

    Raises
    ------
    ValueError
        The two do not have the same number of cases.
    """
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"paired_bootstrap_ci: {a.size} candidate scores vs {b.size} baseline scores"
        )
    return bootstrap_ci(a - b, **kwargs)  # type: ignore[arg-type]


def evaluate(
    cases: Sequence[Case],
    predict: Predictor,
    labels: Sequence[int] = (1,),
    *,
    confidence: float = 0.95,
    seed: int = 0,
) -> Evaluation:
    """Dice per label of ``predict`` on every case.

    Parameters
    ----------
    cases
        Held-out labelled volumes (never used in training).
    predict
        ``(volume, spacing) -> (z, y, x)`` label mask, e.g. ``OnnxModel.predict_mask``.
    labels
        Label numbers to score.

    Raises
    ------
    ValueError
        No cases, or a prediction of the wrong shape.
    """
    if not cases:
        raise ValueError("evaluate: no cases")
    scores, inter, total = [], dict.fromkeys(labels, 0), dict.fromkeys(labels, 0)
    for case in cases:
        pred = np.asarray(predict(case.volume, case.spacing))
        if pred.shape != case.mask.shape:
            raise ValueError(
                f"case {case.case_id!r}: prediction {pred.shape}, mask {case.mask.shape}"
            )
        scores.append(CaseScore(case.case_id, {lb: dice(pred, case.mask, lb) for lb in labels}))
        for lb in labels:
            p, t = pred == lb, case.mask == lb
            inter[lb] += int((p & t).sum())
            total[lb] += int(p.sum()) + int(t.sum())
    per_case = tuple(scores)
    mean = {lb: float(np.mean([s.dice[lb] for s in per_case])) for lb in labels}
    ci = {
        lb: bootstrap_ci([s.dice[lb] for s in per_case], confidence=confidence, seed=seed)
        for lb in labels
    }
    pooled = {lb: (1.0 if total[lb] == 0 else 2 * inter[lb] / total[lb]) for lb in labels}
    return Evaluation(per_case, mean, ci, pooled)


def threshold_predictor(low: float, high: float = np.inf, smooth: int = 1) -> Predictor:
    """A non-learning baseline: label 1 where ``low <= value < high``.

    ``smooth`` > 1 first averages each slice over a ``smooth`` x ``smooth`` box
    (noise suppression, so the baseline is not strawman-weak).
    """

    def predict(volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        v = np.asarray(volume, np.float32)
        if smooth > 1:
            pad = smooth // 2
            p = np.pad(v, ((0, 0), (pad, smooth - 1 - pad), (pad, smooth - 1 - pad)), mode="edge")
            c = p.astype(np.float64).cumsum(1).cumsum(2)  # float32 sums lose whole HU
            c = np.pad(c, ((0, 0), (1, 0), (1, 0)))
            y, x = v.shape[1], v.shape[2]
            v = (
                c[:, smooth:, smooth:] - c[:, :y, smooth:] - c[:, smooth:, :x] + c[:, :y, :x]
            ) / smooth**2
        return ((v >= low) & (v < high)).astype(np.uint8)

    return predict

"""The promotion gate: does a candidate model replace the active one?

Both models are scored on the *same* held-out test cases (Dice per label per case,
e.g. :func:`dicomnode.training.evaluate.evaluate` through the serving runtime).
Each case's score is the mean of its per-label Dice. With n cases, candidate scores
c_i, active scores a_i and per-label differences d_l = mean_i(Dice_c,l,i - Dice_a,l,i):

**With an active model**, promote if and only if all of

1. ``n >= min_cases``;
2. ``mean_i(c_i - a_i) >= margin``  (the improvement is worth a new version);
3. ``lower > 0``, where (lower, upper) is the paired percentile bootstrap interval of
   mean(c - a) over cases (:func:`~dicomnode.training.evaluate.paired_bootstrap_ci`,
   ``confidence``, ``n_resamples``, ``seed``): the improvement is not noise;
4. ``min_l d_l >= -max_label_drop``  (no label gets clearly worse for the others' gain);
5. ``mean_i c_i >= floor``  (never promote something below the absolute floor).

**Without an active model** (the first one): promote if and only if ``n >= min_cases``
and ``mean_i c_i >= floor``.

Anything else is a rejection, with every failed condition in the reason. Equal
models are therefore always rejected: their differences are all 0, so condition 3
fails even with ``margin = 0``. No test cases at all is not a decision but an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dicomnode.training.evaluate import Evaluation, bootstrap_ci, paired_bootstrap_ci

__all__ = ["GateDecision", "GatePolicy", "decide", "decide_evaluations"]


@dataclass(frozen=True)
class GatePolicy:
    """The gate's settings (see the module docstring for the exact rule)."""

    margin: float = 0.02
    """Minimum mean improvement of the per-case score (Dice), candidate - active."""
    floor: float = 0.5
    """Minimum mean score of any promoted candidate, the first one included."""
    max_label_drop: float = 0.05
    """Largest tolerated drop of one label's mean Dice."""
    min_cases: int = 3
    """Fewer test cases reject the candidate (too little evidence)."""
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    """Seed of the bootstrap resampling (decisions are reproducible)."""

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.margin < 0 or self.max_label_drop < 0:
            raise ValueError(
                f"margin and max_label_drop must be >= 0, got {self.margin}, "
                f"{self.max_label_drop}"
            )
        if not 0 <= self.floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")
        if self.min_cases < 1 or self.n_resamples < 1:
            raise ValueError(
                f"min_cases and n_resamples must be >= 1, got {self.min_cases}, "
                f"{self.n_resamples}"
            )


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the figures it rests on."""

    promote: bool
    reason: str
    n_cases: int
    labels: tuple[int, ...]
    candidate_mean: float
    """Mean per-case score (mean Dice over labels) of the candidate."""
    candidate_ci: tuple[float, float]
    """Bootstrap interval of ``candidate_mean``."""
    candidate_label_means: dict[int, float]
    active_mean: float | None
    active_label_means: dict[int, float] | None
    difference: float | None
    """mean(candidate - active) of the per-case scores; None without an active model."""
    difference_ci: tuple[float, float] | None
    label_differences: dict[int, float] | None
    policy: GatePolicy

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (label keys become strings), for the registry's metrics."""

        def keys(d: Mapping[int, float] | None) -> dict[str, float] | None:
            return None if d is None else {str(k): v for k, v in d.items()}

        return {
            "promote": self.promote,
            "reason": self.reason,
            "n_cases": self.n_cases,
            "labels": list(self.labels),
            "candidate_mean": self.candidate_mean,
            "candidate_ci": list(self.candidate_ci),
            "candidate_label_means": keys(self.candidate_label_means),
            "active_mean": self.active_mean,
            "active_label_means": keys(self.active_label_means),
            "difference": self.difference,
            "difference_ci": None if self.difference_ci is None else list(self.difference_ci),
            "label_differences": keys(self.label_differences),
            "policy": asdict(self.policy),
        }


def _matrix(name: str, scores: Mapping[int, Sequence[float]]) -> tuple[tuple[int, ...], np.ndarray]:
    """(labels, (n_labels, n_cases) array), checked."""
    if not scores:
        raise ValueError(f"{name}: no labels scored")
    labels = tuple(sorted(int(k) for k in scores))
    rows = [np.asarray(scores[k], np.float64) for k in sorted(scores)]
    lengths = {lb: r.shape for lb, r in zip(labels, rows, strict=True)}
    if any(r.ndim != 1 for r in rows) or len({r.size for r in rows}) != 1:
        raise ValueError(f"{name}: every label needs one score per case, got shapes {lengths}")
    m = np.stack(rows)
    if m.shape[1] == 0:
        raise ValueError(
            f"{name}: no test cases; the gate needs held-out cases scored by both models"
        )
    if not np.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise ValueError(f"{name}: Dice values must be finite and in [0, 1]")
    return labels, m


def decide(
    candidate: Mapping[int, Sequence[float]],
    active: Mapping[int, Sequence[float]] | None,
    policy: GatePolicy | None = None,
) -> GateDecision:
    """Apply the promotion gate to per-case Dice scores.

    Parameters
    ----------
    candidate
        label -> Dice per test case (the same case order for every label).
    active
        The active model's scores on the same cases in the same order, or None
        when there is no active model.
    policy
        Margin, floor and bootstrap settings; defaults to ``GatePolicy()``.

    Returns
    -------
    GateDecision

    Raises
    ------
    ValueError
        No test cases, no labels, scores outside [0, 1], or candidate and active
        scores that do not pair up (other labels or another number of cases).
    """
    policy = policy or GatePolicy()
    labels, cm = _matrix("candidate", candidate)
    n = cm.shape[1]
    c_case = cm.mean(axis=0)
    c_mean = float(c_case.mean())
    boot = {"confidence": policy.confidence, "n_resamples": policy.n_resamples,
            "seed": policy.seed}
    c_ci = bootstrap_ci(c_case, **boot)  # type: ignore[arg-type]
    c_labels = {lb: float(cm[i].mean()) for i, lb in enumerate(labels)}
    failed: list[str] = []
    if n < policy.min_cases:
        failed.append(f"only {n} test cases, {policy.min_cases} needed")
    if c_mean < policy.floor:
        failed.append(f"candidate mean Dice {c_mean:.4f} below the floor {policy.floor:.4f}")
    if active is None:
        ok = not failed
        reason = (
            f"no active model; candidate mean Dice {c_mean:.4f} "
            f"[{c_ci[0]:.4f}, {c_ci[1]:.4f}] on {n} cases >= floor {policy.floor:.4f}"
            if ok else "no active model; " + "; ".join(failed)
        )
        return GateDecision(ok, reason, n, labels, c_mean, c_ci, c_labels,
                            None, None, None, None, None, policy)
    a_labels_tuple, am = _matrix("active", active)
    if a_labels_tuple != labels or am.shape != cm.shape:
        raise ValueError(
            f"candidate and active scores do not pair up: labels {labels} vs "
            f"{a_labels_tuple}, {n} vs {am.shape[1]} cases"
        )
    a_case = am.mean(axis=0)
    a_mean = float(a_case.mean())
    diff = float((c_case - a_case).mean())
    lo, hi = paired_bootstrap_ci(c_case, a_case, **boot)
    a_labels = {lb: float(am[i].mean()) for i, lb in enumerate(labels)}
    label_diff = {lb: float((cm[i] - am[i]).mean()) for i, lb in enumerate(labels)}
    if diff < policy.margin:
        failed.append(f"mean improvement {diff:+.4f} < margin {policy.margin:.4f}")
    if not lo > 0:
        failed.append(
            f"{policy.confidence:.0%} CI of the improvement [{lo:+.4f}, {hi:+.4f}] "
            "does not exclude 0"
        )
    dropped = {lb: d for lb, d in label_diff.items() if d < -policy.max_label_drop}
    if dropped:
        failed.append(
            "label(s) worse by more than "
            f"{policy.max_label_drop:.4f}: "
            + ", ".join(f"{lb} ({d:+.4f})" for lb, d in dropped.items())
        )
    ok = not failed
    summary = (
        f"candidate {c_mean:.4f} vs active {a_mean:.4f}, improvement {diff:+.4f} "
        f"[{lo:+.4f}, {hi:+.4f}] on {n} cases"
    )
    reason = (
        f"{summary}: >= margin {policy.margin:.4f} and CI above 0" if ok
        else f"{summary}: " + "; ".join(failed)
    )
    return GateDecision(ok, reason, n, labels, c_mean, c_ci, c_labels, a_mean, a_labels,
                        diff, (lo, hi), label_diff, policy)


def decide_evaluations(
    candidate: Evaluation,
    active: Evaluation | None,
    policy: GatePolicy | None = None,
) -> GateDecision:
    """:func:`decide` on two :class:`~dicomnode.training.evaluate.Evaluation` results.

    Raises
    ------
    ValueError
        The evaluations cover different cases (by ``case_id``, in order), or as
        :func:`decide`.
    """

    def scores(ev: Evaluation) -> dict[int, list[float]]:
        labels = sorted(ev.mean)
        return {lb: [c.dice[lb] for c in ev.per_case] for lb in labels}

    if active is not None:
        ids_c = [c.case_id for c in candidate.per_case]
        ids_a = [c.case_id for c in active.per_case]
        if ids_c != ids_a:
            raise ValueError(
                "candidate and active were evaluated on different cases "
                f"({len(ids_c)} vs {len(ids_a)}, or in another order)"
            )
    return decide(scores(candidate), None if active is None else scores(active), policy)

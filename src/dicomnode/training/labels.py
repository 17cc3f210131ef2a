"""Ground truth from several annotators: agreement, consensus, and the review flag.

Each annotator's SEG, read back with :func:`dicomnode.dicom.seg.read_seg` onto the
source instances, is a label map: a (z, y, x) integer array aligned to the same
volume, 0 = background, 1..n = segment (label) numbers. From several of them this
module computes

- **agreement**: the Dice coefficient of every label between every pair of
  annotators (:func:`pairwise_agreement`); a study's agreement is the *lowest*
  per-label mean pairwise Dice, so one badly disputed label is enough to flag it;
- **consensus**: by strict majority vote (:func:`majority_vote`) or by STAPLE
  (:func:`staple`, binary STAPLE per label, :func:`staple_binary`);
- the **review decision** (:func:`assess_annotations`): ``flagged = agreement <
  threshold``, with the reason in words. Flagged studies are left out of training
  by default (:func:`dicomnode.training.retrain.retrain`).

Pure numpy: no database, no torch. Dice of a label absent from both masks is 1.0
(they agree there is none), as in :func:`dicomnode.training.evaluate.dice`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AnnotationAssessment",
    "ConsensusMethodValues",
    "LabelAgreement",
    "StapleResult",
    "assess_annotations",
    "dice_per_label",
    "majority_vote",
    "pairwise_agreement",
    "staple",
    "staple_binary",
]

Masks = Mapping[str, np.ndarray] | Sequence[np.ndarray]
"""Annotator label maps: by annotator id, or in a sequence (ids "0", "1", ...)."""


class ConsensusMethodValues(enum.StrEnum):
    """How several annotators' label maps become one ground truth."""

    MAJORITY = "majority"
    """A voxel gets label k when strictly more than half of the annotators gave it k."""
    STAPLE = "staple"
    """Binary STAPLE per label (Warfield et al. 2004), posterior >= 0.5."""


def _named(masks: Masks) -> dict[str, np.ndarray]:
    """Annotator id -> label map, checked: at least one, same 3D shape, integer labels >= 0.

    Raises
    ------
    ValueError
        No masks, masks of different shapes, non-integer or negative labels.
    """
    named = (
        {str(k): np.asarray(v) for k, v in masks.items()}
        if isinstance(masks, Mapping)
        else {str(i): np.asarray(v) for i, v in enumerate(masks)}
    )
    if not named:
        raise ValueError("masks: at least one annotator's label map is required, got none")
    shapes = {k: v.shape for k, v in named.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        raise ValueError(f"masks: every label map must have the same shape, got {shapes}")
    for k, v in named.items():
        if v.dtype != np.bool_ and not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"masks[{k!r}]: integer label numbers expected, got dtype {v.dtype}")
        if v.size and np.issubdtype(v.dtype, np.signedinteger) and int(v.min()) < 0:
            raise ValueError(f"masks[{k!r}]: label numbers must be >= 0, got {int(v.min())}")
    return named


def _labels_of(named: Mapping[str, np.ndarray], labels: Iterable[int] | None) -> tuple[int, ...]:
    """The given labels, or every non-zero label any annotator used, ascending."""
    if labels is not None:
        out = tuple(sorted({int(lb) for lb in labels}))
        if any(lb <= 0 for lb in out):
            raise ValueError(f"labels: label numbers are >= 1, got {out}")
        return out
    found: set[int] = set()
    for v in named.values():
        found.update(int(x) for x in np.unique(v) if x != 0)
    return tuple(sorted(found))


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of each label between two label maps of the same shape.

    Returns
    -------
    dict
        label -> 2|A∩B| / (|A| + |B|); 1.0 where neither map has the label.

    Raises
    ------
    ValueError
        The maps differ in shape.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"dice_per_label: shapes differ, {a.shape} vs {b.shape}")
    out = {}
    for lb in labels:
        pa, pb = a == lb, b == lb
        denom = int(np.count_nonzero(pa)) + int(np.count_nonzero(pb))
        out[int(lb)] = 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(pa & pb)) / denom
    return out


@dataclass(frozen=True)
class LabelAgreement:
    """Pairwise Dice of one label between annotators."""

    label: int
    mean_dice: float
    """Mean over annotator pairs."""
    min_dice: float
    """The worst pair."""
    pairs: tuple[tuple[str, str, float], ...]
    """(annotator, annotator, Dice) for every unordered pair, in annotator order."""


def pairwise_agreement(
    masks: Masks, labels: Iterable[int] | None = None
) -> tuple[LabelAgreement, ...]:
    """Per-label Dice between every pair of annotators.

    Parameters
    ----------
    masks
        Two or more annotators' label maps, aligned to the same volume.
    labels
        Labels to score; None = every non-zero label any annotator used.

    Returns
    -------
    tuple of LabelAgreement
        One per label, ascending; empty when no label is used or scored.

    Raises
    ------
    ValueError
        Fewer than two annotators, or the masks are invalid (see :func:`assess_annotations`).
    """
    named = _named(masks)
    if len(named) < 2:
        raise ValueError(f"pairwise_agreement: needs two or more annotators, got {len(named)}")
    lbs = _labels_of(named, labels)
    pair_scores = {
        (i, j): dice_per_label(named[i], named[j], lbs)
        for i, j in itertools.combinations(named, 2)
    }
    out = []
    for lb in lbs:
        pairs = tuple((i, j, d[lb]) for (i, j), d in pair_scores.items())
        values = [p[2] for p in pairs]
        out.append(LabelAgreement(lb, float(np.mean(values)), float(min(values)), pairs))
    return tuple(out)


def majority_vote(masks: Masks, labels: Iterable[int] | None = None) -> np.ndarray:
    """Consensus label map by strict majority.

    A voxel gets label k when more than half of the annotators gave it k;
    otherwise it is background. A label map gives each voxel one label, so at
    most one label can hold a strict majority and the result needs no
    tie-breaking. With two annotators this is the intersection of each label;
    an exact split (2 of 4) is background, so the consensus errs towards the
    smaller structure.

    Returns
    -------
    numpy.ndarray
        (z, y, x) uint16 label map (labels outside ``labels`` are background).

    Raises
    ------
    ValueError
        Invalid masks (see :func:`assess_annotations`).
    """
    named = _named(masks)
    lbs = _labels_of(named, labels)
    n = len(named)
    shape = next(iter(named.values())).shape
    out = np.zeros(shape, np.uint16)
    for lb in lbs:
        votes = np.zeros(shape, np.uint16)
        for v in named.values():
            votes += v == lb
        out[2 * votes.astype(np.int32) > n] = lb
    return out


@dataclass(frozen=True)
class StapleResult:
    """Binary STAPLE estimate for one structure."""

    probability: np.ndarray = field(repr=False, compare=False)
    """(z, y, x) float32 posterior P(true label = 1 | all decisions) per voxel."""
    sensitivity: tuple[float, ...]
    """Estimated P(annotator says 1 | truth 1), per annotator."""
    specificity: tuple[float, ...]
    """Estimated P(annotator says 0 | truth 0), per annotator."""
    prior: float
    """P(truth 1), fixed during the iterations."""
    iterations: int
    converged: bool

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        """The consensus: uint8 1 where the posterior is >= ``threshold``."""
        return (self.probability >= threshold).astype(np.uint8)


def staple_binary(
    decisions: Sequence[np.ndarray],
    *,
    prior: float | None = None,
    initial_sensitivity: float = 0.99,
    initial_specificity: float = 0.99,
    max_iterations: int = 100,
    tolerance: float = 1e-7,
) -> StapleResult:
    """Binary STAPLE: EM estimate of the true segmentation and each annotator's quality.

    Simultaneous Truth And Performance Level Estimation, S. K. Warfield, K. H. Zou,
    W. M. Wells, IEEE TMI 23(7):903-921, 2004. With decisions D_ij (annotator j,
    voxel i), sensitivities p_j, specificities q_j and the prior g = P(T_i = 1):

    - E-step: W_i = g a_i / (g a_i + (1 - g) b_i) with
      a_i = prod_j p_j^D_ij (1 - p_j)^(1 - D_ij) and
      b_i = prod_j q_j^(1 - D_ij) (1 - q_j)^D_ij (in log space);
    - M-step: p_j = sum_i W_i D_ij / sum_i W_i,
      q_j = sum_i (1 - W_i)(1 - D_ij) / sum_i (1 - W_i);
    - until no p_j or q_j moves by more than ``tolerance``.

    The prior is fixed, by default to the mean fraction of voxels the annotators
    labelled (as ITK's STAPLEImageFilter does). W depends on a voxel only through its
    pattern of decisions, so the iterations run over the distinct patterns (at most
    2^R, weighted by their counts) rather than the voxels: the cost per iteration
    does not grow with the volume.

    The estimate is taken over the whole volume: voxels every annotator left empty
    count as agreed background, which makes specificities close to 1. What it does
    not guarantee: with two annotators the problem is nearly symmetric and STAPLE can
    do no better than trusting whichever annotator it finds more consistent; with
    many annotators that share a bias it reproduces that bias.

    Parameters
    ----------
    decisions
        One binary (or boolean) array per annotator, all of the same shape.
    prior
        P(truth = 1); None = the mean labelled fraction.
    initial_sensitivity, initial_specificity
        Starting values for every annotator, in (0.5, 1).
    max_iterations, tolerance
        Stop criteria.

    Returns
    -------
    StapleResult

    Raises
    ------
    ValueError
        No decisions, shapes differ, values other than 0/1, more than 62
        annotators, or a start value or prior outside its range.
    """
    if not decisions:
        raise ValueError("staple_binary: decisions: at least one annotator is required")
    if len(decisions) > 62:
        raise ValueError(f"staple_binary: at most 62 annotators, got {len(decisions)}")
    arrays = [np.asarray(d) for d in decisions]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(
            f"staple_binary: decisions must share one shape, got {[a.shape for a in arrays]}"
        )
    for j, a in enumerate(arrays):
        if a.dtype != np.bool_ and a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"staple_binary: decisions[{j}] holds values other than 0 and 1")
    for name, value in (
        ("initial_sensitivity", initial_sensitivity),
        ("initial_specificity", initial_specificity),
    ):
        if not 0.5 < value < 1:
            raise ValueError(f"staple_binary: {name} must be in (0.5, 1), got {value}")
    r = len(arrays)
    # Pack every voxel's R decisions into one integer: its pattern.
    codes = np.zeros(shape, np.int64)
    for j, a in enumerate(arrays):
        codes |= a.astype(np.int64) << j
    patterns, inverse, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
    bits = ((patterns[:, None] >> np.arange(r)) & 1).astype(np.float64)  # (P, R)
    weights = counts.astype(np.float64)
    frac = float((bits * weights[:, None]).sum() / (weights.sum() * r)) if codes.size else 0.0
    g = frac if prior is None else float(prior)
    if not 0 <= g <= 1:
        raise ValueError(f"staple_binary: prior must be in [0, 1], got {g}")
    if g in (0.0, 1.0):
        # Nothing (or everything) labelled: the truth is certain, qualities are moot.
        prob = np.full(shape, g, np.float32)
        ones = (1.0,) * r
        return StapleResult(prob, ones, ones, g, 0, True)
    p = np.full(r, initial_sensitivity)
    q = np.full(r, initial_specificity)
    eps = 1e-10  # keeps the logs finite when an annotator is perfect or hopeless
    log_g, log_1g = np.log(g), np.log1p(-g)
    w = np.zeros(len(patterns))
    converged, it = False, 0
    for it in range(1, max_iterations + 1):  # noqa: B007 - `it` is reported
        pc, qc = np.clip(p, eps, 1 - eps), np.clip(q, eps, 1 - eps)
        log_a = log_g + bits @ np.log(pc) + (1 - bits) @ np.log1p(-pc)
        log_b = log_1g + (1 - bits) @ np.log(qc) + bits @ np.log1p(-qc)
        w = 1.0 / (1.0 + np.exp(np.clip(log_b - log_a, -700, 700)))
        tw, tb = weights * w, weights * (1 - w)
        p_new = (tw @ bits) / max(tw.sum(), eps)
        q_new = (tb @ (1 - bits)) / max(tb.sum(), eps)
        delta = max(np.abs(p_new - p).max(), np.abs(q_new - q).max())
        p, q = p_new, q_new
        if delta < tolerance:
            converged = True
            break
    # W for the final parameters (the loop's W belongs to the previous ones).
    pc, qc = np.clip(p, eps, 1 - eps), np.clip(q, eps, 1 - eps)
    log_a = log_g + bits @ np.log(pc) + (1 - bits) @ np.log1p(-pc)
    log_b = log_1g + (1 - bits) @ np.log(qc) + bits @ np.log1p(-qc)
    w = 1.0 / (1.0 + np.exp(np.clip(log_b - log_a, -700, 700)))
    prob = w.astype(np.float32)[inverse].reshape(shape)
    return StapleResult(
        prob,
        tuple(float(x) for x in p),
        tuple(float(x) for x in q),
        g,
        it,
        converged,
    )


def staple(
    masks: Masks, labels: Iterable[int] | None = None, **options: float
) -> tuple[np.ndarray, dict[int, StapleResult]]:
    """Consensus label map by binary STAPLE per label.

    Each label is estimated on its own (:func:`staple_binary` on "annotator gave
    this label"). A voxel gets the label of the highest posterior among those
    >= 0.5; equal posteriors go to the lower label number. Background otherwise.

    Parameters
    ----------
    masks
        One or more annotators' label maps.
    labels
        Labels to estimate; None = every non-zero label any annotator used.
    options
        Passed to :func:`staple_binary` (``prior``, ``max_iterations``, ...).

    Returns
    -------
    (label map, results)
        (z, y, x) uint16 consensus and each label's :class:`StapleResult`.

    Raises
    ------
    ValueError
        Invalid masks or options.
    """
    named = _named(masks)
    lbs = _labels_of(named, labels)
    shape = next(iter(named.values())).shape
    results = {lb: staple_binary([v == lb for v in named.values()], **options) for lb in lbs}  # type: ignore[arg-type]
    out = np.zeros(shape, np.uint16)
    best = np.full(shape, 0.5, np.float32)
    for lb in lbs:  # ascending, so ">" keeps the lower label on a tie
        prob = results[lb].probability
        take = (prob > best) | ((prob == best) & (out == 0))
        out[take], best[take] = lb, prob[take]
    return out, results


@dataclass(frozen=True)
class AnnotationAssessment:
    """Agreement, consensus and the review decision for one study's annotations."""

    annotators: tuple[str, ...]
    labels: tuple[LabelAgreement, ...]
    """Per-label pairwise agreement; empty with one annotator."""
    agreement: float | None
    """min over labels of the mean pairwise Dice; None with one annotator; 1.0 when
    nobody labelled anything."""
    threshold: float
    flagged: bool
    """True: left out of training by default until a reviewer settles it."""
    reason: str
    method: ConsensusMethodValues
    consensus: np.ndarray = field(repr=False, compare=False)
    """(z, y, x) uint16 label map: the study's ground truth."""


def assess_annotations(
    masks: Masks,
    *,
    threshold: float = 0.7,
    method: ConsensusMethodValues | str = ConsensusMethodValues.MAJORITY,
    labels: Iterable[int] | None = None,
) -> AnnotationAssessment:
    """Agreement between annotators, their consensus, and whether to flag the study.

    Rule: ``flagged = agreement < threshold`` where ``agreement`` is the lowest
    per-label mean pairwise Dice. One annotator is never flagged (no agreement can
    be measured); the consensus is then that annotator's map.

    Parameters
    ----------
    masks
        Label maps aligned to the same volume (e.g. from ``read_seg`` on the same
        source instances), by annotator id (pseudonymous, e.g. the sending AE).
    threshold
        Minimum agreement, in [0, 1].
    method
        ``"majority"`` or ``"staple"``.
    labels
        Labels to consider; None = every non-zero label any annotator used.

    Returns
    -------
    AnnotationAssessment

    Raises
    ------
    ValueError
        No masks, shapes differ, labels not non-negative integers, a threshold
        outside [0, 1] or an unknown method.
    """
    method = ConsensusMethodValues(method)
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    named = _named(masks)
    lbs = _labels_of(named, labels)
    ids = tuple(named)
    if len(named) == 1:
        only = next(iter(named.values()))
        consensus = np.where(np.isin(only, lbs), only, 0).astype(np.uint16)
        return AnnotationAssessment(
            ids, (), None, threshold, False,
            "one annotator: agreement cannot be measured; the label is taken as it is",
            method, consensus,
        )
    per_label = pairwise_agreement(named, lbs)
    agreement = min((a.mean_dice for a in per_label), default=1.0)
    if method is ConsensusMethodValues.STAPLE:
        consensus, _ = staple(named, lbs)
    else:
        consensus = majority_vote(named, lbs)
    low = [a for a in per_label if a.mean_dice < threshold]
    if low:
        parts = []
        for a in low:
            worst = min(a.pairs, key=lambda p: p[2])
            parts.append(
                f"label {a.label}: mean pairwise Dice {a.mean_dice:.3f} < {threshold:.3f} "
                f"(worst pair {worst[0]}/{worst[1]} {worst[2]:.3f})"
            )
        reason = f"{len(ids)} annotators disagree: " + "; ".join(parts)
    elif not per_label:
        reason = f"{len(ids)} annotators, none labelled anything: agreement 1.0"
    else:
        reason = (
            f"{len(ids)} annotators agree: lowest per-label mean Dice {agreement:.3f} "
            f">= {threshold:.3f}"
        )
    return AnnotationAssessment(
        ids, per_label, agreement, threshold, bool(low), reason, method, consensus
    )

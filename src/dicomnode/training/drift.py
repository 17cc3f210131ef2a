"""Drift monitor: how well did production predictions match the labels that came later?

When a label (an annotator's SEG, or the consensus of several) arrives for a study the
node already inferred, :func:`measure_drift` scores the stored production mask of the
model version that ran against it, per label. :func:`summarize_drift` turns those
records into one line per model version (n, mean, mean of the last k) for
``dicomnode models stats``; a last-k mean well below the overall mean is the sign of
drift (new scanners, protocols, populations) or of labels that disagree with the model.

What it does not say: labels arrive for the studies radiologists chose to correct,
usually the ones the model got wrong, so these figures are biased low compared with
the held-out test Dice and are for trends within one version, not for comparing
versions with each other (the promotion gate does that, on one test split).

Pure numpy; no torch, no database. Dice of a label absent from both masks is 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dicomnode.training.labels import dice_per_label

__all__ = ["DriftRecord", "DriftSummary", "format_drift_table", "measure_drift", "summarize_drift"]


@dataclass(frozen=True)
class DriftRecord:
    """One production prediction scored against its later label."""

    study_key: str
    """Pseudonymous study key."""
    model_name: str
    model_version: str
    dice: dict[int, float]
    """label -> Dice of the production mask against the label."""
    mean_dice: float
    """Mean over ``dice``; 1.0 when neither mask holds any label."""
    recorded_at: float | None = None
    """When the label arrived (epoch seconds), for display; order is the caller's."""


def measure_drift(
    prediction: np.ndarray,
    label: np.ndarray,
    *,
    study_key: str,
    model_name: str,
    model_version: str,
    labels: Iterable[int] | None = None,
    recorded_at: float | None = None,
) -> DriftRecord:
    """Dice per label of a production prediction against an arriving label.

    Parameters
    ----------
    prediction
        The (z, y, x) label map the model produced for the study (as sent in its SEG).
    label
        The ground truth aligned to the same volume (e.g. the consensus of
        :func:`dicomnode.training.labels.assess_annotations`).
    study_key, model_name, model_version
        What the record is about (pseudonymous key; the version that ran).
    labels
        Labels to score, e.g. the model's label numbers; None = every non-zero
        label in either map (a label only the model produced scores 0).
    recorded_at
        Epoch seconds, stored as given.

    Returns
    -------
    DriftRecord

    Raises
    ------
    ValueError
        The maps differ in shape.
    """
    prediction, label = np.asarray(prediction), np.asarray(label)
    if prediction.shape != label.shape:
        raise ValueError(
            f"study {study_key!r}: prediction {prediction.shape} and label {label.shape} "
            "must be aligned to the same volume"
        )
    if labels is None:
        present = np.union1d(np.unique(prediction), np.unique(label))
        lbs = [int(x) for x in present if x != 0]
    else:
        lbs = sorted({int(x) for x in labels})
    scores = dice_per_label(prediction, label, lbs)
    mean = float(np.mean(list(scores.values()))) if scores else 1.0
    return DriftRecord(study_key, model_name, model_version, scores, mean, recorded_at)


@dataclass(frozen=True)
class DriftSummary:
    """The trend of one model version."""

    model_name: str
    model_version: str
    n: int
    mean_dice: float
    last_k: int
    """How many records ``last_k_mean`` covers (``min(k, n)``)."""
    last_k_mean: float
    label_means: dict[int, float]
    """Per label, over the records that scored it."""
    min_dice: float
    first_at: float | None
    last_at: float | None


def summarize_drift(records: Sequence[DriftRecord], k: int = 10) -> tuple[DriftSummary, ...]:
    """One summary per (model name, version), in order of first appearance.

    Parameters
    ----------
    records
        Drift records in the order the labels arrived (the last k are the newest).
    k
        Size of the recent window.

    Raises
    ------
    ValueError
        ``k`` < 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    groups: dict[tuple[str, str], list[DriftRecord]] = {}
    for r in records:
        groups.setdefault((r.model_name, r.model_version), []).append(r)
    out = []
    for (name, version), rs in groups.items():
        means = np.array([r.mean_dice for r in rs])
        per_label: dict[int, list[float]] = {}
        for r in rs:
            for lb, d in r.dice.items():
                per_label.setdefault(lb, []).append(d)
        times = [r.recorded_at for r in rs if r.recorded_at is not None]
        recent = means[-k:]
        out.append(
            DriftSummary(
                model_name=name,
                model_version=version,
                n=len(rs),
                mean_dice=float(means.mean()),
                last_k=len(recent),
                last_k_mean=float(recent.mean()),
                label_means={lb: float(np.mean(v)) for lb, v in sorted(per_label.items())},
                min_dice=float(means.min()),
                first_at=min(times) if times else None,
                last_at=max(times) if times else None,
            )
        )
    return tuple(out)


def format_drift_table(summaries: Iterable[DriftSummary]) -> str:
    """A plain-text table for ``dicomnode models stats`` (one row per version)."""
    rows = [("model", "version", "n", "mean Dice", "last-k mean", "k", "min")]
    for s in summaries:
        rows.append((s.model_name, s.model_version, str(s.n), f"{s.mean_dice:.3f}",
                     f"{s.last_k_mean:.3f}", str(s.last_k), f"{s.min_dice:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    ) + "\n"

"""Tracking identity of segmentation findings across re-runs of a study.

A finding (one connected component of one label) gets a Tracking Identifier
("<label> <n>") and a Tracking UID, written in its TID 1411 group of the SR. When a
study is run again (a late series makes a new study version, or an operator retry),
a finding that persists keeps both: it is matched to a finding of the latest earlier
result of the same study and model by label and centroid distance in patient
coordinates (DESIGN.md, "Per-finding results").

Matching rule: among all (previous, current) pairs of the same label whose centroids
lie within the tolerance, the closest pair is matched first, then the next closest of
those left, and so on (each finding matched at most once). A current finding left
unmatched is new: it gets the next number of its label (above every number the
study's earlier results of the model used, so a vanished finding's identifier is
never given to another) and a new UID.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.dicom.findings import derived_uid

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["assign_tracking", "match_findings", "previous_findings", "track"]


def _usable(f: dict[str, Any]) -> bool:
    return bool(f.get("tracking_uid")) and f.get("centroid_mm") is not None


def match_findings(
    previous: Sequence[dict[str, Any]],
    current: Sequence[dict[str, Any]],
    tolerance_mm: float,
) -> dict[int, int]:
    """Current index -> previous index of the findings that persist (the rule above).

    Findings are dicts with ``label`` and ``centroid_mm``; previous ones without a
    ``tracking_uid`` or centroid are not matched.
    """
    pairs = []
    for j, p in enumerate(previous):
        if not _usable(p):
            continue
        for i, c in enumerate(current):
            if c.get("centroid_mm") is None or int(c["label"]) != int(p["label"]):
                continue
            d = float(np.linalg.norm(np.subtract(c["centroid_mm"], p["centroid_mm"])))
            if d <= tolerance_mm:
                pairs.append((d, i, j))
    out: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def assign_tracking(
    current: list[dict[str, Any]],
    previous: Sequence[dict[str, Any]],
    *,
    earlier_numbers: dict[int, int],
    tolerance_mm: float,
    new_uid: Callable[[int, int], str],
) -> list[dict[str, Any]]:
    """Give every current finding ``tracking_number``, ``tracking_id``, ``tracking_uid``.

    Parameters
    ----------
    current
        This result's findings (dicts with ``label``, ``label_name``, ``centroid_mm``),
        updated in place and returned.
    previous
        The latest earlier result's findings.
    earlier_numbers
        Label -> highest tracking number any earlier result used.
    tolerance_mm
        Largest centroid distance of a persisting finding.
    new_uid
        (label, number) -> the UID of a new finding.
    """
    matched = match_findings(previous, current, tolerance_mm)
    top = dict(earlier_numbers)
    for i, j in matched.items():
        p = previous[j]
        current[i]["tracking_number"] = int(p.get("tracking_number") or 0)
        current[i]["tracking_id"] = str(p["tracking_id"])
        current[i]["tracking_uid"] = str(p["tracking_uid"])
    for i, c in enumerate(current):
        if i in matched:
            continue
        label = int(c["label"])
        n = top.get(label, 0) + 1
        top[label] = n
        c["tracking_number"] = n
        c["tracking_id"] = f"{c['label_name']} {n}"[:64]
        c["tracking_uid"] = new_uid(label, n)
    return current


def previous_findings(
    ctx: TaskContext, study_id: int, version: int, model: str
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The findings of the latest earlier done result of this study and model (a rerun
    of the same version counts: its row is replaced only after this one is made), and
    per label the highest tracking number any of its results used."""
    results = [
        r
        for r in ctx.results.for_study(study_id)
        if r.model_name == model and r.status == "done" and r.study_version <= version
    ]
    numbers: dict[int, int] = {}
    for r in results:
        for f in r.findings or []:
            if f.get("tracking_number") is not None:
                label = int(f["label"])
                numbers[label] = max(numbers.get(label, 0), int(f["tracking_number"]))
    if not results:
        return [], numbers
    latest = max(results, key=lambda r: (r.study_version, r.created_at))
    return list(latest.findings or []), numbers


def track(
    ctx: TaskContext, study: Any, version: int, model: str, findings: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """:func:`assign_tracking` against the study's earlier results of ``model``."""
    previous, numbers = previous_findings(ctx, study.id, version, model)
    return assign_tracking(
        findings,
        previous,
        earlier_numbers=numbers,
        tolerance_mm=ctx.settings.results.tracking_tolerance_mm,
        new_uid=lambda label, n: derived_uid(
            "finding", study.study_key, model, version, label, n
        ),
    )

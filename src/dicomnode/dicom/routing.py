"""Routing: which models run on a study, and on which series (pure, headers only)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from dicomnode.config import RoutingRule
from dicomnode.dicom.frames import safe_int
from dicomnode.dicom.image import image_attributes
from dicomnode.dicom.volume import SeriesSummary, select_series, summarize_series
from dicomnode.errors import InferenceError

__all__ = ["Route", "RoutingDecision", "route_study"]


@dataclass(frozen=True)
class Route:
    """Run ``model`` on ``series_key`` because of ``rule``."""

    rule: str
    model: str
    series_key: str
    reason: str
    images: tuple[str, ...] = ()
    """Image routes (``RoutingRule.images``): the chosen images' SOP Instance UIDs, in
    order; ``series_key`` is the first one's series. Empty for a volume route."""


@dataclass(frozen=True)
class RoutingDecision:
    """The routes chosen for a study, and why every other rule did not apply."""

    routes: tuple[Route, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())
    """(rule name, reason) for rules that matched nothing."""

    @property
    def applicable(self) -> bool:
        return bool(self.routes)

    def as_dict(self) -> dict[str, object]:
        return {
            "applicable": self.applicable,
            "routes": [{k: list(v) if isinstance(v, tuple) else v
                        for k, v in r.__dict__.items()} for r in self.routes],
            "skipped": [{"rule": n, "reason": why} for n, why in self.skipped],
        }


def _matches(pattern: str | None, value: object) -> bool:
    return pattern is None or re.search(pattern, str(value or ""), re.IGNORECASE) is not None


def _pick_images(
    series: Mapping[str, Sequence[Dataset]],
    summaries: Mapping[str, SeriesSummary],
    rule: RoutingRule,
) -> list[tuple[str, str]]:
    """(series key, SOP Instance UID) of the images an image rule runs on, in order."""
    found: list[tuple[tuple[int, int, str], str, str]] = []
    for key, dss in series.items():
        s = summaries[key]
        if rule.modality is not None and s.modality != rule.modality:
            continue
        if not _matches(rule.body_part, s.body_part):
            continue
        if not _matches(rule.series_description, s.series_description):
            continue
        for ds in dss:
            if rule.sop_class_uid is not None and str(ds.get("SOPClassUID", "")) != \
                    rule.sop_class_uid:
                continue
            if safe_int(ds.get("NumberOfFrames"), 1) not in (None, 1):
                continue
            attrs = image_attributes(ds)
            if not (
                _matches(rule.view_position, attrs["view_position"])
                and _matches(rule.image_laterality, attrs["image_laterality"])
                and _matches(rule.presentation_intent, attrs["presentation_intent"])
            ):
                continue
            uid = str(ds.get("SOPInstanceUID", "") or "")
            if not uid:
                continue
            order = (s.series_number if s.series_number is not None else 2**31,
                     safe_int(ds.get("InstanceNumber"), 2**31) or 0, uid)
            found.append((order, key, uid))
    found.sort()
    picked = [(key, uid) for _, key, uid in found]
    return picked[:1] if rule.images == "one" else picked


def route_study(
    series: Mapping[str, Sequence[Dataset]],
    rules: Sequence[RoutingRule],
    *,
    calling_ae: str | None,
) -> RoutingDecision:
    """Apply routing rules to a study's series (headers suffice, no Pixel Data).

    Parameters
    ----------
    series
        Series key -> its instances' headers (de-identified).
    rules
        Tried in order; each matching rule contributes its models (a model chosen by
        an earlier rule is not added twice).
    calling_ae
        AE title that sent the study.

    Returns
    -------
    RoutingDecision
        With no route when nothing applies; reasons name rules and attributes only.
    """
    routes: list[Route] = []
    skipped: list[tuple[str, str]] = []
    chosen_models: set[str] = set()
    summaries: dict[str, SeriesSummary] = {}
    attributes: dict[str, dict[str, str]] = {}
    for key, dss in series.items():
        # Header-only and tolerant: a malformed value costs its instance or series
        # (recorded in the summary's note), never the whole study's routing.
        summaries[key] = summarize_series(dss)
        attributes[key] = image_attributes(dss[0])
    for rule in rules:
        if rule.calling_ae is not None and rule.calling_ae != calling_ae:
            skipped.append((rule.name, f"calling AE is not {rule.calling_ae}"))
            continue
        if rule.images is not None:
            picked = _pick_images(series, summaries, rule)
            if not picked:
                skipped.append((rule.name, "no single-frame image with the required modality, "
                                           "body part, SOP class or image attributes"))
                continue
            why = f"{len(picked)} image(s), {rule.images}"
            for model in rule.models:
                if model not in chosen_models:
                    chosen_models.add(model)
                    routes.append(Route(rule.name, model, picked[0][0], why,
                                        tuple(uid for _, uid in picked)))
            continue
        candidates = []
        keys = []
        for key, s in summaries.items():
            attrs = attributes[key]
            if not _matches(rule.body_part, s.body_part):
                continue
            if rule.sop_class_uid is not None and s.sop_class_uid != rule.sop_class_uid:
                continue
            if not (
                _matches(rule.view_position, attrs["view_position"])
                and _matches(rule.image_laterality, attrs["image_laterality"])
                and _matches(rule.presentation_intent, attrs["presentation_intent"])
            ):
                continue
            candidates.append(s)
            keys.append(key)
        if not candidates:
            skipped.append(
                (rule.name, "no series with the required body part, SOP class or image attributes")
            )
            continue
        try:
            pick = select_series(
                candidates,
                modality=rule.modality,
                plane=rule.plane.upper() if rule.plane else None,
                min_slices=rule.min_slices,
                max_slice_spacing_mm=rule.max_slice_spacing_mm,
                description_pattern=rule.series_description,
            )
        except InferenceError as exc:
            skipped.append((rule.name, str(exc)))
            continue
        key = keys[candidates.index(pick)]
        why = (
            f"{pick.modality} {pick.plane.value if pick.plane else ''} series of "
            f"{pick.n_slices} slices, spacing {pick.slice_spacing_mm} mm"
        )
        if pick.volume_note:
            why += f" ({pick.volume_note})"
        for model in rule.models:
            if model not in chosen_models:
                chosen_models.add(model)
                routes.append(Route(rule.name, model, key, why))
    return RoutingDecision(tuple(routes), tuple(skipped))

"""Routing and inference: what runs on a completed study, and running it.

``route_study`` is a completion hook: it reads the headers of the study's
de-identified instances, applies the routing rules, stores the decision and its
reasons on the study, and enqueues one ``infer`` job per chosen model on the
``gpu`` queue (one worker per GPU: one inference at a time per device).
``infer`` assembles the chosen series into a volume, runs the model's active
version with ONNX Runtime and records the result for the results stage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread

from dicomnode import metrics
from dicomnode.dicom.routing import route_study as decide_routes
from dicomnode.dicom.volume import assemble_volume
from dicomnode.errors import InferenceError
from dicomnode.pipeline.infer_image import infer_images, is_image_package
from dicomnode.pipeline.learning import is_label
from dicomnode.pipeline.outcome import settle
from dicomnode.pipeline.tracking import track

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["infer", "route_study"]

log = logging.getLogger(__name__)


def _read(ctx: TaskContext, path: str, *, pixels: bool) -> Any:
    with open(ctx.files.path(path), "rb") as f:
        return dcmread(f, stop_before_pixels=not pixels)


def _read_series(
    ctx: TaskContext, paths: list[str], *, pixels: bool
) -> tuple[list[Any], int]:
    """The readable datasets of a series, and how many files could not be read.

    A file that pydicom cannot parse costs that instance only (it was stored as
    received, and its structure was checked then; a reader may still refuse a value).
    """
    out, bad = [], 0
    for p in paths:
        try:
            out.append(_read(ctx, p, pixels=pixels))
        except Exception:  # pydicom raises many kinds; the message may quote values
            bad += 1
    return out, bad


def route_study(ctx: TaskContext, study_id: int, version: int) -> None:
    """Completion hook: decide which models run on which series; enqueue them."""
    study = ctx.index.study(study_id)
    if study is None or study.version != version:
        return  # superseded by a later version: its own completion routes it
    run = study.run or 1
    if version > 1 and _labels_only(ctx, study_id, version):
        # an annotator's corrected SEG reopened the study: nothing new to infer on
        ctx.index.update_info(
            study_id,
            routing={
                "version": version,
                "run": run,
                "applicable": False,
                "routes": [],
                "skipped": [],
                "note": "only labels arrived; not rerun",
            },
        )
        settle(ctx, study_id)
        return
    t0 = time.perf_counter()
    series = {}
    unreadable = 0
    for key, paths in ctx.index.series_files(study_id).items():
        datasets, bad = _read_series(ctx, paths, pixels=False)
        unreadable += bad
        if datasets:
            series[key] = datasets
    decision = decide_routes(series, ctx.settings.routing.rules, calling_ae=study.calling_ae)
    routing: dict[str, Any] = {"version": version, "run": run, **decision.as_dict()}
    if unreadable:
        routing["unreadable_instances"] = unreadable
    if not series:
        routing["note"] = "no de-identified instance to route (all quarantined or failed)"
    ctx.index.update_info(study_id, routing=routing)
    metrics.STAGE_SECONDS.labels("route").observe(time.perf_counter() - t0)
    if not decision.applicable:
        log.info("study %d version %d: no model applies", study_id, version)
        settle(ctx, study_id)
        return
    for route in decision.routes:
        ctx.queue.enqueue(
            "infer",
            {
                "study_id": study_id,
                "version": version,
                "model": route.model,
                "series_key": route.series_key,
                "run": run,
                **({"images": list(route.images)} if route.images else {}),
            },
            dedup_key=f"infer:{study_id}:{version}:{route.model}"
            + (f":r{run}" if run > 1 else ""),
        )
        log.info(
            "study %d version %d: %s on series %s (%s)",
            study_id,
            version,
            route.model,
            route.series_key,
            route.rule,
        )


def _labels_only(ctx: TaskContext, study_id: int, version: int) -> bool:
    arrived = ctx.index.instances_of_version(study_id, version)
    return bool(arrived) and all(is_label(ctx, sop_class, ae) for sop_class, ae in arrived)


def infer(
    ctx: TaskContext, study_id: int, version: int, model: str, series_key: str, run: int = 1,
    images: list[str] | None = None,
) -> None:
    """Run the active version of ``model`` on one series of a study version.

    A study that moved on to a later version or pipeline run is skipped (its own
    routing runs the model again). A series that cannot become a volume, or a model
    that cannot run on it, is recorded as a refused result with the reason, once,
    without retries; ONNX Runtime errors raise (the job retries, then dead-letters,
    and the study ends ``failed``).
    """
    study = ctx.index.study(study_id)
    if study is None or study.version != version or (study.run or 1) != run:
        return
    registered = ctx.registry.active(model)
    if registered is None:
        ctx.results.fail(
            study_id=study_id,
            study_version=version,
            model_name=model,
            model_version="-",
            series_key=series_key,
            error=f"no active version of model {model}",
        )
        settle(ctx, study_id)
        return
    if images or is_image_package(registered.path):
        infer_images(ctx, study, registered, series_key, images or [])
        return
    t0 = time.perf_counter()
    paths = ctx.index.series_files(study_id).get(series_key, [])
    try:
        datasets, unreadable = _read_series(ctx, paths, pixels=True)
        if not datasets:
            raise InferenceError(f"none of the series' {len(paths)} files can be read")
        volume = assemble_volume(datasets)
        t_assembly = time.perf_counter() - t0
        runner = ctx.models.get(registered.path)
        spec = runner.package.input
        accepted = (spec.modality,) if isinstance(spec.modality, str) else tuple(spec.modality)
        if volume.modality not in accepted:
            raise InferenceError(
                f"series modality {volume.modality or 'missing'}, "
                f"model expects {' or '.join(accepted)}"
            )
        if volume.shape[0] < getattr(spec, "min_slices", 1):
            raise InferenceError(
                f"series makes a volume of {volume.shape[0]} slices, "
                f"model needs at least {spec.min_slices}"
            )
        out = runner.infer_volume(volume.array, volume.affine, volume.spacing)
    except InferenceError as exc:
        ctx.results.fail(
            study_id=study_id,
            study_version=version,
            model_name=model,
            model_version=registered.version,
            series_key=series_key,
            error=str(exc),
        )
        ctx.index.update_info(study_id, inference_error={model: str(exc)})
        log.warning("study %d: %s cannot run: %s", study_id, model, exc)
        settle(ctx, study_id)
        return
    findings = _jsonable([dataclasses.asdict(f) for f in out.findings])
    affine = volume.affine
    for f in findings:
        z, y, x = f["centroid_voxel"]
        f["centroid_mm"] = [round(float(v), 3) for v in (affine @ [z, y, x, 1.0])[:3]]
    track(ctx, study, version, model, findings)
    grid_mask = out.mask if out.mask is not None else np.zeros(volume.shape, np.uint8)
    result = ctx.results.save(
        study_id=study_id,
        study_key=study.study_key,
        study_version=version,
        model_name=model,
        model_version=registered.version,
        series_key=series_key,
        # the mask on the series' own frames: a resampled volume's result goes back to
        # the instances as they were sent (DESIGN.md, "Volumes from real series")
        mask=volume.mask_on_frames(grid_mask),
        sop_keys=list(volume.frame_refs),
        findings=findings,
        timings={
            "assembly_s": round(t_assembly, 4),
            **{f"{k}_s": round(v, 4) for k, v in out.seconds.items()},
            "providers": list(out.providers),
            **({"plan": dict(out.plan)} if out.plan else {}),
            **({"volume_notes": list(volume.notes)} if volume.notes else {}),
            **({"unreadable_instances": unreadable} if unreadable else {}),
        },
    )
    elapsed = time.perf_counter() - t0
    metrics.STAGE_SECONDS.labels("inference").observe(elapsed)
    metrics.INFERENCE_SECONDS.labels(model, registered.version).observe(elapsed)
    log.info(
        "study %d version %d: %s %s found %d finding(s) in %.2f s",
        study_id,
        version,
        model,
        registered.version,
        len(findings),
        elapsed,
    )
    for hook in ctx.result_hooks:
        hook(ctx, result.id)


def _jsonable(value: Any) -> Any:
    """Findings with numpy scalars and tuples turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value

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

from pydicom import dcmread

from dicomnode import metrics
from dicomnode.dicom.routing import route_study as decide_routes
from dicomnode.dicom.volume import assemble_volume
from dicomnode.errors import InferenceError, ModelError
from dicomnode.pipeline.learning import is_label

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["infer", "route_study"]

log = logging.getLogger(__name__)


def _read(ctx: TaskContext, path: str, *, pixels: bool) -> Any:
    with open(ctx.files.path(path), "rb") as f:
        return dcmread(f, stop_before_pixels=not pixels)


def route_study(ctx: TaskContext, study_id: int, version: int) -> None:
    """Completion hook: decide which models run on which series; enqueue them."""
    study = ctx.index.study(study_id)
    if study is None or study.version != version:
        return  # superseded by a later version: its own completion routes it
    if version > 1 and _labels_only(ctx, study_id, version):
        # an annotator's corrected SEG reopened the study: nothing new to infer on
        ctx.index.update_info(
            study_id,
            routing={
                "version": version,
                "applicable": False,
                "routes": [],
                "skipped": [],
                "note": "only labels arrived; not rerun",
            },
        )
        return
    t0 = time.perf_counter()
    series = {
        key: [_read(ctx, p, pixels=False) for p in paths]
        for key, paths in ctx.index.series_files(study_id).items()
    }
    decision = decide_routes(series, ctx.settings.routing.rules, calling_ae=study.calling_ae)
    ctx.index.update_info(study_id, routing={"version": version, **decision.as_dict()})
    metrics.STAGE_SECONDS.labels("route").observe(time.perf_counter() - t0)
    if not decision.applicable:
        log.info("study %d version %d: no model applies", study_id, version)
        return
    for route in decision.routes:
        ctx.queue.enqueue(
            "infer",
            {
                "study_id": study_id,
                "version": version,
                "model": route.model,
                "series_key": route.series_key,
            },
            dedup_key=f"infer:{study_id}:{version}:{route.model}",
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


def infer(ctx: TaskContext, study_id: int, version: int, model: str, series_key: str) -> None:
    """Run the active version of ``model`` on one series of a study version.

    A study that moved on to a later version is skipped (its own routing runs the
    model again). A series that cannot become a volume, or a model that cannot run
    on it, is recorded as a failed result with the reason; ONNX Runtime errors
    raise (the job retries).
    """
    assert ctx.registry is not None and ctx.models is not None and ctx.results is not None
    study = ctx.index.study(study_id)
    if study is None or study.version != version:
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
        return
    t0 = time.perf_counter()
    paths = ctx.index.series_files(study_id).get(series_key, [])
    try:
        volume = assemble_volume([_read(ctx, p, pixels=True) for p in paths])
        t_assembly = time.perf_counter() - t0
        runner = ctx.models.get(registered.path)
        if volume.modality and volume.modality != runner.package.input.modality:
            raise InferenceError(
                f"series modality {volume.modality}, model expects {runner.package.input.modality}"
            )
        out = runner.run(volume.array, volume.spacing)
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
        return
    except ModelError:
        raise
    assert out.mask is not None or out.task != "segmentation"
    findings = [dataclasses.asdict(f) for f in out.findings]
    result = ctx.results.save(
        study_id=study_id,
        study_key=study.study_key,
        study_version=version,
        model_name=model,
        model_version=registered.version,
        series_key=series_key,
        mask=out.mask if out.mask is not None else volume.array[:0].astype("uint8"),
        sop_keys=list(volume.sop_instance_uids),
        findings=_jsonable(findings),
        timings={
            "assembly_s": round(t_assembly, 4),
            **{f"{k}_s": round(v, 4) for k, v in out.seconds.items()},
            "providers": list(out.providers),
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

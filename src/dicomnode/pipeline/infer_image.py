"""Inference of an image model (a radiograph classifier) on the images routing chose.

A routing rule with ``images = "one" | "every"`` names single 2D images (by their
de-identified SOP Instance UID); each is classified by the active version of the model
(:class:`dicomnode.inference.image_model.ImageModel`, in the inference worker process by
default), and every label at or above its threshold gets an explanation map when the
package has ``[explain]``. The result row holds one finding per (image, label) with the
probability and the decision; the maps go to the result's file. An image the package
refuses (a lateral view, a FOR PROCESSING image...) is recorded with the reason; when no
image is left, the result is refused with the first reason.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from dicomnode import metrics
from dicomnode.errors import InferenceError, ModelLoadError
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.modelpkg.format2 import ImageInput, ModelPackage2
from dicomnode.pipeline.outcome import settle

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext
    from dicomnode.storage.models import Study
    from dicomnode.storage.registry import RegisteredModel

__all__ = ["infer_images", "is_image_package"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def _is_image(path: str, mtime: float) -> bool:
    del mtime  # part of the cache key: a rewritten package is read again
    pkg = read_model_package(path)
    return isinstance(pkg, ModelPackage2) and isinstance(pkg.input, ImageInput)


def is_image_package(path: Path | str) -> bool:
    """Whether the package at ``path`` takes single 2D images (format 2, input.kind image).

    Raises
    ------
    ModelLoadError
        The package cannot be read.
    """
    p = Path(path)
    try:
        mtime = (p / "model.toml").stat().st_mtime if p.is_dir() else p.stat().st_mtime
    except OSError as exc:
        raise ModelLoadError(f"{p.name}: cannot read ({exc.strerror})") from None
    return _is_image(str(p), mtime)


def _images(ctx: TaskContext, study_id: int, wanted: list[str]) -> dict[str, tuple[str, Any]]:
    """SOP Instance UID -> (series key, dataset with pixels) of the wanted images."""
    found: dict[str, tuple[str, Any]] = {}
    need = set(wanted)
    for key, paths in ctx.index.series_files(study_id).items():
        for path in paths:
            try:
                with open(ctx.files.path(path), "rb") as f:
                    head = dcmread(f, stop_before_pixels=True)
                uid = str(head.get("SOPInstanceUID", ""))
                if uid in need and uid not in found:
                    with open(ctx.files.path(path), "rb") as f:
                        found[uid] = (key, dcmread(f))
            except Exception:  # an unreadable file costs that instance only
                continue
    return found


def _refuse(ctx: TaskContext, study: Study, registered: RegisteredModel, series_key: str,
            reason: str) -> None:
    ctx.results.fail(study_id=study.id, study_version=study.version,
                     model_name=registered.name, model_version=registered.version,
                     series_key=series_key, error=reason)
    ctx.index.update_info(study.id, inference_error={registered.name: reason})
    log.warning("study %d: %s cannot run: %s", study.id, registered.name, reason)
    settle(ctx, study.id)


def infer_images(ctx: TaskContext, study: Study, registered: RegisteredModel,
                 series_key: str, images: list[str]) -> None:
    """Classify ``images`` of ``study`` with ``registered`` and record the result.

    Refusals (a volume route for an image model, an image model on a volume route, no
    image accepted) are recorded on the result with the reason, once; ONNX Runtime
    failures raise (the job retries, then dead-letters).
    """
    t0 = time.perf_counter()
    runner = ctx.models.get(registered.path)
    pkg = runner.package
    if not isinstance(pkg, ModelPackage2) or not isinstance(pkg.input, ImageInput):
        _refuse(ctx, study, registered, series_key,
                f"model {registered.name} takes a volume: its routing rule must not set images")
        return
    if not images:
        _refuse(ctx, study, registered, series_key,
                f"model {registered.name} takes single images: give its routing rule "
                "images = \"one\" or \"every\"")
        return
    found = _images(ctx, study.id, images)
    findings: list[dict[str, Any]] = []
    maps = {}
    refused: list[str] = []
    sop_keys: list[str] = []
    seconds = {"prepare": 0.0, "run": 0.0, "explain": 0.0}
    for uid in images:
        if uid not in found:
            refused.append("an image routed to the model can no longer be read")
            continue
        key, ds = found[uid]
        try:
            out = runner.classify(ds)
        except InferenceError as exc:
            refused.append(str(exc))
            continue
        index = len(sop_keys)
        sop_keys.append(uid)
        seconds["prepare"] += out.seconds["prepare"]
        seconds["run"] += out.seconds["run"]
        for lb in pkg.outputs.labels:
            p = out.probabilities[lb.number]
            entry: dict[str, Any] = {
                "kind": "classification", "image": index, "series_key": key,
                "sop_instance_uid": uid, "label": lb.number, "label_name": lb.name,
                "probability": round(float(p), 6), "threshold": float(lb.threshold),
                "present": lb.number in out.positive,
            }
            if entry["present"] and pkg.explain is not None:
                t1 = time.perf_counter()
                smap, info = runner.explain(ds, lb.number)
                seconds["explain"] += time.perf_counter() - t1
                name = f"{index}:{lb.number}"
                maps[name] = smap
                entry["explanation"] = {"map": name, "method": pkg.explain.method, **info}
            findings.append(entry)
    if not sop_keys:
        _refuse(ctx, study, registered, series_key,
                refused[0] if refused else "no image to classify")
        return
    result = ctx.results.save_maps(
        study_id=study.id, study_key=study.study_key, study_version=study.version,
        model_name=registered.name, model_version=registered.version,
        series_key=series_key, sop_keys=sop_keys, maps=maps, findings=findings,
        timings={**{f"{k}_s": round(v, 4) for k, v in seconds.items()},
                 "images": len(sop_keys), "providers": list(getattr(runner, "providers", ())),
                 **({"refused_images": refused} if refused else {})},
    )
    elapsed = time.perf_counter() - t0
    metrics.STAGE_SECONDS.labels("inference").observe(elapsed)
    metrics.INFERENCE_SECONDS.labels(registered.name, registered.version).observe(elapsed)
    log.info("study %d version %d: %s %s classified %d image(s) in %.2f s", study.id,
             study.version, registered.name, registered.version, len(sop_keys), elapsed)
    for hook in ctx.result_hooks:
        hook(ctx, result.id)

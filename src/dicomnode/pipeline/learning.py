"""The learning loop in the node: labels from annotators' SEGs, drift, retraining.

A Segmentation object sent by a configured annotation AE is de-identified like
everything else; ``ingest_label`` then aligns it to the series it segments and
stores it as that annotator's ground truth for the study, assesses agreement when
several annotators labelled the study (flagging it below the threshold), and, if
the node already inferred the study, records the production model's Dice against
the label (drift). ``retrain`` runs :func:`dicomnode.training.retrain.retrain`
with the node's label source and registry; the scheduler only enqueues it.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import SegmentationStorage

from dicomnode.dicom.seg import read_seg
from dicomnode.dicom.volume import assemble_volume
from dicomnode.errors import DatasetError, InferenceError, NodeError
from dicomnode.inference import OnnxModel
from dicomnode.inference.runtime import load_runner
from dicomnode.jobs.local import describe_error
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.modelpkg.format2 import ModelPackage2, VolumeInput
from dicomnode.modelpkg.prepare import axial_affine
from dicomnode.training.dataset import DatasetCard, StudyInfo
from dicomnode.training.labels import assess_annotations, dice_per_label

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext
    from dicomnode.training.data import Case
    from dicomnode.training.retrain import ActiveModel


def _torch_side() -> Any:
    """The training modules that need torch (the ``[train]`` extra), imported on use so
    that a serving-only install never loads torch."""
    try:
        # import_module, not "from dicomnode.training import retrain": the package's
        # lazy names map "retrain" to the function of that name
        retrain_module = importlib.import_module("dicomnode.training.retrain")
    except ImportError as exc:
        raise NodeError(
            "retraining needs PyTorch: pip install 'dicomnode[train]' (torch==2.13.0)"
        ) from exc
    return retrain_module


__all__ = [
    "NodeLabelSource",
    "NodeRegistryOps",
    "drift_on_result",
    "ingest_label",
    "is_label",
    "run_retrain",
]

log = logging.getLogger(__name__)


def is_label(ctx: TaskContext, sop_class_uid: str, calling_ae: str | None) -> bool:
    """Whether an instance is an annotator's ground truth (a SEG from an annotation AE)."""
    return (
        sop_class_uid == SegmentationStorage and calling_ae in ctx.settings.learning.annotation_aes
    )


def _read(ctx: TaskContext, path: str, pixels: bool = True) -> Any:
    with open(ctx.files.path(path), "rb") as f:
        return dcmread(f, stop_before_pixels=not pixels)


def _series_volume(ctx: TaskContext, study_id: int, series_key: str) -> Any:
    files = ctx.index.series_files(study_id).get(series_key, [])
    if not files:
        raise InferenceError(f"series {series_key} is not held de-identified")
    volume = assemble_volume([_read(ctx, p) for p in files])
    # Labels train the node's own slice models on the volume as stored; a multi-frame
    # source or a resampled stack would need the label carried onto the grid as well.
    if not volume.aligned or any(f.frame_number is not None for f in volume.frames):
        raise InferenceError(
            f"series {series_key}: labels are taken on regular single-frame stacks only "
            f"({'; '.join(volume.notes) or 'multi-frame source'})"
        )
    return volume


def _label_numbers(segments: Iterable[Any], model_labels: Mapping[str, int]) -> dict[int, int]:
    """SEG segment number -> model label number, by label name, else by number."""
    out = {}
    for seg in segments:
        name = str(seg.label).strip().lower()
        out[int(seg.number)] = model_labels.get(name, int(seg.number))
    return out


def ingest_label(ctx: TaskContext, instance_id: int) -> None:
    """Turn a de-identified annotator SEG into the annotator's label for its study."""
    inst = ctx.index.instance(instance_id)
    if inst is None or inst.state != "deidentified":
        return
    ds = _read(ctx, inst.path)
    study = ctx.index.study(inst.study_id)
    assert study is not None
    try:
        series_key = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        volume = _series_volume(ctx, inst.study_id, series_key)
        mask, segments = read_seg(ds, list(volume.sop_instance_uids), allow_overlap=True)
    except (AttributeError, IndexError, DatasetError, InferenceError) as exc:
        reason = exc if isinstance(exc, NodeError) else "no Referenced Series Sequence"
        ctx.index.update_info(inst.study_id, label_error=f"instance {instance_id}: {reason}")
        log.warning("label from instance %d not usable: %s", instance_id, reason)
        return
    active = ctx.registry.active(ctx.settings.learning.model)
    names = {}
    if active is not None:
        names = {lb.name.lower(): lb.number for lb in read_model_package(active.path).labels}
    mapping = _label_numbers(segments, names)
    remapped = np.zeros_like(mask, dtype=np.uint8)
    for seg_no, label_no in mapping.items():
        remapped[mask == seg_no] = label_no
    annotator = inst.calling_ae or "unknown"
    ctx.labels.save(
        study_id=inst.study_id,
        study_key=study.study_key,
        annotator=annotator,
        seg_instance_id=instance_id,
        series_key=series_key,
        mask=remapped,
        sop_keys=list(volume.sop_instance_uids),
        labels=sorted({str(s.label) for s in segments}),
    )
    assess_study_labels(ctx, inst.study_id)
    record_drift(ctx, inst.study_id, series_key, remapped, list(volume.sop_instance_uids))
    log.info("study %d: label from %s stored", inst.study_id, annotator)


def assess_study_labels(ctx: TaskContext, study_id: int) -> dict[str, Any]:
    """Agreement between the study's annotators; flag the study below the threshold."""
    truths = ctx.labels.for_study(study_id)
    masks = {t.annotator: ctx.labels.load(t)[0] for t in truths}
    lc = ctx.settings.learning
    summary: dict[str, Any] = {"annotators": len(masks), "flagged": False}
    if len(masks) > 1:
        shapes = {m.shape for m in masks.values()}
        if len(shapes) != 1:
            summary.update(flagged=True, reason="annotators labelled different series")
        else:
            a = assess_annotations(masks, threshold=lc.agreement_threshold, method=lc.consensus)
            summary.update(
                flagged=bool(a.flagged),
                reason=a.reason,
                agreement=a.agreement,
                per_label={str(x.label): x.mean_dice for x in a.labels},
            )
    ctx.index.update_info(study_id, labels=summary)
    return summary


def record_drift(
    ctx: TaskContext,
    study_id: int,
    series_key: str,
    label: np.ndarray,
    sop_keys: list[str],
    only_result: int | None = None,
) -> None:
    """Dice of the production results on this series against the label."""
    for result in ctx.results.for_study(study_id):
        if result.status != "done" or result.series_key != series_key:
            continue
        if only_result is not None and result.id != only_result:
            continue
        pred, pred_keys = ctx.results.load_mask(result)
        if sorted(pred_keys) != sorted(sop_keys):
            continue
        order = [pred_keys.index(k) for k in sop_keys]
        labels = sorted(int(v) for v in np.unique(label) if v) or [1]
        dice = dice_per_label(pred[order], label, labels)
        ctx.labels.add_drift(
            model_name=result.model_name,
            model_version=result.model_version,
            study_id=study_id,
            dice={str(k): v for k, v in dice.items()},
        )


def drift_on_result(ctx: TaskContext, result_id: int) -> None:
    """Result hook: a label that arrived before the model ran is scored now."""
    result = ctx.results.get(result_id)
    if result is None or result.status != "done":
        return
    for truth in ctx.labels.for_study(result.study_id):
        if truth.series_key == result.series_key:
            mask, keys = ctx.labels.load(truth)
            record_drift(ctx, result.study_id, truth.series_key, mask, keys, only_result=result_id)


class NodeLabelSource:
    """The node's labelled studies, for :func:`dicomnode.training.retrain.retrain`."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    def new_label_count(self) -> int:
        return self.ctx.labels.new_since_last_run(self.ctx.settings.learning.model)

    def studies(self) -> Iterable[StudyInfo]:
        ctx = self.ctx
        for study_id in ctx.labels.labelled_studies():
            study = ctx.index.study(study_id)
            truths = ctx.labels.for_study(study_id)
            if study is None or not truths or study.patient_key is None:
                continue
            files = ctx.index.series_files(study_id).get(truths[0].series_key, [])
            if not files:
                continue
            head = _read(ctx, files[0], pixels=False)
            yield StudyInfo(
                study_key=study.study_key,
                patient_pseudonym=study.patient_key,
                modality=str(head.get("Modality", "")),
                manufacturer=str(head.get("Manufacturer", "")),
                labels=tuple(sorted({lb for t in truths for lb in t.labels})),
                annotators=len(truths),
                flagged=bool((study.info or {}).get("labels", {}).get("flagged", False)),
            )

    def load(self, study: StudyInfo) -> Case:
        ctx = self.ctx
        study_id = ctx.index.study_id_of(study.study_key)
        assert study_id is not None
        truths = ctx.labels.for_study(study_id)
        volume = _series_volume(ctx, study_id, truths[0].series_key)
        order = list(volume.sop_instance_uids)
        masks = {}
        for t in truths:
            mask, keys = ctx.labels.load(t)
            if sorted(keys) == sorted(order):
                masks[t.annotator] = mask[[keys.index(k) for k in order]]
        if len(masks) > 1:
            lc = ctx.settings.learning
            consensus = assess_annotations(
                masks, threshold=lc.agreement_threshold, method=lc.consensus
            ).consensus
        else:
            [consensus] = masks.values()
        case_type = _torch_side().Case
        return case_type(
            volume=np.asarray(volume.array, dtype=np.float32),
            mask=consensus.astype(np.uint8),
            spacing=volume.spacing,
            case_id=study.study_key,
        )


class NodeRegistryOps:
    """The node's model registry and runtime, for :func:`retrain`."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    def active_predictor(self, name: str) -> ActiveModel | None:
        active = self.ctx.registry.active(name)
        if active is None:
            return None
        return _torch_side().ActiveModel(
            # in this process, as the candidate is: the serving sessions may be an
            # isolated child that runs packages by infer_volume only
            active.version,
            self.predictor(active.path),
        )

    def predictor(self, package_dir: Path) -> Any:
        pkg = read_model_package(package_dir)
        if isinstance(pkg, ModelPackage2) and isinstance(pkg.input, VolumeInput):
            runner = load_runner(pkg, self.ctx.models.options,
                                 self.ctx.settings.inference.memory_budget_mb)

            def predict(volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
                # cases carry spacing only: the node's label volumes are axial stacks
                return np.asarray(runner.run(volume, axial_affine(spacing)).labels)

            return predict
        return OnnxModel.load(package_dir, self.ctx.models.options).predict_mask

    def next_version(self, name: str) -> str:
        stamp = time.strftime("%Y.%m.%d")
        taken = {m.version for m in self.ctx.registry.list(name)}
        n = 1
        while f"{stamp}.{n}" in taken:
            n += 1
        return f"{stamp}.{n}"

    def register_candidate(
        self, package_dir: Path, metrics: Mapping[str, Any], card: DatasetCard
    ) -> str:
        m = self.ctx.registry.add(
            package_dir,
            created_by="dicomnode (retraining)",
            metrics=json.loads(json.dumps(dict(metrics), default=str)),
            card=json.loads(card.to_json()),
        )
        return m.version

    def promote(self, name: str, version: str, reason: str) -> None:
        self.ctx.registry.activate(name, version, reason=reason)

    def reject(self, name: str, version: str, reason: str) -> None:
        self.ctx.registry.set_status(name, version, "rejected", reason)


def run_retrain(
    ctx: TaskContext, *, force: bool = False, tick: int | None = None
) -> dict[str, Any]:
    """One retraining run of ``learning.model``, recorded as a training run.

    ``force`` ignores ``min_new_labels`` (``dicomnode train --now``). A failure is
    recorded on the run and not retried (a retry would repeat minutes of training).
    """
    lc = ctx.settings.learning
    active = ctx.registry.active(lc.model)
    if active is None:
        raise NodeError(f"learning.model: no active version of {lc.model} to retrain")
    pkg = read_model_package(active.path)
    provenance = dict(getattr(pkg, "provenance", None) or {})
    if provenance.get("source") == "nnU-Net v2" and provenance.get("results_folder"):
        return _run_nnunet_retrain(ctx, active, force=force, tick=tick)
    rt = _torch_side()
    from dicomnode.training.gate import GatePolicy
    from dicomnode.training.train import TrainConfig
    from dicomnode.training.train3d import Train3dConfig

    # a format 2 volume package retrains its 3D architecture with its own conventions
    volume = isinstance(pkg, ModelPackage2) and isinstance(pkg.input, VolumeInput)

    run_id = ctx.labels.start_run(lc.model, tick=tick)
    settings = rt.RetrainSettings(
        name=lc.model,
        contract=None if volume else pkg.input,
        volume_template=active.path if volume else None,
        train3d_config=Train3dConfig(steps=lc.train_steps, seed=lc.train_seed, threads=2,
                                     progress=False),
        labels=pkg.labels,
        work_dir=ctx.files.root / "training",
        # validation every 100 steps with patience 2: on CPU one validation pass costs
        # about as much as 100 steps (docs/benchmarks.md, "Training (retrain)")
        train_config=TrainConfig(
            steps=lc.train_steps,
            seed=lc.train_seed,
            val_every=100,
            patience=2,
            threads=2,
            progress=False,
        ),
        gate=GatePolicy(margin=lc.margin, floor=lc.floor),
        split_seed=lc.split_seed,
        fractions=lc.fractions,
        min_new_labels=0 if force else lc.min_new_labels,
        include_flagged=lc.include_flagged,
        min_component_mm3=float(getattr(pkg.outputs, "min_component_mm3", 0.0) or 0.0),
        description=f"retrained from {lc.model} {active.version} on the node's labels",
    )
    try:
        out = rt.retrain(NodeLabelSource(ctx), NodeRegistryOps(ctx), settings)
    except Exception as exc:
        ctx.labels.finish_run(run_id, status="failed", reason=describe_error(exc))
        log.error("retraining %s failed: %s", lc.model, describe_error(exc))
        return {"status": "failed", "reason": describe_error(exc)}
    record = {
        "status": str(out.status),
        "reason": out.reason,
        "version": out.version,
        "new_labels": out.new_labels,
    }
    ctx.labels.finish_run(
        run_id,
        status=str(out.status),
        reason=out.reason,
        version=out.version,
        new_labels=out.new_labels,
        metrics=json.loads(json.dumps(out.metrics, default=str)),
        card=json.loads(out.card.to_json()) if out.card is not None else {},
    )
    if str(out.status) == "promoted":
        log.info("model %s %s promoted: %s", lc.model, out.version, out.reason)
    else:
        log.info("retraining %s: %s (%s)", lc.model, out.status, out.reason)
    return record


def _nnunet_side() -> Any:
    """importers.nnunet_finetune (torch and nnunetv2), imported on use: the serving path
    never loads the importers (lint-imports' contract sees static imports only)."""
    try:
        return importlib.import_module("dicomnode.importers.nnunet_finetune")
    except ImportError as exc:
        raise NodeError(
            "retraining an imported nnU-Net model needs nnU-Net: pip install "
            "'dicomnode[import]'"
        ) from exc


def _run_nnunet_retrain(
    ctx: TaskContext, active: Any, *, force: bool, tick: int | None
) -> dict[str, Any]:
    """The retrain of a model imported from nnU-Net: nnU-Net's trainer fine-tunes the
    serving checkpoint (importers.nnunet_finetune), the re-import is the candidate, and
    the same gate decides. Recorded as a training run like the PyTorch path."""
    lc = ctx.settings.learning
    from dicomnode.training.gate import GatePolicy

    run_id = ctx.labels.start_run(lc.model, tick=tick)
    source = NodeLabelSource(ctx)
    try:
        new = int(source.new_label_count())
        if not force and new < lc.min_new_labels:
            out = {"status": "skipped", "reason": f"{new} new label(s) since the last run, "
                   f"{lc.min_new_labels} needed", "version": None, "new_labels": new}
            ctx.labels.finish_run(run_id, status="skipped", reason=out["reason"],
                                  new_labels=new)
            return out
        studies = [s for s in source.studies() if lc.include_flagged or not s.flagged]

        def load(study: StudyInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            case = source.load(study)
            study_id = ctx.index.study_id_of(study.study_key)
            truths = ctx.labels.for_study(study_id)
            geometry = _series_volume(ctx, study_id, truths[0].series_key)
            return case.volume, case.mask, np.asarray(geometry.affine)

        nf = _nnunet_side()
        result = nf.retrain_imported(
            studies, load, NodeRegistryOps(ctx), name=lc.model, active_dir=Path(active.path),
            active_version=active.version, work_dir=ctx.files.root / "training",
            gate=GatePolicy(margin=lc.margin, floor=lc.floor), fractions=lc.fractions,
            split_seed=lc.split_seed, new_labels=new,
            settings=nf.FinetuneSettings(epochs=lc.nnunet_epochs,
                                         iterations_per_epoch=lc.nnunet_iterations_per_epoch,
                                         initial_lr=lc.nnunet_lr))
    except Exception as exc:
        ctx.labels.finish_run(run_id, status="failed", reason=describe_error(exc))
        log.error("retraining %s (nnU-Net) failed: %s", lc.model, describe_error(exc))
        return {"status": "failed", "reason": describe_error(exc)}
    ctx.labels.finish_run(
        run_id, status=result.status, reason=result.reason, version=result.version,
        new_labels=new, metrics=json.loads(json.dumps(result.metrics, default=str)),
        card=json.loads(result.card.to_json()) if result.card is not None else {},
    )
    log.info("retraining %s (nnU-Net): %s (%s)", lc.model, result.status, result.reason)
    return {"status": result.status, "reason": result.reason, "version": result.version,
            "new_labels": new}


def retrain_task(ctx: TaskContext) -> None:
    """The scheduled job's task (queue ``train``, one worker: never two at once)."""
    run_retrain(ctx)


def retrain_periodic(ctx: TaskContext, timestamp: int) -> None:
    """procrastinate's periodic form (scale-out): one run per cron tick across the cluster."""
    run_retrain(ctx, tick=timestamp)

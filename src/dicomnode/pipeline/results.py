"""Results: DICOM SEG and TID 1500 SR from a model's output, and their delivery.

``encode_results`` builds the objects on the *de-identified* headers (so what the
node keeps on disk stays pseudonymous), writes them under ``results/`` and
records one outbox row per destination and kind that destination asks for
(``[peers.*].kinds``) before anything is sent. ``reidentified`` re-identifies one
object in memory through the vault (the guard refuses any pseudonym left);
``pipeline.delivery.send_result`` sends it over the destination's transport.

Result UIDs are derived from (study version, model version, kind), so a rerun or
a redelivery never makes a second object on the PACS; a later study version makes
new objects that reference the ones they supersede.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import time
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode import __version__, metrics
from dicomnode.audit import audit
from dicomnode.dicom.deid import reidentify
from dicomnode.dicom.findings import (
    AlgorithmSpec,
    DeviceSpec,
    Finding,
    InstanceReference,
    derived_uid,
)
from dicomnode.dicom.seg import SegmentSpec, build_seg
from dicomnode.dicom.sources import sanitized_sources, surrogate_frame_of_reference
from dicomnode.dicom.sr import build_measurement_report
from dicomnode.dicom.volume import plan_volume
from dicomnode.errors import InferenceError, ReidentificationError
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.pipeline.notify import resolve_peer
from dicomnode.pipeline.outcome import record_failure, settle

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["destinations_for", "encode_results", "kinds_for", "reidentified"]

log = logging.getLogger(__name__)

_KIND_SERIES_NUMBER = {"SEG": 9001, "SR": 9002}


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _per_label(findings: list[dict], modality: str) -> list[Finding]:
    """Components per label -> one SR finding per label (TID 1411 is per SEG segment).

    Mean intensity is reported for CT only, where its unit is HU; for MR and other
    modalities the stored values have no standard unit, so no intensity is claimed.
    """
    by_label: dict[int, list[dict]] = {}
    for f in findings:
        by_label.setdefault(int(f["label"]), []).append(f)
    out = []
    for label, comps in sorted(by_label.items()):
        voxels = sum(int(c["voxel_count"]) for c in comps)
        mean = None
        if modality == "CT":
            mean = float(
                sum(float(c["mean_value"]) * int(c["voxel_count"]) for c in comps)
                / max(1, voxels)
            )
        out.append(
            Finding(
                label_number=label,
                label=str(comps[0]["label_name"]),
                volume_mm3=float(sum(float(c["volume_mm3"]) for c in comps)),
                max_diameter_mm=float(max(float(c["max_diameter_mm"]) for c in comps)),
                mean_intensity=mean,
            )
        )
    return out


def _safe_message(exc: BaseException) -> str:
    """Our own messages name attributes (never values); a third-party one may quote a
    value, so only its type and where it came from are kept."""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and "/dicomnode/" in frames[-1].filename.replace("\\", "/"):
        return f"{type(exc).__name__}: {exc}"
    origin = frames[-1].filename.rsplit("/", 2)[-2] if frames else "?"
    return f"{type(exc).__name__} raised in {origin}"


def _sources(
    ctx: TaskContext, result: Any
) -> tuple[list[Dataset], list[int] | None, str, np.ndarray]:
    """The sanitised source headers a result's SEG/SR are built on, its frame numbers (one
    multi-frame source) or None, the series' modality, and the mask on those frames.

    Raises
    ------
    InferenceError
        The series no longer matches the frames the result was made on.
    """
    mask, refs = ctx.results.load_mask(result)
    files = ctx.index.series_files(result.study_id).get(result.series_key, [])
    headers = []
    for path in files:
        with open(ctx.files.path(path), "rb") as fh:
            try:
                headers.append(dcmread(fh, stop_before_pixels=True))
            except Exception:  # unreadable: inference left it out the same way
                continue
    # The same headers give the same plan as at inference (assembly is deterministic).
    plan = plan_volume(headers)
    if [f.ref for f in plan.frames] != list(refs):
        raise InferenceError(
            "the series' frames differ from those the result was made on "
            f"({len(plan.frames)} now, {len(refs)} then)"
        )
    used: list[int] = []
    for f in plan.frames:
        if f.dataset_index not in used:
            used.append(f.dataset_index)
    sanitized = sanitized_sources(
        [headers[i] for i in used],
        list(plan.frames),
        slice_thickness=plan.spacing[0],
        surrogate_frame_of_reference_uid=surrogate_frame_of_reference(plan.series_instance_uid),
    )
    if all(f.frame_number is None for f in plan.frames):
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sanitized}
        return [by_uid[f.sop_instance_uid] for f in plan.frames], None, plan.modality, mask
    if len(sanitized) == 1:
        numbers = [int(f.frame_number or 1) for f in plan.frames]
        return sanitized, numbers, plan.modality, mask
    raise InferenceError("the volume mixes multi-frame and single-frame objects")


def destinations_for(ctx: TaskContext, study_id: int, model: str) -> list[str]:
    """Where a model's results go: its routing rule's destinations, else the defaults."""
    study = ctx.index.study(study_id)
    routes = (study.info or {}).get("routing", {}).get("routes", []) if study else []
    rule_names = {r["rule"] for r in routes if r["model"] == model}
    for rule in ctx.settings.routing.rules:
        if rule.name in rule_names and rule.destinations is not None:
            return list(rule.destinations)
    return list(ctx.settings.results.destinations)


def kinds_for(ctx: TaskContext, destination: str, study: Any) -> tuple[str, ...]:
    """The SEG/SR kinds a destination asks for ("caller" matching no peer: SEG and SR,
    so that its rows show up as unroutable instead of vanishing)."""
    found = resolve_peer(ctx, destination, study)
    if found is None:
        return ("SEG", "SR")
    return tuple(k for k in found[1].result_kinds if k in ("SEG", "SR"))


def encode_results(ctx: TaskContext, result_id: int) -> None:
    """Build the SEG and SR of one inference result and queue them for delivery."""
    result = ctx.results.get(result_id)
    if result is None or result.status != "done":
        return
    study = ctx.index.study(result.study_id)
    if study is None or study.version != result.study_version:
        return  # a later version is on its way; its own result will be encoded
    t0 = time.perf_counter()
    try:
        sources, frame_numbers, modality, mask = _sources(ctx, result)
    except InferenceError as exc:
        record_failure(ctx, result.study_id, result.model_name, f"results not encoded: {exc}")
        return
    registered = ctx.registry.get(result.model_name, result.model_version)
    assert registered is not None
    pkg = read_model_package(registered.path)
    rs = ctx.settings.results
    device = DeviceSpec(
        manufacturer=rs.manufacturer,
        manufacturer_model_name="dicomnode",
        software_versions=__version__,
        device_serial_number=ctx.settings.ae_title,
        device_observer_uid=derived_uid("dicomnode-device", ctx.settings.ae_title),
        device_observer_name=ctx.settings.ae_title,
        institution_name=rs.institution_name,
    )
    algorithm = AlgorithmSpec(name=pkg.name, version=pkg.version)
    segments = [
        SegmentSpec(
            number=lb.number,
            label=lb.name,
            category=(lb.category.scheme, lb.category.value, lb.category.meaning),
            type=(lb.type.scheme, lb.type.value, lb.type.meaning),
            rgb=lb.color,
        )
        for lb in pkg.labels
    ]
    key = (study.study_key, result.study_version, result.model_name, result.model_version)
    when = _dt.datetime.fromtimestamp(result.created_at).replace(microsecond=0)
    dests = destinations_for(ctx, result.study_id, result.model_name)
    objects: list[tuple[str, Dataset]] = []

    def previous(kind: str) -> InstanceReference | None:
        for dest in dests or ["-"]:
            prev = ctx.outbox.previous(
                result.study_id, result.model_name, kind, result.study_version, dest
            )
            if prev is not None:
                return InstanceReference(
                    study.study_key,
                    prev.series_instance_uid,
                    prev.sop_class_uid,
                    prev.sop_instance_uid,
                )
        return None

    kind = "SEG"
    try:
        seg = build_seg(
            sources,
            mask,
            segments,
            algorithm,
            device=device,
            series_instance_uid=derived_uid("seg-series", *key),
            sop_instance_uid=derived_uid("seg", *key),
            series_number=_KIND_SERIES_NUMBER["SEG"],
            series_description=f"{pkg.name} {pkg.version} segmentation",
            supersedes=previous("SEG"),
            content_datetime=when,
            frame_numbers=frame_numbers,
        )
        if rs.seg:
            objects.append(("SEG", seg))
        if rs.sr:
            kind = "SR"
            sr = build_measurement_report(
                sources,
                seg,
                _per_label(result.findings, modality),
                algorithm,
                device=device,
                series_instance_uid=derived_uid("sr-series", *key),
                sop_instance_uid=derived_uid("sr", *key),
                series_number=_KIND_SERIES_NUMBER["SR"],
                supersedes=previous("SR"),
                content_datetime=when,
            )
            objects.append(("SR", sr))
        encoded = [(k, _encode(ds)) for k, ds in objects]
    except Exception as exc:
        # Building is deterministic: a retry would fail the same way. Say what and why.
        record_failure(
            ctx,
            result.study_id,
            result.model_name,
            f"{kind} cannot be encoded: {_safe_message(exc)}",
        )
        log.error("study %d: %s of %s cannot be encoded: %s", result.study_id, kind,
                  result.model_name, _safe_message(exc))
        return
    encode_s = time.perf_counter() - t0
    metrics.STAGE_SECONDS.labels("encode").observe(encode_s)
    for (kind, ds), (_, data) in zip(objects, encoded, strict=True):
        path = (
            f"results/{study.study_key}/{kind.lower()}-v{result.study_version}-"
            f"{result.model_name}-{result.model_version}.dcm"
        )
        ctx.files.write(path, data)
        prev = previous(kind)
        for dest in dests:
            if kind not in kinds_for(ctx, dest, study):
                continue
            item, _ = ctx.outbox.add(
                study_id=result.study_id,
                result_id=result.id,
                study_version=result.study_version,
                model_name=result.model_name,
                model_version=result.model_version,
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                path=path,
                destination=dest,
                supersedes=prev.sop_instance_uid if prev else None,
                timings={},
            )
            if item.status == "pending" and item.attempts == 0:
                # dedup: a rerun of this task (after a crash) does not send twice
                ctx.queue.enqueue(
                    "send_result",
                    {"outbox_id": item.id},
                    dedup_key=f"send:{item.id}:first"
                    + (f":r{study.run}" if (study.run or 1) > 1 else ""),
                )
    summary = {
        "version": result.study_version,
        "run": study.run or 1,
        "model": result.model_name,
        "objects": [k for k, _ in objects],
        "destinations": dests,
        "image_destinations": [d for d in dests if kinds_for(ctx, d, study)],
        "encode_s": round(encode_s, 3),
    }
    ctx.index.update_info(result.study_id, results=summary)
    ctx.index.update_info_item(result.study_id, "encoded", result.model_name, summary)
    settle(ctx, result.study_id)


def reidentified(ctx: TaskContext, item_id: int) -> Dataset:
    """The outbox object, re-identified in memory (audited vault read).

    Raises
    ------
    ReidentificationError
        The guard found a pseudonym or marker left, or a reference has no vault entry.
    """
    item = ctx.outbox.get(item_id)
    assert item is not None
    study = ctx.index.study(item.study_id)
    assert study is not None
    ds = dcmread(io.BytesIO(ctx.files.read(item.path)))
    own = ctx.outbox.own_uids(item.study_id)
    # A source series without Frame of Reference UID got a surrogate one in the SEG
    # (dicom.sources): the object's own, like its SOP Instance UID.
    own |= {
        surrogate_frame_of_reference(str(e.value))
        for e in ds.iterall()
        if e.keyword == "SeriesInstanceUID" and e.value
    }
    with ctx.vault.reader("reidentify", f"result:{item.kind}", study.study_key) as r:
        identity = r.identity(study.study_key)
        if identity is None:
            raise ReidentificationError(f"no vault identity for study {study.study_key}")
        out = reidentify(
            ds,
            lambda u: u if u in own else r.original_uid(u),
            identity,
            is_pseudonym=r.is_pseudonym,
        )
    audit(
        "reidentified",
        user="reidentify",
        study_key=study.study_key,
        patient_key=study.patient_key,
        sop_class_uid=item.sop_class_uid,
        outbox_id=item.id,
        kind=item.kind,
    )
    return out

"""Results: the objects a model's output becomes (SEG, SR, Parametric Map, key image), and
their delivery.

``encode_results`` builds the package's result kinds (:mod:`dicomnode.pipeline.kinds`,
one encoder module per kind) on the *de-identified* headers (so what the
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

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode import __version__, metrics
from dicomnode.audit import audit
from dicomnode.dicom.deid import reidentify
from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec, InstanceReference, derived_uid
from dicomnode.dicom.sources import surrogate_frame_of_reference
from dicomnode.errors import InferenceError, ReidentificationError
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.pipeline.kinds import ENCODERS, EncodeJob, kinds_of
from dicomnode.pipeline.notify import resolve_peer
from dicomnode.pipeline.outcome import record_failure, settle

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["destinations_for", "encode_results", "kinds_for", "reidentified"]

log = logging.getLogger(__name__)

def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _safe_message(exc: BaseException) -> str:
    """Our own messages name attributes (never values); a third-party one may quote a
    value, so only its type and where it came from are kept."""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and "/dicomnode/" in frames[-1].filename.replace("\\", "/"):
        return f"{type(exc).__name__}: {exc}"
    origin = frames[-1].filename.rsplit("/", 2)[-2] if frames else "?"
    return f"{type(exc).__name__} raised in {origin}"


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
    """The object kinds a destination asks for ("caller" matching no peer: all of them,
    so that its rows show up as unroutable instead of vanishing)."""
    found = resolve_peer(ctx, destination, study)
    if found is None:
        return tuple(ENCODERS)
    return tuple(k for k in found[1].result_kinds if k in ENCODERS)


def encode_results(ctx: TaskContext, result_id: int) -> None:
    """Build the objects of one inference result (the package's kinds,
    :mod:`dicomnode.pipeline.kinds`) and queue them for delivery."""
    result = ctx.results.get(result_id)
    if result is None or result.status != "done":
        return
    study = ctx.index.study(result.study_id)
    if study is None or study.version != result.study_version:
        return  # a later version is on its way; its own result will be encoded
    t0 = time.perf_counter()
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
    dests = destinations_for(ctx, result.study_id, result.model_name)

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

    job = EncodeJob(
        ctx=ctx, result=result, study=study, package=pkg, device=device,
        algorithm=AlgorithmSpec(name=pkg.name, version=pkg.version),
        when=_dt.datetime.fromtimestamp(result.created_at).replace(microsecond=0),
        previous=previous,
    )
    kinds = kinds_of(getattr(pkg, "results", ("SEG", "SR")), seg_on=rs.seg, sr_on=rs.sr)
    objects: list[tuple[str, Dataset]] = []
    kind = kinds[0] if kinds else "-"
    try:
        for kind in kinds:
            job.built[kind] = ENCODERS[kind](job)
            objects += [(kind, ds) for ds in job.built[kind]]
        encoded = [(k, _encode(ds)) for k, ds in objects]
    except InferenceError as exc:
        record_failure(ctx, result.study_id, result.model_name, f"results not encoded: {exc}")
        return
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
        suffix = "" if len(job.built[kind]) == 1 else f"-{str(ds.SOPInstanceUID)[-12:]}"
        path = (
            f"results/{study.study_key}/{kind.lower()}-v{result.study_version}-"
            f"{result.model_name}-{result.model_version}{suffix}.dcm"
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

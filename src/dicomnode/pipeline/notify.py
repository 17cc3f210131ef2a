"""The worklist notification: one ORU^R01 per study version and ``hl7`` destination.

:func:`ensure_notifications` runs from :func:`~dicomnode.pipeline.outcome.settle`
once every SEG/SR of the study's current version and run is delivered: it records
one outbox row (kind ``notification``) per destination that asks for
notifications, and queues its delivery. It records nothing for a negative study
(no label present in any result) unless the destination has ``notify_negative``.

:func:`notification_for` builds the message content at send time: the original
identifiers come from the vault (an audited read, as for SEG/SR), the findings and
the priority from the study's results. Nothing identifying is stored.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import TYPE_CHECKING, Any

from dicomnode.audit import audit
from dicomnode.config import PeerSettings
from dicomnode.dicom.findings import derived_uid
from dicomnode.errors import ReidentificationError
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.pipeline.hl7 import Notification, Observation, control_id
from dicomnode.storage.models import OutboxItem, Study

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["ensure_notifications", "notification_destinations", "notification_for",
           "resolve_peer"]

KIND = "notification"


def resolve_peer(ctx: TaskContext, destination: str, study: Study | None
                 ) -> tuple[str, PeerSettings] | None:
    """(name, settings) of a destination; "caller" is the peer whose AE title sent the
    study. None when "caller" matches no peer."""
    if destination == "caller":
        return ctx.settings.peer_by_ae(study.calling_ae if study else None)
    peer = ctx.settings.peers.get(destination)
    return (destination, peer) if peer is not None else None


def notification_destinations(ctx: TaskContext, study: Study, destinations: list[str]
                              ) -> list[str]:
    """The destinations among ``destinations`` that ask for notifications."""
    out = []
    for dest in destinations:
        found = resolve_peer(ctx, dest, study)
        if found is not None and "notification" in found[1].result_kinds and dest not in out:
            out.append(dest)
    return out


def _results(ctx: TaskContext, study: Study) -> list[Any]:
    return [r for r in ctx.results.for_study(study.id)
            if r.study_version == study.version and r.status == "done"]


def _observations(ctx: TaskContext, study: Study) -> list[Observation]:
    """One observation per label of every model that made a result for this version."""
    out: list[Observation] = []
    for result in sorted(_results(ctx, study), key=lambda r: r.model_name):
        registered = ctx.registry.get(result.model_name, result.model_version)
        if registered is None:
            continue
        pkg = read_model_package(registered.path)
        by_label: dict[int, list[dict[str, Any]]] = {}
        for f in result.findings:
            by_label.setdefault(int(f["label"]), []).append(f)
        for lb in pkg.labels:
            comps = by_label.get(lb.number, [])
            out.append(Observation(
                code=(lb.type.value, lb.name, lb.type.scheme),
                present=bool(comps),
                model_name=result.model_name,
                model_version=result.model_version,
                volume_mm3=sum(float(c["volume_mm3"]) for c in comps) if comps else None,
                max_diameter_mm=max(float(c["max_diameter_mm"]) for c in comps)
                if comps else None,
            ))
    return out


def priority_of(peer: PeerSettings, observations: list[Observation]) -> str:
    """The first priority rule whose label is present, else the peer's default."""
    present = {o.code[1].lower() for o in observations if o.present}
    for rule in peer.priority_rules:
        if rule.label.lower() in present:
            return rule.priority
    return peer.default_priority


def ensure_notifications(ctx: TaskContext, study: Study, destinations: list[str]
                         ) -> list[OutboxItem]:
    """Record (once) and queue the notifications due for the study's current version.

    Idempotent: the rows are unique per (notification UID, destination), and a row
    is queued only while it has no attempt yet (once per pipeline run).
    Returns the rows of this version (new or earlier), none when nothing is due.
    """
    dests = notification_destinations(ctx, study, destinations)
    if not dests:
        return []
    results = _results(ctx, study)
    positive = any(r.findings for r in results)
    uid = derived_uid("notification", study.study_key, study.version)
    items = []
    for dest in dests:
        found = resolve_peer(ctx, dest, study)
        assert found is not None
        if not positive and not found[1].notify_negative:
            continue
        item, _ = ctx.outbox.add(
            study_id=study.id,
            result_id=None,
            study_version=study.version,
            model_name=",".join(sorted({r.model_name for r in results}))[:64],
            model_version=",".join(sorted({r.model_version for r in results}))[:64],
            kind=KIND,
            sop_class_uid="",
            sop_instance_uid=uid,
            series_instance_uid="",
            path="",
            destination=dest,
            supersedes=None,
            timings={},
        )
        if item.status == "pending" and item.attempts == 0:
            ctx.queue.enqueue(
                "send_result", {"outbox_id": item.id},
                dedup_key=f"send:{item.id}:first"
                + (f":r{study.run}" if (study.run or 1) > 1 else ""),
            )
        items.append(item)
    return items


def notification_for(ctx: TaskContext, item: OutboxItem, peer: PeerSettings) -> Notification:
    """The content of one notification, with the original identifiers (audited vault read).

    Raises
    ------
    ReidentificationError
        The vault holds no identity for the study.
    """
    study = ctx.index.study(item.study_id)
    if study is None:
        raise ReidentificationError(f"study {item.study_id} is gone")
    observations = _observations(ctx, study)
    with ctx.vault.reader("reidentify", f"result:{KIND}", study.study_key) as r:
        identity = r.identity(study.study_key)
    if identity is None:
        raise ReidentificationError(f"no vault identity for study {study.study_key}")
    audit(
        "reidentified",
        user="reidentify",
        study_key=study.study_key,
        patient_key=study.patient_key,
        outbox_id=item.id,
        kind=KIND,
    )
    return Notification(
        control_id=control_id(item.sop_instance_uid),
        sending_application=ctx.settings.ae_title,
        sending_facility=peer.sending_facility,
        receiving_application=peer.receiving_application,
        receiving_facility=peer.receiving_facility,
        patient_id=identity.patient_id,
        issuer_of_patient_id=identity.issuer_of_patient_id,
        patient_name=identity.patient_name,
        patient_birth_date=identity.patient_birth_date,
        patient_sex=identity.patient_sex,
        accession_number=identity.accession_number,
        placer_order_number=identity.placer_order_number,
        filler_order_number=identity.filler_order_number,
        priority=priority_of(peer, observations),
        observations=tuple(observations),
        observed_at=_dt.datetime.fromtimestamp(item.created_at or time.time()),
    )

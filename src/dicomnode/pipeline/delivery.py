"""Delivery of outbox items, whatever the transport: one state machine, three carriers.

``send_result`` claims a pending outbox row, resolves its destination to a peer,
and hands the item to the peer's transport:

========  =================================================================
dimse     C-STORE of the re-identified SEG/SR (``scp.scu``), then storage
          commitment when the peer asks for it
dicomweb  STOW-RS of the re-identified SEG/SR (``pipeline.dicomweb``)
hl7       ORU^R01 over MLLP (``pipeline.hl7``), content from ``pipeline.notify``
========  =================================================================

Every transport shares the outbox rules: a :class:`~dicomnode.errors.SendError`
schedules the next attempt (``results.retry_base_s`` doubling, capped at
``results.retry_max_s``) until ``results.max_attempts``, then dead-letters the item;
a :class:`~dicomnode.errors.DeliveryRefused` (the peer will refuse it again)
dead-letters it at once; a :class:`~dicomnode.errors.ReidentificationError` fails
closed (dead, never sent). Each attempt is audited and settles the study.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

from dicomnode import metrics
from dicomnode.audit import audit
from dicomnode.config import PeerSettings
from dicomnode.dicom.findings import derived_uid
from dicomnode.errors import DeliveryRefused, NodeError, ReidentificationError, SendError
from dicomnode.pipeline.dicomweb import stow
from dicomnode.pipeline.hl7 import build_oru, send_mllp
from dicomnode.pipeline.notify import KIND as NOTIFICATION
from dicomnode.pipeline.notify import notification_for, resolve_peer
from dicomnode.pipeline.outcome import settle
from dicomnode.pipeline.results import reidentified
from dicomnode.scp.scu import request_commitment, send_datasets
from dicomnode.storage.models import OutboxItem

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["send_result"]

log = logging.getLogger(__name__)

_STORED = (0x0000, 0xB000, 0xB006, 0xB007)


def _part10(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _peer_label(peer: PeerSettings) -> tuple[str | None, str | None]:
    """(AE title or None, address) of a peer for the audit trail."""
    if peer.transport == "dicomweb":
        return peer.ae_title, peer.url
    return peer.ae_title, peer.host


def _deliver(ctx: TaskContext, item: OutboxItem, peer: PeerSettings, attempts: int
             ) -> dict[str, float]:
    """Deliver one item over ``peer``'s transport; returns its timings.

    Raises
    ------
    SendError, DeliveryRefused, ReidentificationError
        As the module docstring says.
    """
    rs = ctx.settings.results
    t0 = time.perf_counter()
    if item.kind == NOTIFICATION:
        if peer.transport != "hl7":
            raise DeliveryRefused(f"{item.destination} is not an hl7 peer")
        try:
            message = build_oru(notification_for(ctx, item, peer))
        except ValueError as exc:  # missing identifiers: the same next time
            raise DeliveryRefused(f"notification cannot be built: {exc}") from None
        t1 = time.perf_counter()
        assert peer.host is not None and peer.port is not None
        send_mllp(peer.host, peer.port, message, timeout_s=rs.timeout_s)
        return {"reidentify_s": round(t1 - t0, 4), "send_s": round(time.perf_counter() - t1, 4)}
    ds = reidentified(ctx, item.id)
    t1 = time.perf_counter()
    if peer.transport == "dicomweb":
        assert peer.url is not None
        stow(peer.url, [_part10(ds)], [str(ds.SOPInstanceUID)],
             credentials=peer.credentials, tls_verify=peer.tls_verify, ca_file=peer.ca_file,
             timeout_s=rs.timeout_s)
    elif peer.transport == "dimse":
        assert peer.ae_title and peer.host is not None and peer.port is not None
        [status] = send_datasets([ds], peer.host, peer.port, calling_ae=ctx.settings.ae_title,
                                 called_ae=peer.ae_title, timeout_s=rs.timeout_s)
        if status not in _STORED:
            raise SendError(f"{peer.ae_title} answered C-STORE status 0x{status:04X}")
        if peer.storage_commitment:
            _request_commitment(ctx, item, peer, ds, attempts)
    else:
        raise DeliveryRefused(f"{item.destination} ({peer.transport}) does not take {item.kind}")
    return {"reidentify_s": round(t1 - t0, 4), "send_s": round(time.perf_counter() - t1, 4)}


def _request_commitment(ctx: TaskContext, item: OutboxItem, peer: PeerSettings, ds: Any,
                        attempts: int) -> None:
    # One transaction per item and attempt, recorded before the request: the report
    # can arrive (on another association) before the N-ACTION response does.
    assert peer.ae_title and peer.host and peer.port
    transaction = derived_uid("commitment", item.sop_instance_uid, item.destination, attempts)
    ctx.outbox.update(item.id, commitment_uid=transaction)
    try:
        request_commitment(
            transaction, [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))], peer.host, peer.port,
            calling_ae=ctx.settings.ae_title, called_ae=peer.ae_title,
            timeout_s=ctx.settings.results.timeout_s,
        )
    except NodeError as exc:  # stored but not committed: still sent, say why
        log.warning("outbox %d: storage commitment request failed: %s", item.id, exc)


def send_result(ctx: TaskContext, outbox_id: int) -> None:
    """Deliver one outbox item; on failure, schedule the next attempt or dead-letter it.

    Never raises for a delivery failure: the outbox row is the delivery state, and
    the retry is a new delayed job.
    """
    item = ctx.outbox.claim_send(outbox_id)
    if item is None:
        return
    study = ctx.index.study(item.study_id)
    found = resolve_peer(ctx, item.destination, study)
    problem = "no such peer" if found is None else found[1].address_problem()
    if found is None or problem is not None:
        ctx.outbox.update(item.id, status="unroutable",
                          last_error=f"{item.destination}: {problem}")
        metrics.SEND_FAILURES.labels(item.destination, "unroutable").inc()
        log.warning("outbox %d: %s has no address; not sent", item.id, item.destination)
        settle(ctx, item.study_id)
        return
    peer = found[1]
    rs = ctx.settings.results
    attempts = item.attempts + 1
    metrics.SEND_ATTEMPTS.labels(item.destination).inc()
    try:
        timings = _deliver(ctx, item, peer, attempts)
    except ReidentificationError as exc:
        # Fail closed: never send, never retry on its own; an operator looks at it.
        ctx.outbox.update(item.id, status="dead", attempts=attempts, last_error=str(exc))
        log.error("outbox %d refused by the re-identification guard: %s", item.id, exc)
        metrics.SEND_FAILURES.labels(item.destination, "dead").inc()
        audit("reidentified", user="reidentify", outcome=8, outcome_description=str(exc),
              sop_class_uid=item.sop_class_uid or None, outbox_id=item.id, kind=item.kind)
        settle(ctx, item.study_id)
        return
    except NodeError as exc:
        dead = attempts >= rs.max_attempts or isinstance(exc, DeliveryRefused)
        metrics.SEND_FAILURES.labels(item.destination, "dead" if dead else "retry").inc()
        _audit_send(ctx, item, peer, attempts, error=str(exc))
        if dead:
            ctx.outbox.update(item.id, status="dead", attempts=attempts, last_error=str(exc),
                              next_attempt_at=None)
            log.error("outbox %d dead after %d attempt(s): %s", item.id, attempts, exc)
            settle(ctx, item.study_id)
            return
        delay = min(rs.retry_max_s, rs.retry_base_s * 2 ** (attempts - 1))
        ctx.outbox.update(item.id, attempts=attempts, last_error=str(exc),
                          next_attempt_at=time.time() + delay)
        ctx.queue.enqueue("send_result", {"outbox_id": item.id}, delay_s=delay)
        log.warning("outbox %d attempt %d failed (%s); next in %.0f s", item.id, attempts, exc,
                    delay)
        return
    # Conditional: a commitment report may already have confirmed the item.
    ctx.outbox.mark_sent(item.id, attempts=attempts, timings=timings)
    metrics.STAGE_SECONDS.labels("reidentify").observe(timings["reidentify_s"])
    metrics.STAGE_SECONDS.labels("send").observe(timings["send_s"])
    _audit_send(ctx, item, peer, attempts)
    log.info("outbox %d: %s sent to %s (%s)", item.id, item.kind, item.destination,
             peer.transport)
    settle(ctx, item.study_id)


def _audit_send(ctx: TaskContext, item: OutboxItem, peer: PeerSettings, attempts: int,
                error: str | None = None) -> None:
    study = ctx.index.study(item.study_id)
    peer_ae, address = _peer_label(peer)
    audit(
        "result_sent",
        user=ctx.settings.ae_title,
        ae_title=ctx.settings.ae_title,
        peer_name=item.destination,
        peer_ae=peer_ae,
        peer_address=address,
        transport=peer.transport,
        study_key=study.study_key if study else None,
        sop_class_uid=item.sop_class_uid or None,
        outcome=0 if error is None else 4,
        outcome_description=error,
        outbox_id=item.id,
        kind=item.kind,
        attempt=attempts,
    )

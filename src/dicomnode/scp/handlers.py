"""pynetdicom event handlers: thin, with one documented status table.

C-STORE status contract (PS3.4 Table B.2-1; the 0xC2xx codes are ours within
the "Cannot understand" range):

======  ==============================================================================
Status  Meaning
======  ==============================================================================
0x0000  Stored durably and indexed, or the same bytes were already stored under this
        SOP Instance UID (idempotent re-send).
0xA700  Out of resources: the file or the index could not be written (disk full,
        permissions, database down). Nothing was kept.
0xA900  Data Set does not match SOP Class: its SOPClassUID differs from the
        request's Affected SOP Class UID.
0xC210  Cannot understand: the dataset is truncated or cannot be decoded.
0xC220  Cannot understand: StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID is
        missing or invalid, or SOPInstanceUID differs from the request's.
0xC211  Unexpected error in the node (logged with a traceback).
======  ==============================================================================

C-ECHO always answers 0x0000. Association-level refusals (unknown calling AE,
called AE not ours, too many associations) happen before these handlers, as
A-ASSOCIATE-RJ: in ``StorageServer.admit`` (recorded by :func:`record_rejection`) and
again in pynetdicom's ACSE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pynetdicom import evt

from dicomnode import metrics
from dicomnode.audit import audit
from dicomnode.errors import DatasetError, StorageError
from dicomnode.scp.gate import AssociationRequest, Rejection
from dicomnode.scp.ingest import Ingestor

__all__ = [
    "handle_assoc_event",
    "handle_echo",
    "handle_event_report",
    "handle_store",
    "record_rejection",
]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNEXPECTED = 0xC211


def handle_store(event: evt.Event, ingestor: Ingestor) -> int:
    """EVT_C_STORE: persist, index, answer (see the status table above)."""
    req = event.request
    calling_ae = event.assoc.requestor.ae_title or None
    try:
        ingestor.ingest(
            event.encoded_dataset(include_meta=False),
            str(event.context.transfer_syntax),
            calling_ae=calling_ae,
            affected_sop_class_uid=str(req.AffectedSOPClassUID),
            affected_sop_instance_uid=str(req.AffectedSOPInstanceUID),
        )
    except DatasetError as exc:
        log.warning("C-STORE from %s refused 0x%04X: %s", calling_ae, exc.status, exc)
        metrics.INSTANCES_REJECTED.labels(metrics.dimse_status(exc.status)).inc()
        return exc.status
    except StorageError as exc:
        log.error("C-STORE from %s failed 0xA700: %s", calling_ae, exc)
        metrics.INSTANCES_REJECTED.labels(metrics.dimse_status(STATUS_OUT_OF_RESOURCES)).inc()
        return STATUS_OUT_OF_RESOURCES
    except Exception:
        log.exception("C-STORE from %s failed 0xC211 (unexpected error)", calling_ae)
        metrics.INSTANCES_REJECTED.labels(metrics.dimse_status(STATUS_UNEXPECTED)).inc()
        return STATUS_UNEXPECTED
    metrics.INSTANCES_RECEIVED.inc()
    return STATUS_SUCCESS


CommitmentCallback = Callable[[str, set[str], dict[str, int]], int]


def handle_event_report(event: evt.Event, on_commitment: CommitmentCallback) -> tuple[int, None]:
    """EVT_N_EVENT_REPORT: a storage commitment report (PS3.4 J.3.3) for our results.

    Answers 0x0000 when the report was recorded, 0x0110 (processing failure) when it
    cannot be read, 0x0113 (no such event type) for event types other than 1 and 2.
    """
    if event.event_type not in (1, 2):
        return 0x0113, None
    try:
        info = event.event_information
        transaction = str(info.TransactionUID)
        committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
        failed = {
            str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0x0110))
            for i in info.get("FailedSOPSequence", [])
        }
    except Exception:  # a malformed report: tell the peer, never crash the association
        log.warning("unreadable storage commitment report from %s", event.assoc.requestor.ae_title)
        return 0x0110, None
    n = on_commitment(transaction, committed, failed)
    log.info(
        "storage commitment report from %s: %d committed, %d failed, %d item(s) settled",
        event.assoc.requestor.ae_title,
        len(committed),
        len(failed),
        n,
    )
    return 0x0000, None


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: always success."""
    return STATUS_SUCCESS


def handle_assoc_event(event: evt.Event) -> None:
    """Log, count and audit association lifecycle events (peer address and AE titles,
    no patient data)."""
    assoc = event.assoc
    peer = assoc.requestor
    name = event.event.name.removeprefix("EVT_").lower()
    log.info(
        "association %s: %s from %s:%s (called %s)",
        name,
        peer.ae_title,
        peer.address,
        peer.port,
        assoc.acceptor.ae_title,
    )
    metrics.ASSOCIATIONS.labels(name).inc()
    if name in ("accepted", "rejected"):
        audit(
            f"association_{name}",
            user=peer.ae_title,
            ae_title=peer.ae_title,
            address=peer.address,
            outcome=0 if name == "accepted" else 4,
            outcome_description=None if name == "accepted" else "A-ASSOCIATE-RJ sent",
            called_ae=assoc.acceptor.ae_title,
        )


def record_rejection(request: AssociationRequest, rejection: Rejection, our_ae: str) -> None:
    """Log, count and audit an A-ASSOCIATE-RJ sent by the admission check, as
    :func:`handle_assoc_event` does for pynetdicom's."""
    log.info(
        "association rejected: %s from %s:%s (called %s): %s",
        request.calling_ae,
        request.address,
        request.port,
        request.called_ae,
        rejection.why,
    )
    metrics.ASSOCIATIONS.labels("rejected").inc()
    audit(
        "association_rejected",
        user=request.calling_ae,
        ae_title=request.calling_ae,
        address=request.address,
        outcome=4,
        outcome_description=f"A-ASSOCIATE-RJ sent: {rejection.why}",
        called_ae=our_ae,
    )

"""Outgoing associations: C-ECHO (and, with the results issue, C-STORE)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)

from dicomnode.errors import SendError

__all__ = ["echo", "request_commitment", "send_datasets", "set_nodelay"]


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on our requestor socket.

    pynetdicom leaves Nagle on; against dcmtk peers (storescp, Orthanc) that stalls
    every message on the peer's delayed ACK, 6x slower (perf-baseline.md 2c).
    """
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def echo(host: str, port: int, *, calling_ae: str, called_ae: str, timeout_s: float = 10.0) -> int:
    """C-ECHO a peer and return the status.

    Raises
    ------
    SendError
        The association was rejected, aborted or could not be opened.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(f"association to {called_ae}@{host}:{port} {reason}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SendError(f"no C-ECHO response from {called_ae}@{host}:{port}")
    return int(status.Status)


def send_datasets(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    timeout_s: float = 30.0,
) -> list[int]:
    """C-STORE ``datasets`` over one association; return each object's status.

    Proposes each object's own transfer syntax plus Explicit and Implicit VR Little
    Endian, one presentation context per SOP class (pynetdicom allows 128 per
    association; results are a handful of classes).

    Raises
    ------
    SendError
        The association could not be opened or was rejected or aborted, or a
        C-STORE got no response. (pynetdicom signals these with an empty Dataset;
        this is the boundary where that becomes our error.)
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        ts = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        for uid in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in syntaxes:
                syntaxes.append(uid)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        reason = (
            "rejected"
            if assoc.is_rejected
            else "aborted"
            if assoc.is_aborted
            else "could not be opened"
        )
        raise SendError(f"association to {called_ae}@{host}:{port} {reason}")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise SendError(f"no C-STORE response from {called_ae}@{host}:{port}")
            statuses.append(int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def request_commitment(
    transaction_uid: str,
    references: Sequence[tuple[str, str]],
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    timeout_s: float = 30.0,
) -> int:
    """Ask a peer to commit to storing objects (PS3.4 J.3.2, N-ACTION Request Storage
    Commitment); return the N-ACTION status. The outcome arrives later, as an
    N-EVENT-REPORT on an association the peer opens to us.

    Raises
    ------
    SendError
        The association failed, or no N-ACTION response came.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(StorageCommitmentPushModel)
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        raise SendError(f"storage commitment association to {called_ae}@{host}:{port} failed")
    try:
        status, _ = assoc.send_n_action(
            ds, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise SendError(f"no N-ACTION response from {called_ae}@{host}:{port}")
    return int(status.Status)

"""The storage SCP: one pynetdicom AE behind the pre-association gate; plain and/or TLS."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from dicomnode.config import ScpSettings, TlsSettings
from dicomnode.scp import reactor
from dicomnode.scp.gate import AssociationGate, AssociationRequest, Rejection
from dicomnode.scp.handlers import (
    CommitmentCallback,
    handle_assoc_event,
    handle_echo,
    handle_event_report,
    handle_store,
    record_rejection,
)
from dicomnode.scp.ingest import Ingestor
from dicomnode.scp.slots import AssociationSlots
from dicomnode.scp.sopclasses import storage_sop_classes
from dicomnode.scp.transport import AdoptedServer, Listener, open_listener
from dicomnode.storage.diskguard import DiskGuard

__all__ = ["StorageServer", "open_listeners", "server_ssl_context"]

log = logging.getLogger(__name__)

# BCP 195 (RFC 9325): TLS 1.2+, forward-secret AEAD suites only.
_BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server-side TLS context per BCP 195, from the configured files.

    Raises
    ------
    ssl.SSLError, OSError
        When a certificate or key cannot be loaded (reported by the caller).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_BCP195_CIPHERS)
    assert tls.cert_file is not None and tls.key_file is not None  # checked by config
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class _SharedContext(PresentationContext):
    """A supported presentation context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies the server's supported contexts for every association
    (``RequestHandler._create_association``). Ours are every storage SOP class with every
    transfer syntax: 7,650 UIDs, each re-validated by pydicom's ``UID()`` on copy, 36 ms
    of CPU per association. A modality that opens one association per image would pay
    that per image. UIDs are immutable ``str``; the transfer syntax list is the only
    mutable part, so copying it alone gives what a deep copy gives.
    """

    @classmethod
    def of(cls, cx: PresentationContext) -> _SharedContext:
        """A copy of ``cx``: its UIDs shared, its transfer syntax list its own."""
        new = cls.__new__(cls)
        new.__dict__.update(cx.__dict__)
        new._transfer_syntax = list(cx._transfer_syntax)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContext:
        return _SharedContext.of(self)


_PYNETDICOM_POLL_S = 0.001
"""pynetdicom's own DUL poll interval (``dul._run_loop_delay``)."""


def _on_connection(event: evt.Event, event_reactor: bool) -> None:
    """EVT_CONN_OPEN: give the new association the event-driven reactor."""
    if event_reactor:
        reactor.install(event.assoc)


class StorageServer:
    """C-ECHO and C-STORE SCP for every storage SOP class and transfer syntax pynetdicom knows.

    Connections wait in the gate (``scp/gate.py``) until their A-ASSOCIATE-RQ is
    complete; :meth:`admit` then decides, and an admitted one becomes a pynetdicom
    association holding one of ``settings.max_associations`` slots until it ends.

    Parameters
    ----------
    ae_title
        Our AE title.
    settings
        The ``[scp]`` settings.
    allowed_calling_aes
        Calling AE titles let in (ignored when ``settings.accept_any_ae``).
    ingestor
        Where received objects go.
    on_commitment
        Receives storage commitment reports (N-EVENT-REPORT) for results we sent.
    slots
        The association slots; shared between receiving processes (``scp/pool.py``),
        else this server's own.
    disk
        The disk watermark (``storage.min_free_gb``); None: not checked.
    """

    def __init__(
        self,
        ae_title: str,
        settings: ScpSettings,
        allowed_calling_aes: list[str],
        ingestor: Ingestor,
        on_commitment: CommitmentCallback | None = None,
        *,
        slots: AssociationSlots | None = None,
        disk: DiskGuard | None = None,
    ) -> None:
        self.settings = settings
        self.disk = disk
        self.slots = slots or AssociationSlots(settings.max_associations)
        ae = AE(ae_title=ae_title)
        # Our slots count associations (admit); pynetdicom's own check counts threads,
        # ending ones included, so it is set out of the way.
        ae.maximum_associations = 1 << 20
        ae.maximum_pdu_size = settings.max_pdu
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = settings.require_called_ae
        ae.require_calling_aet = [] if settings.accept_any_ae else list(allowed_calling_aes)
        # Store bytes as sent: accept every transfer syntax, transcode nothing.
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # Storage commitment reports for our results arrive on associations the PACS
        # opens, where it plays the SCP role of the SOP class (PS3.4 J.3.3).
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.ae = ae
        self._allowed = frozenset(ae.require_calling_aet)
        self.contexts = [_SharedContext.of(cx) for cx in ae.supported_contexts]
        self._handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [ingestor]),
            (evt.EVT_C_ECHO, handle_echo),
            *(
                [(evt.EVT_N_EVENT_REPORT, handle_event_report, [on_commitment])]
                if on_commitment is not None
                else []
            ),
            (evt.EVT_CONN_OPEN, _on_connection, [settings.event_reactor]),
            (evt.EVT_ACCEPTED, handle_assoc_event),
            (evt.EVT_REJECTED, handle_assoc_event),
            (evt.EVT_ABORTED, handle_assoc_event),
        ]
        self._servers: dict[int, AdoptedServer] = {}  # by local port
        self._listeners: list[Listener] = []
        self._owns_listeners = False
        self._live: set[Association] = set()
        self._live_lock = threading.Lock()
        self._registered: Association | None = None
        self._poll_s = settings.poll_interval_s
        self.gate = AssociationGate(
            admit=self.admit,
            hand_off=self._hand_off,
            timeout_s=settings.preassociation_timeout_s,
            max_pending=settings.max_pending,
            max_pending_per_source=settings.max_pending_per_source,
            network_timeout_s=settings.network_timeout_s,
            audit_interval_s=settings.drop_audit_interval_s,
            on_reject=lambda request, rejection: record_rejection(
                request, rejection, self.ae.ae_title
            ),
            least_loaded=self.slots.least_loaded,
            on_pending=self.slots.set_pending,
        )
        self.ports: dict[str, int] = {}
        self.served = 0
        """Associations admitted since start."""

    # -- admission: the one place where a new association is let in or turned away -------

    def admit(self, request: AssociationRequest) -> Rejection | None:
        """Admit a complete A-ASSOCIATE-RQ, or say which A-ASSOCIATE-RJ to send.

        The checks run in this order; a new check (e.g. a disk watermark) goes before
        the slot is taken, so a rejected request never holds one:

        1. the calling AE title is allowed (unless ``scp.accept_any_ae``): else
           permanent, service-user, "calling AE title not recognized";
        2. the called AE title is ours (only with ``scp.require_called_ae``): else
           permanent, service-user, "called AE title not recognized";
        3. free space on the data directory above the watermark (``storage.min_free_gb``,
           ``storage.max_used_percent``): else transient, service-provider
           (presentation), "local limit exceeded" (PS3.8 9.3.4, Table 9-21: result 2,
           source 3, reason 2), so the sender keeps the objects and retries later;
        4. a free association slot (``scp.max_associations``, across every receiving
           process): else transient, service-provider (presentation), "local limit
           exceeded". The slot is given back when the association ends.

        pynetdicom's ACSE repeats checks 1 and 2 on the decoded request (the same rules).
        """
        if self._allowed and request.calling_ae not in self._allowed:
            return Rejection(1, 1, 3, "calling AE title not recognized")
        if self.settings.require_called_ae and request.called_ae != self.ae.ae_title:
            return Rejection(1, 1, 7, "called AE title not recognized")
        if self.disk is not None and (why := self.disk.refusal()) is not None:
            return Rejection(2, 3, 2, f"disk watermark: {why}")
        if not self.slots.try_take():
            return Rejection(2, 3, 2, "local limit exceeded")
        return None

    def _hand_off(self, sock: socket.socket, address: tuple[str, int], head: bytes) -> None:
        # On the gate thread, after admit() took a slot: the association's thread gives
        # it back when it ends; if no thread starts, give it back here.
        self._registered = None
        try:
            self._server_for(sock).start_association(sock, address, head)
        except Exception:
            assoc = self._registered
            if assoc is None or assoc.ident is None:  # its thread never ran
                if assoc is not None:
                    with self._live_lock:
                        self._live.discard(assoc)
                self.slots.release()
            raise

    def _server_for(self, sock: socket.socket) -> AdoptedServer:
        return self._servers[int(sock.getsockname()[1])]

    def _on_association(self, assoc: Association) -> None:
        """Before an admitted association's thread starts: poll rate, slot release."""
        run = assoc.run

        def run_and_release() -> None:
            try:
                run()
            finally:
                with self._live_lock:
                    self._live.discard(assoc)
                self.slots.release()
                self._retune()

        assoc.run = run_and_release  # type: ignore[method-assign]
        self._registered = assoc
        self.served += 1
        with self._live_lock:
            self._live.add(assoc)
        assoc.dul._run_loop_delay = self._poll_s
        self._retune()

    def _retune(self) -> None:
        """Poll fast while few associations run, at pynetdicom's pace when many do.

        A fast-polling network thread wakes ~5000 times a second: with one association
        that halves the time per C-STORE, with many on two cores the wake-ups compete
        with the work (DESIGN.md, "Polling per load").
        """
        s = self.settings
        fast = self.slots.active <= s.fast_poll_max_associations
        poll = s.poll_interval_s if fast else max(s.poll_interval_s, _PYNETDICOM_POLL_S)
        if poll == self._poll_s:
            return
        self._poll_s = poll
        with self._live_lock:
            live = list(self._live)
        for assoc in live:
            assoc.dul._run_loop_delay = poll

    # -- listening -----------------------------------------------------------------------

    def start(self, listeners: list[Listener] | None = None) -> None:
        """Start listening (plain, TLS or both, per ``scp.tls.mode``).

        ``listeners`` are sockets opened by :func:`open_listeners` in another process
        (receiving processes share them); without, this server opens its own.
        """
        s = self.settings
        if s.accept_any_ae:
            log.warning("accepting associations from any calling AE title (accept_any_ae)")
        elif not self.ae.require_calling_aet:
            log.warning("no calling AE title is allowed: add [peers.*] or use --accept-any-ae")
        if listeners is None:
            listeners = open_listeners(s)
            self._owns_listeners = True
        self._listeners = listeners
        for lst in listeners:
            ctx = server_ssl_context(s.tls) if lst.tls else None
            server = self.ae.make_server(
                lst.sock.getsockname()[:2],
                ae_title=self.ae.ae_title,
                contexts=self.contexts,
                evt_handlers=self._handlers,
                server_class=AdoptedServer,
                listener=lst,
                on_association=self._on_association,
            )
            self._servers[lst.port] = server
            self.gate.add_listener(lst.sock, ctx)
            self.ports[lst.name] = lst.port
            log.info("%s listening on %s:%d as %s", lst.name, s.host, lst.port, self.ae.ae_title)
        self.gate.start()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop listening; let running associations finish for ``grace_s``, then abort them."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        # Stop accepting; connections that never associated are dropped at once.
        self.gate.stop()
        if self._owns_listeners:
            for lst in self._listeners:
                lst.sock.close()
        self._servers.clear()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(a.is_established for a in self.live()):
            time.sleep(0.05)
        remaining = self.live()
        busy = sum(1 for a in remaining if a.is_established)
        for assoc in remaining:
            assoc.abort()
        if busy:
            log.warning("aborted %d association(s) still running at shutdown", busy)
        for assoc in remaining:
            assoc.join(5)

    def live(self) -> list[Association]:
        """This process's running associations."""
        with self._live_lock:
            return [a for a in self._live if a.is_alive()]


def open_listeners(settings: ScpSettings) -> list[Listener]:
    """The node's listening sockets per ``scp.tls.mode``: plain, TLS or both.

    Raises
    ------
    OSError
        A port is in use.
    """
    out = []
    if settings.tls.mode != "only":
        out.append(open_listener("dicom", settings.host, settings.port, tls=False))
    if settings.tls.mode != "off":
        port = settings.port if settings.tls.mode == "only" else settings.tls.port
        out.append(open_listener("dicom-tls", settings.host, port, tls=True))
    return out

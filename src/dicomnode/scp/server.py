"""The storage SCP: one pynetdicom AE, a plain and/or a TLS listener, graceful stop."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import ScpSettings, TlsSettings
from dicomnode.scp import reactor
from dicomnode.scp.handlers import (
    CommitmentCallback,
    handle_assoc_event,
    handle_echo,
    handle_event_report,
    handle_store,
)
from dicomnode.scp.ingest import Ingestor
from dicomnode.scp.sopclasses import storage_sop_classes

__all__ = ["StorageServer", "server_ssl_context"]

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


def _on_connection(event: evt.Event, poll_interval_s: float, event_reactor: bool) -> None:
    """EVT_CONN_OPEN: tune the new association's socket, network thread and reactor."""
    assoc = event.assoc
    if event_reactor:
        reactor.install(assoc)
    # pynetdicom's DUL thread sleeps _run_loop_delay (1 ms) whenever its socket had
    # nothing to read; with several PDUs and a response per C-STORE that sleep halves
    # throughput (0.95 s -> 0.5 s for 300 CT slices with a null handler, DESIGN.md).
    # The attribute is pynetdicom's documented knob for that trade-off (dul.py).
    assoc.dul._run_loop_delay = poll_interval_s
    # Our responses are single writes, but switch Nagle off as dcmtk's TCP_NODELAY=1 does.
    try:
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


class StorageServer:
    """C-ECHO and C-STORE SCP for every storage SOP class and transfer syntax pynetdicom knows.

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
    """

    def __init__(
        self,
        ae_title: str,
        settings: ScpSettings,
        allowed_calling_aes: list[str],
        ingestor: Ingestor,
        on_commitment: CommitmentCallback | None = None,
    ) -> None:
        self.settings = settings
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = settings.max_associations
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
        self.contexts = [_SharedContext.of(cx) for cx in ae.supported_contexts]
        self._handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [ingestor]),
            (evt.EVT_C_ECHO, handle_echo),
            *(
                [(evt.EVT_N_EVENT_REPORT, handle_event_report, [on_commitment])]
                if on_commitment is not None
                else []
            ),
            (evt.EVT_CONN_OPEN, _on_connection,
             [settings.poll_interval_s, settings.event_reactor]),
            (evt.EVT_ACCEPTED, handle_assoc_event),
            (evt.EVT_REJECTED, handle_assoc_event),
            (evt.EVT_ABORTED, handle_assoc_event),
        ]
        self._servers: list[ThreadedAssociationServer] = []
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        """Start listening (plain, TLS or both, per ``scp.tls.mode``)."""
        s = self.settings
        if s.accept_any_ae:
            log.warning("accepting associations from any calling AE title (accept_any_ae)")
        elif not self.ae.require_calling_aet:
            log.warning("no calling AE title is allowed: add [peers.*] or use --accept-any-ae")
        if s.tls.mode != "only":
            self._listen("dicom", s.port, None)
        if s.tls.mode != "off":
            port = s.port if s.tls.mode == "only" else s.tls.port
            self._listen("dicom-tls", port, server_ssl_context(s.tls))

    def _listen(self, name: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        server = self.ae.start_server(
            (self.settings.host, port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=self._handlers,
            contexts=self.contexts,
        )
        assert server is not None
        self._servers.append(server)
        self.ports[name] = server.server_address[1]
        log.info(
            "%s listening on %s:%d as %s",
            name,
            self.settings.host,
            self.ports[name],
            self.ae.ae_title,
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Stop listening; let running associations finish for ``grace_s``, then abort them."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        for server in self._servers:
            # Stop accepting without aborting running associations (ae.shutdown would).
            server.shutdown()
        self._servers = []
        deadline = time.monotonic() + grace
        # Wait for established associations only: a connection that never sent an
        # A-ASSOCIATE-RQ (a port probe, a health check) would hold us for acse_timeout.
        while time.monotonic() < deadline and any(
            a.is_established for a in self.ae.active_associations
        ):
            time.sleep(0.05)
        remaining = self.ae.active_associations
        busy = sum(1 for a in remaining if a.is_established)
        for assoc in remaining:
            assoc.abort()
        if busy:
            log.warning("aborted %d association(s) still running at shutdown", busy)
        for assoc in remaining:
            assoc.join(5)

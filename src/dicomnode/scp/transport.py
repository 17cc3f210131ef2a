"""Listening sockets, and how a connection admitted by the gate becomes a pynetdicom association.

pynetdicom 3's ``AssociationServer`` binds its own socket and accepts in its own loop; the
node instead owns its listening sockets (several receiving processes share them, see
``scp/pool.py``) and accepts in ``scp/gate.py``. :class:`AdoptedServer` is a pynetdicom
server around such a socket whose accept loop never runs: it keeps what pynetdicom's
associations need from a server (the event handlers, the contexts, the AE title, the
address) and :meth:`AdoptedServer.start_association` starts an acceptor association
on a connection the gate has admitted, with the bytes the gate already read replayed
first (:class:`ReplaySocket`). The association's thread is pynetdicom's.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

__all__ = ["AdoptedServer", "Listener", "ReplaySocket", "open_listener"]

_BACKLOG = 512
"""Listen backlog: a burst of modalities connecting at once waits in the kernel, not refused."""


@dataclass
class Listener:
    """A listening socket of the node: ``name`` is dicom or dicom-tls."""

    name: str
    sock: socket.socket
    tls: bool

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def open_listener(name: str, host: str, port: int, *, tls: bool) -> Listener:
    """Bind and listen on ``host:port`` (IPv4 or IPv6 by the host's form).

    Raises
    ------
    OSError
        The address is in use or not ours.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return Listener(name, sock, tls)


class ReplaySocket(AssociationSocket):
    """pynetdicom's socket wrapper that first hands out bytes read before the association.

    The gate reads the A-ASSOCIATE-RQ PDU to know that it is complete (TLS sockets
    cannot peek); the association's network thread then reads it from here.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, head: bytes) -> None:
        self._head = bytearray(head)
        self._head_lock = threading.Lock()
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:  # type: ignore[override]
        if self._head:
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        with self._head_lock:
            if self._head:
                out = self._head[:nr_bytes]
                del self._head[:nr_bytes]
                if len(out) == nr_bytes:
                    return out
                rest = super().recv(nr_bytes - len(out))
                return out + rest
        return super().recv(nr_bytes)


class _GateHandler(RequestHandler):
    """pynetdicom's request handler, for a connection the gate admitted.

    ``request`` is ``(socket, bytes already read)``. The association is built as in
    ``RequestHandler._create_association`` (pynetdicom 3.0), with a :class:`ReplaySocket`.
    """

    server: AdoptedServer

    def _create_association(self) -> Association:
        sock, head = cast(tuple[socket.socket, bytes], self.request)
        ae = self.ae
        server = self.server
        assoc = Association(ae, "acceptor")
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(ReplaySocket(assoc, sock, head))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        # deep copies of the server's contexts: cheap for ours (server._SharedContext)
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        server.on_association(assoc)
        return assoc


class AdoptedServer(AssociationServer):
    """A pynetdicom association server around a listening socket the node owns.

    Its accept loop (``serve_forever``) is never run: the gate accepts, and
    :meth:`start_association` starts an admitted connection's association.
    ``on_association(assoc)`` is called for each before its thread starts.
    """

    def __init__(self, *args: Any, listener: Listener,
                 on_association: Callable[[Association], None], **kwargs: Any) -> None:
        self._listener = listener
        self.on_association = on_association
        super().__init__(*args, request_handler=_GateHandler, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a socket of its own: use ours instead (already bound).
        cast(socket.socket, self.socket).close()
        self.socket = self._listener.sock
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # already listening

    def server_close(self) -> None:
        pass  # the listener belongs to the node, which closes it

    def start_association(self, sock: socket.socket, address: tuple[str, int],
                          head: bytes) -> None:
        """Start the acceptor association of an admitted connection (its own thread)."""
        self.finish_request((sock, head), address)  # type: ignore[arg-type]

"""The pre-association gate: TCP connections wait here, cheaply, until they ask to associate.

pynetdicom 3 starts an association thread (and its network thread) for every accepted
socket and counts those threads against ``maximum_associations``: a port probe, a load
balancer's health check or a peer that never sends an A-ASSOCIATE-RQ held a slot and two
threads for the whole ACSE timeout, also after it had closed its socket. Here a
connection is only a non-blocking socket in one selector until its A-ASSOCIATE-RQ PDU
(PS3.8 9.3.2) has fully arrived; only then does the server admit it and hand it to
pynetdicom. Until then:

- a peer that closes, or sends nothing complete within ``timeout_s`` (TLS handshake
  included), is dropped at once;
- a first PDU other than A-ASSOCIATE-RQ is answered with A-ABORT (service-provider
  source, reason unrecognized-PDU or unexpected-PDU, PS3.8 9.3.8) and dropped, as the
  state machine prescribes for Sta2 (AA-1);
- a source address may hold at most ``max_pending_per_source`` such connections and the
  gate at most ``max_pending``: one noisy host cannot lock the others out;
- TLS handshakes run non-blocking here (pynetdicom 3 would run them in its accept loop,
  where one silent TLS client blocks every other connection).

Every drop increments ``dicomnode_connections_dropped{reason}`` and is audited, at most
one line per source address per ``audit_interval_s`` (with the counts since the last).

One thread serves every pending connection of a process. Several processes may share a
listening socket: an accept that another process won is simply skipped, and a process
that is busier than another (``least_loaded``) leaves the next connection to the others
for a moment (``_DEFER_S``), so that sixteen modalities connecting at once spread over
the processes instead of all landing on whichever woke first.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicomnode import metrics
from dicomnode.audit import audit

__all__ = ["AssociationGate", "AssociationRequest", "Rejection"]

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_MAX_BUFFERED = 256 * 1024
"""Bytes of an A-ASSOCIATE-RQ read ahead at most; a longer PDU (very rare: huge user
identity tokens) is handed over once this much arrived and pynetdicom reads the rest."""
_ACCEPT_BATCH = 64
_DEFER_S = 0.003
"""How long a busier process leaves a waiting connection to the others before it takes
it anyway (a less loaded process that does not take it may be stuck)."""


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send instead of admitting (PS3.8 9.3.4).

    ``result`` 1 permanent / 2 transient; ``source`` 1 service-user, 2 service-provider
    (ACSE), 3 service-provider (presentation); ``reason`` per source (for 3: 1 temporary
    congestion, 2 local limit exceeded). ``why`` is logged and audited.
    """

    result: int
    source: int
    reason: int
    why: str

    def pdu(self) -> bytes:
        """The encoded A-ASSOCIATE-RJ PDU."""
        return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, self.result, self.source, self.reason)


@dataclass(frozen=True)
class AssociationRequest:
    """A connection whose A-ASSOCIATE-RQ has arrived, as the admission check sees it."""

    address: str
    port: int
    calling_ae: str
    called_ae: str
    tls: bool


def _abort_pdu(reason: int) -> bytes:
    # A-ABORT, source 2 (service provider), reason as given (PS3.8 Table 9-26)
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    host: str
    port: int
    deadline: float
    tls: bool
    handshaken: bool
    buf: bytearray = field(default_factory=bytearray)
    events: int = selectors.EVENT_READ


class _DropLog:
    """Counts every drop; audits at most one line per source address per interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, collections.Counter[str]] = {}

    def record(self, host: str, reason: str) -> None:
        metrics.CONNECTIONS_DROPPED.labels(reason).inc()
        self._held.setdefault(host, collections.Counter())[reason] += 1
        if time.monotonic() - self._last.get(host, -1e18) >= self.interval_s:
            self._write(host)

    def flush(self, *, everything: bool = False) -> None:
        """Write the lines held back whose interval has passed (all with ``everything``)."""
        now = time.monotonic()
        for host in [h for h in self._held
                     if everything or now - self._last.get(h, -1e18) >= self.interval_s]:
            self._write(host)
        if len(self._last) > 10_000:  # forget quiet hosts: the map stays bounded
            self._last = {h: t for h, t in self._last.items() if now - t < self.interval_s}

    def _write(self, host: str) -> None:
        counts = self._held.pop(host, None)
        if not counts:
            return
        self._last[host] = time.monotonic()
        tls = counts.get("tls_handshake", 0)
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
        log.warning("connections from %s dropped before associating: %s", host, reasons)
        audit(
            "tls_handshake_failed" if tls == sum(counts.values()) else "connection_dropped",
            user=host,
            address=host,
            outcome=4,
            outcome_description="connection closed before an A-ASSOCIATE-RQ was accepted",
            reasons=dict(counts),
            interval_s=self.interval_s,
        )


class AssociationGate:
    """Holds accepted connections until their A-ASSOCIATE-RQ is complete.

    Parameters
    ----------
    admit
        Decides on a complete request: None to admit, or the :class:`Rejection` to send.
        Called on the gate thread; must be quick.
    hand_off
        Takes an admitted connection (blocking socket, peer address, the bytes already
        read); called on the gate thread after ``admit`` returned None.
    timeout_s
        From accept to a complete A-ASSOCIATE-RQ, TLS handshake included.
    max_pending, max_pending_per_source
        Connections waiting here at most, in all and per source address.
    network_timeout_s
        Socket timeout of handed-off connections (a peer stalling in mid-PDU).
    audit_interval_s
        At most one audit line per source address per this interval.
    on_reject
        Told of each rejection sent (request, rejection), for logs and metrics.
    least_loaded
        With several processes on one listening socket: whether this process should
        take the next connection now (else it waits ``_DEFER_S`` first).
    on_pending
        Told how many connections wait here whenever that changes.
    """

    def __init__(
        self,
        *,
        admit: Callable[[AssociationRequest], Rejection | None],
        hand_off: Callable[[socket.socket, tuple[str, int], bytes], None],
        timeout_s: float,
        max_pending: int,
        max_pending_per_source: int,
        network_timeout_s: float | None,
        audit_interval_s: float = 60.0,
        on_reject: Callable[[AssociationRequest, Rejection], None] | None = None,
        least_loaded: Callable[[], bool] | None = None,
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        self.least_loaded = least_loaded
        self.on_pending = on_pending
        self._deferred: dict[socket.socket, float] = {}  # listener -> take anyway at
        self.admit = admit
        self.hand_off = hand_off
        self.on_reject = on_reject
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.network_timeout_s = network_timeout_s
        self.drops = _DropLog(audit_interval_s)
        self._sel = selectors.DefaultSelector()
        self._listeners: dict[socket.socket, ssl.SSLContext | None] = {}
        # Insertion order is deadline order: every connection gets the same timeout.
        self._pending: dict[socket.socket, _Pending] = {}
        self._per_source: collections.Counter[str] = collections.Counter()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Connections waiting for their A-ASSOCIATE-RQ now."""
        return len(self._pending)

    def add_listener(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Accept connections on ``sock`` (listening), with TLS when ``ssl_context``.

        Call before :meth:`start` (the selector belongs to the gate thread after that).
        """
        if self._thread is not None:
            raise RuntimeError("add listeners before the gate starts")
        sock.setblocking(False)
        self._listeners[sock] = ssl_context
        self._sel.register(sock, selectors.EVENT_READ, sock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="association-gate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; drop every pending connection (none of them was associated)."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for p in list(self._pending.values()):
            self._close(p)
        self._pending.clear()
        self.drops.flush(everything=True)
        for sock in self._listeners:
            self._unregister(sock)
        self._listeners.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            first = next(iter(self._pending.values()), None)
            timeout = 1.0 if first is None else min(1.0, max(0.0, first.deadline - now))
            if self._deferred:
                timeout = min(timeout, max(0.0, min(self._deferred.values()) - now))
            ready = self._sel.select(timeout)
            for key, mask in ready:
                if key.data is None:
                    self._drain_wake()
                elif key.data is key.fileobj and key.fileobj in self._listeners:
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    self._advance(key.data, mask)
            now = time.monotonic()
            for listener, at in list(self._deferred.items()):
                if at <= now:  # nobody took it: take it now
                    del self._deferred[listener]
                    self._sel.register(listener, selectors.EVENT_READ, listener)
                    self._accept(listener, force=True)
            self._expire(now)
            if time.monotonic() - last_flush >= 1.0:
                last_flush = time.monotonic()
                self.drops.flush()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self, listener: socket.socket, *, force: bool = False) -> None:
        ctx = self._listeners.get(listener)
        for _ in range(_ACCEPT_BATCH):
            if not force and self.least_loaded is not None and not self.least_loaded():
                # Leave it to a less busy process; the listener rests meanwhile (it stays
                # readable, and would wake this loop without pause).
                self._unregister(listener)
                self._deferred[listener] = time.monotonic() + _DEFER_S
                return
            force = False
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing left, or another receiving process took it
            except OSError as exc:
                log.warning("accept failed: %s", exc.strerror or exc.__class__.__name__)
                return
            host, port = str(addr[0]), int(addr[1])
            if len(self._pending) >= self.max_pending:
                self.drops.record(host, "pending_limit")
                sock.close()
                continue
            if self._per_source[host] >= self.max_pending_per_source:
                self.drops.record(host, "source_limit")
                sock.close()
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            p = _Pending(sock, host, port, time.monotonic() + self.timeout_s,
                         tls=ctx is not None, handshaken=ctx is None)
            self._pending[sock] = p
            self._per_source[host] += 1
            self._sel.register(sock, selectors.EVENT_READ, p)
            self._pending_changed()
            # The request often arrives with the connection: look now, not after a wake-up.
            self._advance(p, selectors.EVENT_READ)

    def _advance(self, p: _Pending, mask: int) -> None:
        if p.sock not in self._pending:
            return
        if not p.handshaken:
            try:
                p.sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                return self._want(p, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._want(p, selectors.EVENT_WRITE)
            except (ssl.SSLError, OSError):
                return self._drop(p, "tls_handshake")
            p.handshaken = True
            self._want(p, selectors.EVENT_READ)
        closed = False
        try:
            while len(p.buf) < _MAX_BUFFERED:
                chunk = p.sock.recv(_MAX_BUFFERED - len(p.buf))
                if not chunk:
                    closed = True
                    break
                p.buf += chunk
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            pass
        except ssl.SSLWantWriteError:
            return self._want(p, selectors.EVENT_WRITE)
        except OSError:
            closed = True
        buf = p.buf
        if buf and buf[0] not in _KNOWN_PDU_TYPES:
            return self._abort(p, 0x01, "not_dicom")  # unrecognized PDU
        if buf and buf[0] != A_ASSOCIATE_RQ:
            return self._abort(p, 0x02, "unexpected_pdu")  # unexpected PDU
        if len(buf) >= 6:
            (length,) = struct.unpack_from(">I", buf, 2)
            if len(buf) >= min(6 + length, _MAX_BUFFERED):
                return self._admit(p)
        if closed:
            self._drop(p, "closed" if not buf else "incomplete")

    def _want(self, p: _Pending, events: int) -> None:
        if p.events != events:
            p.events = events
            self._sel.modify(p.sock, events, p)

    def _expire(self, now: float) -> None:
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.deadline > now:
                return
            self._drop(p, "timeout" if p.handshaken else "tls_handshake")

    # -- endings -------------------------------------------------------------------------

    def _forget(self, p: _Pending) -> None:
        if self._pending.pop(p.sock, None) is not None:
            self._per_source[p.host] -= 1
            if self._per_source[p.host] <= 0:
                del self._per_source[p.host]
            self._pending_changed()
        self._unregister(p.sock)

    def _pending_changed(self) -> None:
        if self.on_pending is not None:
            self.on_pending(len(self._pending))

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    @staticmethod
    def _close(p: _Pending) -> None:
        try:
            p.sock.close()
        except OSError:
            pass

    def _drop(self, p: _Pending, reason: str) -> None:
        self._forget(p)
        self._close(p)
        self.drops.record(p.host, reason)

    def _send_and_close(self, p: _Pending, pdu: bytes) -> None:
        try:
            p.sock.setblocking(True)
            p.sock.settimeout(1.0)
            p.sock.sendall(pdu)
        except (OSError, ValueError):
            pass
        self._close(p)

    def _abort(self, p: _Pending, reason: int, why: str) -> None:
        self._forget(p)
        self._send_and_close(p, _abort_pdu(reason))
        self.drops.record(p.host, why)

    def _admit(self, p: _Pending) -> None:
        self._forget(p)
        buf = bytes(p.buf)
        request = AssociationRequest(
            address=p.host,
            port=p.port,
            called_ae=_ae(buf[10:26]),
            calling_ae=_ae(buf[26:42]),
            tls=p.tls,
        )
        try:
            rejection = self.admit(request)
        except Exception:
            log.exception("admission check failed; rejecting (transient)")
            rejection = Rejection(2, 3, 1, "admission check failed")
        if rejection is not None:
            self._send_and_close(p, rejection.pdu())
            if self.on_reject is not None:
                self.on_reject(request, rejection)
            return
        try:
            p.sock.setblocking(True)
            p.sock.settimeout(self.network_timeout_s)
            self.hand_off(p.sock, (p.host, p.port), buf)
        except Exception:
            log.exception("could not start an association for %s", p.host)
            self._close(p)


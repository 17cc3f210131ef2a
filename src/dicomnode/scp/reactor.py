"""An event-driven acceptor loop for pynetdicom 3 associations.

pynetdicom's acceptor reactor (``Association._run_reactor``) sleeps a fixed 1 ms before
each look at its queue of decoded DIMSE messages. A C-STORE sender waits for each
response before sending the next object, so that sleep lands on every instance: on
loopback it is a quarter of the time per CT slice (docs/benchmarks.md, "Ingest").

:func:`install` replaces the loop of one acceptor association with the same loop that
instead *waits on the queue* for up to the same 1 ms: a message that arrives is served
at once, and release, abort, a dead network thread and the idle timer are still checked
at least every millisecond, exactly as before. Everything else is pynetdicom's.

Pausing (``_reactor_checkpoint``, used when an acceptor sends DIMSE requests itself) is
kept: a ``send_*`` waits for ``_is_paused`` before it sends, so no response it awaits can
be taken off the queue by the wait below.

The loop body is pynetdicom 3.0's; :func:`install` does nothing on other major versions,
which then run their own loop (``pyproject.toml`` pins ``pynetdicom<4``).

:func:`install_dul` does the same for the association's network thread (pynetdicom's
``DULServiceProvider.run_reactor``), which sleeps ``_run_loop_delay`` whenever nothing
happened and then polls its socket with a zero-timeout ``select``: at 0.2 ms that is
~5000 wake-ups a second per association, a third of a receiving process's CPU on one
association and a crowd of GIL hand-offs with sixteen. The replacement waits instead,
in one ``select`` on the socket and an eventfd that is signalled when the association
queues a primitive to send (a response, a release) or stops the thread: incoming data
and outgoing responses are served at once, and an idle association wakes only to check
its ARTIM timer (at most every ``_IDLE_CHECK_S``).
"""

from __future__ import annotations

import os
import queue
import select
import types
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ

__all__ = ["install", "install_dul", "supported"]

_CHECK_EVERY_S = 0.001  # pynetdicom's own reactor period
_IDLE_CHECK_S = 0.05
"""Longest wait of an idle network thread (its ARTIM timer has seconds of resolution)."""


def supported() -> bool:
    """True when this pynetdicom's acceptor loop is the one this module mirrors."""
    return pynetdicom.__version__.split(".")[0] == "3"


def install(assoc: Any) -> bool:
    """Give acceptor ``assoc`` the event-driven loop; call before ``assoc.start()``.

    Returns False (and changes nothing) on a pynetdicom this module does not mirror.
    """
    if not supported():
        return False
    assoc._run_reactor = types.MethodType(_run_reactor, assoc)
    return True


def _run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``Association._run_reactor`` with a queue wait for its sleep."""
    self._is_paused = False
    msg_queue = self.dimse.msg_queue
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = msg_queue.get(timeout=_CHECK_EVERY_S)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _association.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives to send; every put wakes its network thread."""

    def __init__(self, wake_fd: int) -> None:
        super().__init__()
        self._wake_fd = wake_fd

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        _signal(self._wake_fd)


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:  # closed: the thread has ended
        pass


class _EventDUL(_dul.DULServiceProvider):
    """pynetdicom's DUL whose stop request (``_kill_thread = True``) wakes its thread."""

    @property  # type: ignore[override]
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("_dicomnode_kill", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_dicomnode_kill"] = value
        if value:
            _signal(self.__dict__["_dicomnode_wake"])


def install_dul(assoc: Any) -> bool:
    """Give ``assoc``'s network thread the waiting loop; call before ``assoc.start()``.

    Returns False (and changes nothing) on a pynetdicom this module does not mirror.
    """
    if not supported() or not hasattr(os, "eventfd"):
        return False
    dul = assoc.dul
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dul.__dict__["_dicomnode_wake"] = wake
    dul.__dict__["_dicomnode_kill"] = dul.__dict__.pop("_kill_thread", False)
    dul.__class__ = _EventDUL
    dul.to_provider_queue = _WakingQueue(wake)
    dul._target = types.MethodType(_run_dul, dul)
    return True


def _run_dul(self: Any) -> None:
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor`` with a wait for its sleep."""
    wake = self.__dict__["_dicomnode_wake"]
    try:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _dul.LOGGER.error("Exception in DUL.run(), aborting association")
                _dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                _wait(self, wake)
                continue
            self.state_machine.do_action(event)
    finally:
        self.__dict__["_dicomnode_wake"] = -1
        os.close(wake)


def _wait(dul: Any, wake: int) -> None:
    """Until the socket has data, a primitive is queued, the thread is stopped, or the
    ARTIM timer may have expired."""
    if not dul.to_provider_queue.empty() or dul._kill_thread:
        return
    sock = dul.socket.socket if dul.socket is not None else None
    timeout = _IDLE_CHECK_S
    if dul.artim_timer._start_time is not None and dul.artim_timer._end_time is None:
        timeout = min(timeout, max(0.0, dul.artim_timer.remaining))
    fds = [wake] if sock is None else [wake, sock]
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):  # the socket was closed meanwhile
        return
    if wake in ready:
        try:
            os.eventfd_read(wake)
        except OSError:
            pass

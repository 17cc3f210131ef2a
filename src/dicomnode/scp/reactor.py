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
"""

from __future__ import annotations

import queue
import types
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import evt

__all__ = ["install", "supported"]

_CHECK_EVERY_S = 0.001  # pynetdicom's own reactor period


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

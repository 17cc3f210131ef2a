"""Several receiving processes sharing the node's listening sockets (``scp.processes``).

One Python process serves every association with one GIL: on two cores, sixteen
modalities sending at once got a quarter of Orthanc's throughput (DESIGN.md, "Several
receiving processes"). The main process opens the listening sockets and starts N
receiving processes that each accept on them (whichever is free takes the next
connection), run their own associations and write the same spool and index (SQLite in
WAL mode with a busy timeout, or PostgreSQL). The job workers, the completion loop and
the API stay in the main process, out of the receivers' GIL.

What crosses process boundaries:

- the listening sockets, passed at start;
- the association slots: one shared-memory cell per process (``scp/slots.py``), so
  ``scp.max_associations`` is the node's limit; a dead process's cell is cleared;
- counter values, sent to the main process every second and added to its counters
  (``metrics.counter_values``), so ``/metrics`` counts what every process received;
- a stop request (with the grace period), and end of file when the main process dies:
  receivers then exit at once, as if killed with it (Linux also sends them SIGKILL).

Processes start from a fork server that has imported the receiving code once
(``multiprocessing`` "forkserver"): no process is forked from the threaded main
process, and a receiver that dies is replaced in milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from dicomnode import metrics
from dicomnode.config import ScpSettings
from dicomnode.errors import NodeError
from dicomnode.scp.slots import AssociationSlots
from dicomnode.scp.transport import Listener

__all__ = ["ReceiverPool", "Receiving"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0
_RESTART_DELAY_S = 1.0


class Receiving(Protocol):
    """What a receiving process runs: made by the pool's ``target``."""

    def stop(self, grace_s: float | None = None) -> None: ...


ReceiverTarget = Callable[..., Receiving]
"""``target(*args, listeners=..., slots=..., index=...)`` builds and starts the receiving
in a child process and returns it; importable by name (it is pickled by reference)."""


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that forked it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_main(
    target: ReceiverTarget,
    args: tuple[Any, ...],
    index: int,
    listeners: list[Listener],
    cells: Any,
    limit: int,
    conn: multiprocessing.connection.Connection,
) -> None:
    _die_with_parent()
    # The main process decides when receivers stop (SIGTERM/Ctrl-C reach it, maybe the
    # whole process group): a receiver stops when told, with the grace period.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        receiving = target(*args, listeners=listeners,
                           slots=AssociationSlots(limit, cells, index), index=index)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("failed", f"{exc.__class__.__name__}: {exc}"))
        os._exit(1)
    conn.send(("ready", os.getpid()))
    sent: metrics.CounterValues = {}

    def send_metrics() -> None:
        nonlocal sent
        now = metrics.counter_values()
        delta = {k: v - sent.get(k, 0.0) for k, v in now.items() if v != sent.get(k, 0.0)}
        if delta:
            conn.send(("metrics", delta))
        sent = now

    while True:
        try:
            if conn.poll(1.0):
                msg = conn.recv()
                if msg[0] == "stop":
                    receiving.stop(msg[1])
                    send_metrics()
                    conn.send(("stopped", os.getpid()))
                    logging.shutdown()
                    os._exit(0)
            send_metrics()
        except (EOFError, OSError):
            # The main process is gone: a receiver never outlives its node.
            os._exit(1)


class ReceiverPool:
    """N receiving processes on shared listening sockets; the same start/stop/ports as
    ``StorageServer``.

    Parameters
    ----------
    settings
        The ``[scp]`` settings (ports, TLS mode, limits).
    processes
        How many receiving processes.
    target, args
        What each process runs: ``target(*args, listeners=, slots=, index=)``, a
        module-level function (the fork server imports its module once).
    """

    def __init__(self, settings: ScpSettings, processes: int, target: ReceiverTarget,
                 args: tuple[Any, ...]) -> None:
        self.settings = settings
        self.n = processes
        self.target = target
        self.args = args
        self.ports: dict[str, int] = {}
        self._ctx = multiprocessing.get_context("forkserver")
        self._listeners: list[Listener] = []
        self._cells: Any = None
        self._procs: list[Any] = [None] * processes
        self._conns: list[Any] = [None] * processes
        self._sent: list[metrics.CounterValues] = [{} for _ in range(processes)]
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, listeners: list[Listener] | None = None) -> None:
        """Open the listening sockets and start the receivers; return once all listen.

        Raises
        ------
        NodeError
            A receiving process failed to start (its error in the message).
        OSError
            A port is in use.
        """
        from dicomnode.scp.server import open_listeners  # the server module is heavy

        self._listeners = listeners or open_listeners(self.settings)
        self.ports = {lst.name: lst.port for lst in self._listeners}
        with contextlib.suppress(ValueError):  # already started by an earlier pool
            self._ctx.set_forkserver_preload([self.target.__module__])
        self._cells = self._ctx.Array("i", 2 * self.n)
        for i in range(self.n):
            self._spawn(i)
        try:
            for i in range(self.n):
                self._await_ready(i)
        except BaseException:
            self.stop(0)
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="receivers",
                                            daemon=True)
        self._supervisor.start()
        log.info("%d receiving processes on %s", self.n,
                 ", ".join(f"{k} {v}" for k, v in self.ports.items()))

    def _spawn(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.target, self.args, i, self._listeners, self._cells,
                  self.settings.max_associations, child),
            name=f"dicomnode-receiver-{i}",
        )
        proc.start()
        child.close()
        self._procs[i], self._conns[i], self._sent[i] = proc, parent, {}

    def _await_ready(self, i: int) -> None:
        conn = self._conns[i]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._supervisor is not None and self._stopping.is_set():
                return  # a replacement started while the pool stops: stop() ends it
            if conn.poll(0.2):
                try:
                    kind, value = conn.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return
                if kind == "failed":
                    raise NodeError(f"receiving process {i} failed to start: {value}")
            elif not self._procs[i].is_alive():
                break
        raise NodeError(f"receiving process {i} did not start")

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                conns = {c: i for i, c in enumerate(self._conns) if c is not None}
                sentinels = {p.sentinel: i for i, p in enumerate(self._procs) if p is not None}
            ready = multiprocessing.connection.wait([*conns, *sentinels], timeout=1.0)
            for obj in ready:
                if obj in conns:
                    self._receive(conns[obj], obj)
            for obj in ready:
                if obj in sentinels and not self._stopping.is_set():
                    self._restart(sentinels[obj])

    def _receive(self, i: int, conn: Any) -> None:
        try:
            while conn.poll():
                kind, value = conn.recv()
                if kind == "metrics":
                    metrics.add_counter_values(value)
        except (EOFError, OSError):
            pass

    def _restart(self, i: int) -> None:
        proc = self._procs[i]
        log.error("receiving process %d (pid %s) exited with %s; starting another",
                  i, proc.pid, proc.exitcode)
        cells = self._cells
        if cells is None:
            return
        with cells.get_lock():
            cells[i] = cells[self.n + i] = 0  # its associations died with it
        time.sleep(_RESTART_DELAY_S)
        if self._stopping.is_set():
            return
        with self._lock:
            with contextlib.suppress(OSError):
                self._conns[i].close()
            self._spawn(i)
        try:
            self._await_ready(i)
        except NodeError as exc:
            log.error("%s", exc)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every receiver: no new connections, running associations get ``grace_s``."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for i, conn in enumerate(self._conns):
            if conn is not None and self._procs[i] is not None and self._procs[i].is_alive():
                with contextlib.suppress(OSError):
                    conn.send(("stop", grace))
        deadline = time.monotonic() + grace + 15
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            while time.monotonic() < deadline:
                proc.join(0.2)
                self._receive(i, self._conns[i])
                if not proc.is_alive():
                    break
            if proc.is_alive():
                log.warning("receiving process %d did not stop; killing it", i)
                proc.kill()
                proc.join(5)
            with contextlib.suppress(OSError):
                self._conns[i].close()
        for lst in self._listeners:
            lst.sock.close()
        self._listeners = []
        self._cells = None  # frees its semaphore now, not at interpreter exit

    @property
    def pids(self) -> list[int]:
        """Process ids of the receivers (for tests and operators)."""
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

"""Association slots: ``scp.max_associations`` counts associations, in all receiving processes.

A slot is taken when the server admits an A-ASSOCIATE-RQ (``StorageServer.admit``) and
given back when that association's thread ends. Connections that have not asked to
associate yet never hold one (they wait in ``scp/gate.py``).

With several receiving processes the counts live in shared memory, one cell per
process, so the limit is the node's, and a process that dies has its cell cleared by
the supervisor (``scp/pool.py``) instead of leaking its slots. A second cell per process
holds its connections waiting in the gate: with both, each process can tell whether it
is the least loaded, and only the least loaded accepts the next connection.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["AssociationSlots"]


class AssociationSlots:
    """Running associations against a limit, and each process's load.

    Parameters
    ----------
    limit
        Associations at most, across every process sharing ``cells``.
    cells
        A ``multiprocessing.Array("i", 2 * n)`` shared by n receiving processes (cell i:
        associations of process i; cell n + i: its connections not yet associated), or
        None for a process of its own.
    index
        This process's cell in ``cells``.
    """

    def __init__(self, limit: int, cells: Any | None = None, index: int = 0) -> None:
        self.limit = limit
        if cells is None:
            self._cells: Any = [0, 0]
            self._lock: Any = threading.Lock()
            self.index = 0
        else:
            self._cells = cells
            self._lock = cells.get_lock()
            self.index = index
        self._n = len(self._cells) // 2

    def try_take(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if sum(self._cells[: self._n]) >= self.limit:
                return False
            self._cells[self.index] += 1
            return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`try_take` in this process."""
        with self._lock:
            if self._cells[self.index] > 0:
                self._cells[self.index] -= 1

    def set_pending(self, n: int) -> None:
        """Record how many connections wait in this process's gate."""
        if self._n > 1:
            self._cells[self._n + self.index] = n

    def least_loaded(self) -> bool:
        """True when no other process has fewer associations plus waiting connections:
        this process should take the next connection."""
        if self._n == 1:
            return True
        with self._lock:
            cells = self._cells[:]
        n = self._n
        loads = [cells[i] + cells[n + i] for i in range(n)]
        return loads[self.index] <= min(loads)

    @property
    def active(self) -> int:
        """Associations running now, in every process."""
        return int(sum(self._cells[: self._n]))

    @property
    def mine(self) -> int:
        """Associations running now in this process."""
        return int(self._cells[self.index])

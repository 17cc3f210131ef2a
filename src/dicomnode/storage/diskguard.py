"""The disk watermark: refuse new data before the data directory's filesystem is full.

A full disk discovered by a failed write loses nothing (the C-STORE answers 0xA700 and
keeps nothing, STOW-RS fails the instance) but the sender then gives up on that object,
and the index, the queue and the logs share the disk. Like the watermarks of the
Informatics Gateway, the node looks at the free space before it takes an association
or a STOW-RS request: below ``storage.min_free_gb`` (or above
``storage.max_used_percent``) it refuses with a transient A-ASSOCIATE-RJ or a 503 with
Retry-After, which senders queue and retry. A warning fires earlier
(``storage.warn_free_gb``), and the node resumes by itself once space returns.

One reading (``os.statvfs`` through :func:`shutil.disk_usage`) serves every check for
``storage.disk_check_interval_s``; transitions are logged and audited once each.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dicomnode import metrics
from dicomnode.audit import audit
from dicomnode.config import StorageSettings

__all__ = ["DiskGuard", "DiskReading", "Usage"]

log = logging.getLogger(__name__)

_GB = 1024**3

OK, WARNING, REFUSING = 0, 1, 2
_NAMES = {OK: "ok", WARNING: "warning", REFUSING: "refusing"}


class Usage(NamedTuple):
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class DiskReading:
    """One look at the filesystem and what it means."""

    free: int
    total: int
    state: int
    """0 fine, 1 warning, 2 refusing"""
    why: str
    """Which watermark was crossed ("" when fine); no path, no patient data."""

    @property
    def refusing(self) -> bool:
        return self.state == REFUSING


class DiskGuard:
    """Free-space checks of one data directory (one per process).

    Parameters
    ----------
    path
        The data directory.
    settings
        ``[storage]``: ``min_free_gb``, ``max_used_percent``, ``warn_free_gb``,
        ``disk_check_interval_s``, ``disk_retry_after_s``.
    probe
        Reads (total, used, free) bytes of ``path``'s filesystem; :func:`shutil.disk_usage`
        unless a test gives another.
    """

    def __init__(self, path: Path, settings: StorageSettings, *,
                 probe: Callable[[Path], Usage] | None = None, who: str = "DICOMNODE") -> None:
        self.path = path
        self.min_free = int(settings.min_free_gb * _GB)
        warn = settings.warn_free_gb
        self.warn_free = int((2 * settings.min_free_gb if warn is None else warn) * _GB)
        self.max_used_percent = settings.max_used_percent
        self.interval_s = settings.disk_check_interval_s
        self.retry_after_s = float(settings.disk_retry_after_s)
        self.probe = probe or (lambda p: Usage(*shutil.disk_usage(p)))
        self.who = who
        self._lock = threading.Lock()
        self._last: DiskReading | None = None
        self._at = 0.0
        self._state = OK

    @property
    def enabled(self) -> bool:
        return self.min_free > 0 or self.max_used_percent is not None or self.warn_free > 0

    def reading(self) -> DiskReading:
        """The current reading (reused for ``disk_check_interval_s``)."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._at < self.interval_s:
                return self._last
            reading = self._read()
            self._last, self._at = reading, now
            changed, before = reading.state != self._state, self._state
            self._state = reading.state
        metrics.DISK_FREE_BYTES.set(reading.free)
        metrics.DISK_STATE.set(reading.state)
        if changed:
            self._report(before, reading)
        return reading

    def _read(self) -> DiskReading:
        try:
            u = self.probe(self.path)
        except OSError as exc:  # cannot tell: let the write decide (0xA700 on failure)
            log.warning("free space of the data directory unreadable (%s)", exc.strerror)
            return DiskReading(0, 0, OK, "")
        free, total = int(u.free), int(u.total)
        used_pct = 100.0 * u.used / total if total else 0.0
        if self.min_free and free < self.min_free:
            return DiskReading(free, total, REFUSING,
                               f"free space {free / _GB:.2f} GB below storage.min_free_gb "
                               f"{self.min_free / _GB:g} GB")
        if self.max_used_percent is not None and used_pct > self.max_used_percent:
            return DiskReading(free, total, REFUSING,
                               f"filesystem {used_pct:.1f}% used, above "
                               f"storage.max_used_percent {self.max_used_percent:g}%")
        if self.warn_free and free < self.warn_free:
            return DiskReading(free, total, WARNING,
                               f"free space {free / _GB:.2f} GB below storage.warn_free_gb "
                               f"{self.warn_free / _GB:g} GB")
        return DiskReading(free, total, OK, "")

    def _report(self, before: int, r: DiskReading) -> None:
        if r.state == REFUSING:
            log.error("disk watermark: refusing new associations and STOW-RS (%s)", r.why)
        elif r.state == WARNING:
            log.warning("disk watermark: %s", r.why)
        else:
            log.info("disk watermark: free space %.2f GB, taking data again", r.free / _GB)
        audit("disk_watermark", user=self.who, state=_NAMES[r.state], was=_NAMES[before],
              free_bytes=r.free, why=r.why or None)

    def refusal(self) -> str | None:
        """Why new data is refused now, or None to take it."""
        if not self.enabled:
            return None
        r = self.reading()
        return r.why if r.refusing else None

    def retry_after(self) -> float | None:
        """The HTTP ingest gate: seconds to wait (503 Retry-After) while refusing, else None."""
        return self.retry_after_s if self.refusal() is not None else None

"""Files under the data directory, written atomically and durably.

Layout (all below ``data_dir``)::

    spool/<study_key>/<sop_key>.dcm   identified objects as received (short-lived)
    tmp/<host>-<pid>/                 partial writes of one process; removed when stale
    archive/ ...                      de-identified copies (the de-identification issue)
    results/ ...                      SEG/SR built by the node (the results issue)

A file is first written to ``tmp/``, fsynced, then renamed into place and its
directory fsynced. A crash therefore leaves either nothing or a complete file
in place, never a half-written one; leftovers in ``tmp/`` are deleted at start.
Names are pseudonymous keys, never identifiers.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

from dicomnode.errors import StorageError

__all__ = ["FileStore"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileStore:
    """Atomic, durable file writes below one root directory.

    Parameters
    ----------
    root
        The data directory.
    fsync
        fsync files and directories (durable across power loss); off only for tests
        or benchmarks of the protocol alone.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        # One temporary directory per process, so that several processes (receivers and
        # workers on a shared mount) never delete each other's writes in progress.
        self._host = socket.gethostname()
        self.tmp = self.root / "tmp" / f"{self._host}-{os.getpid()}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        # Open directory descriptors for fsync, by directory: a study's instances all go
        # to one directory, and opening it for every fsync costs as much as the fsync.
        self._dir_fds: dict[Path, int] = {}
        self._dir_lock = threading.Lock()

    def clean_tmp(self) -> int:
        """Delete partial writes of dead processes of this host; return how many files.

        Directories of other hosts are left alone: their processes may be alive.
        """
        n = 0
        for d in (self.root / "tmp").iterdir():
            if d == self.tmp:
                continue
            if d.is_file():  # layout of an earlier version
                d.unlink(missing_ok=True)
                n += 1
                continue
            host, _, pid = d.name.rpartition("-")
            if host != self._host or not pid.isdigit() or _alive(int(pid)):
                continue
            for f in d.iterdir():
                f.unlink(missing_ok=True)
                n += 1
            d.rmdir()
        return n

    def close(self) -> None:
        """Close cached directory descriptors; remove this process's empty tmp directory."""
        with self._dir_lock:
            for fd in self._dir_fds.values():
                os.close(fd)
            self._dir_fds.clear()
        try:
            self.tmp.rmdir()
        except OSError:
            pass

    def path(self, relpath: str) -> Path:
        """Absolute path of ``relpath``, which must be relative and free of ``..``."""
        if relpath.startswith("/") or ".." in relpath.split("/"):
            raise StorageError(f"path escapes the data directory: {relpath}")
        return self.root / relpath

    def read_from(self, relpath: str, offset: int) -> bytes:
        """The bytes of a stored file from ``offset`` to its end."""
        try:
            with open(self.path(relpath), "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError as exc:
            raise StorageError(f"cannot read {relpath}: {exc.strerror or exc}") from exc

    def write(self, relpath: str, chunks: list[bytes] | bytes) -> int:
        """Write ``chunks`` to ``relpath`` atomically; return the size in bytes.

        Raises
        ------
        StorageError
            On any OS error (disk full, permissions); nothing is left in place.
        """
        target = self.path(relpath)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        if isinstance(chunks, bytes):
            chunks = [chunks]
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                total = sum(len(c) for c in chunks)
                size = os.writev(fd, chunks)  # usually all of it in one call
                if size < total:
                    rest = memoryview(b"".join(chunks))[size:]
                    while rest:
                        written = os.write(fd, rest)
                        rest = rest[written:]
                        size += written
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            parent = target.parent
            if parent not in self._known_dirs:
                parent.mkdir(parents=True, exist_ok=True)
                if self.fsync:
                    self._fsync_dir(parent.parent)
                self._known_dirs.add(parent)
            os.replace(tmp, target)
            if self.fsync:
                self._fsync_dir(parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {relpath}: {exc.strerror or exc}") from exc
        return size

    def read(self, relpath: str) -> bytes:
        """Read a stored file."""
        try:
            return self.path(relpath).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {relpath}: {exc.strerror or exc}") from exc

    def delete(self, relpath: str) -> None:
        """Remove a stored file if present."""
        try:
            self.path(relpath).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {relpath}: {exc.strerror or exc}") from exc

    def _fsync_dir(self, directory: Path) -> None:
        with self._dir_lock:
            fd = self._dir_fds.get(directory)
            if fd is None:
                if len(self._dir_fds) >= 64:
                    _, old = self._dir_fds.popitem()
                    os.close(old)
                fd = self._dir_fds[directory] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)

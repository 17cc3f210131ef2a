"""Inference in a child process that can die without taking the node with it.

A 3D model with a hundred classes on a large CT can exhaust memory; a native crash in a
provider library can kill a process. With ``inference.isolation = "process"`` (the
default) models run in one long-lived child process: the volume goes in, the label mask
comes back, through shared memory (no copy through a pipe). When the child dies (the
kernel's OOM killer, a segfault) the running job fails with the reason and is retried
as any job is, a new child starts for the next one, and the receivers, the queue and the
other jobs carry on.

The child reports its peak resident memory (VmHWM, the kernel's high-water mark of its
resident set) with every result, which is what the memory budget is measured against.

Image models (radiograph classifiers) run there too: the image goes in as its encoded
DICOM bytes (a few MB) through the pipe, the probabilities and explanation map come back
pickled.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import resource
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from dicomnode.errors import InferenceError, ModelError, ModelLoadError, NodeError
from dicomnode.inference.runtime import InferenceOutput, ModelSessions, RuntimeOptions
from dicomnode.modelpkg.format1 import read_model_package

__all__ = ["IsolatedModel", "IsolatedSessions"]

_ERRORS = {"InferenceError": InferenceError, "ModelLoadError": ModelLoadError,
           "ModelError": ModelError}


def _peak_kb() -> int:
    """This process's peak resident memory in KiB: VmHWM, which exec resets (``ru_maxrss``
    on Linux carries the parent's peak across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(conn: Any, options: RuntimeOptions, budget: float | None) -> None:
    """The child's loop: load (cached), run, answer; never raises out."""
    sessions = ModelSessions(options, budget)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        if msg[0] == "image":
            conn.send(_image_call(sessions, *msg[1:]))
            continue
        path, shm_in, shape, dtype, affine, spacing, shm_out = msg
        try:
            src = shared_memory.SharedMemory(name=shm_in)
            try:
                array = np.ndarray(shape, dtype=dtype, buffer=src.buf)
                out = sessions.get(path).infer_volume(array, affine, spacing)
            finally:
                del array
                src.close()
            mask = out.mask
            if mask is not None:
                dst = shared_memory.SharedMemory(name=shm_out)
                try:
                    np.ndarray(mask.shape, dtype=np.uint16, buffer=dst.buf)[...] = mask
                finally:
                    dst.close()
            reply = {
                "ok": True,
                "mask_dtype": str(mask.dtype) if mask is not None else None,
                "output": dataclasses.replace(out, mask=None),
                "maxrss_kb": _peak_kb(),
            }
        except NodeError as exc:
            reply = {"ok": False, "kind": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # report the type only: a message may quote values
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            reply = {"ok": False, "kind": "ModelError",
                     "message": f"{type(exc).__name__} in {Path(frame.filename).name}"}
        conn.send(reply)


def _image_call(sessions: ModelSessions, path: str, method: str, data: bytes,
                kwargs: dict[str, Any]) -> dict[str, Any]:
    from io import BytesIO

    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(data))
        if method not in ("classify", "explain"):
            raise ModelError(f"no image method {method}")
        out = getattr(sessions.get(path), method)(ds, **kwargs)
        return {"ok": True, "output": out, "maxrss_kb": _peak_kb()}
    except NodeError as exc:
        return {"ok": False, "kind": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # the type only: a message may quote values
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return {"ok": False, "kind": "ModelError",
                "message": f"{type(exc).__name__} in {Path(frame.filename).name}"}


@dataclass
class IsolatedModel:
    """What the node's infer task needs of a model: its package and ``infer_volume``."""

    package: Any
    path: str
    owner: IsolatedSessions

    def infer_volume(self, array: np.ndarray, affine: np.ndarray,
                     spacing: tuple[float, float, float]) -> InferenceOutput:
        return self.owner.infer(self.path, array, affine, spacing)

    def classify(self, ds: Any) -> Any:
        """An image package's :meth:`~dicomnode.inference.image_model.ImageModel.classify`."""
        return self.owner.call_image(self.path, "classify", ds, {})

    def explain(self, ds: Any, label: int) -> Any:
        """An image package's :meth:`~dicomnode.inference.image_model.ImageModel.explain`."""
        return self.owner.call_image(self.path, "explain", ds, {"label": label})


class IsolatedSessions:
    """Runs model packages in a child process (see the module docstring); thread-safe,
    one inference at a time (the gpu queue has one worker per device anyway)."""

    def __init__(self, options: RuntimeOptions | None = None,
                 memory_budget_mb: float | None = None) -> None:
        self.options = options or RuntimeOptions()
        self.memory_budget_mb = memory_budget_mb
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self.last_maxrss_kb: int = 0
        """The child's peak resident memory after the last inference (KiB)."""

    def get(self, path: Path | str) -> IsolatedModel:
        """The package at ``path`` (read and checksummed here; loaded in the child).

        Raises
        ------
        ModelLoadError
            The package is invalid.
        """
        return IsolatedModel(read_model_package(path), str(path), self)

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.options,
                                                           self.memory_budget_mb),
                                       name="dicomnode-inference", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    @property
    def pid(self) -> int | None:
        """The child's process ID (None before the first inference)."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def infer(self, path: str, array: np.ndarray, affine: np.ndarray,
              spacing: tuple[float, float, float]) -> InferenceOutput:
        """Run the package at ``path`` on ``array`` in the child.

        Raises
        ------
        InferenceError, ModelError, ModelLoadError
            As the runner raises them in the child; ModelError when the child died
            (its exit status says how), after which a new child serves the next call.
        """
        array = np.ascontiguousarray(array)
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            src = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
            dst = shared_memory.SharedMemory(create=True, size=max(1, array.size * 2))
            try:
                np.ndarray(array.shape, dtype=array.dtype, buffer=src.buf)[...] = array
                try:
                    self._conn.send((path, src.name, array.shape, str(array.dtype),
                                     np.asarray(affine, float), tuple(spacing), dst.name))
                    reply = self._conn.recv()
                except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                    self._died()
                if not reply["ok"]:
                    raise _ERRORS.get(reply["kind"], ModelError)(reply["message"])
                self.last_maxrss_kb = int(reply["maxrss_kb"])
                out: InferenceOutput = reply["output"]
                mask = None
                if reply["mask_dtype"] is not None:
                    mask = np.ndarray(array.shape, dtype=np.uint16, buffer=dst.buf).astype(
                        reply["mask_dtype"])
                return dataclasses.replace(out, mask=mask)
            finally:
                src.close()
                src.unlink()
                dst.close()
                dst.unlink()

    def call_image(self, path: str, method: str, ds: Any, kwargs: dict[str, Any]) -> Any:
        """Run an image model's ``method`` on ``ds`` in the child.

        Raises
        ------
        InferenceError, ModelError, ModelLoadError
            As :meth:`infer`.
        """
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            try:
                self._conn.send(("image", path, method, buf.getvalue(), kwargs))
                reply = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                self._died()
            if not reply["ok"]:
                raise _ERRORS.get(reply["kind"], ModelError)(reply["message"])
            self.last_maxrss_kb = int(reply["maxrss_kb"])
            return reply["output"]

    def _died(self) -> NoReturn:
        self._proc.join(5)
        code = self._proc.exitcode
        self._proc = None
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}")
        raise ModelError(f"the inference worker process died ({how}); "
                         "a new one serves the next job") from None

    def close(self) -> None:
        """Stop the child (at node stop)."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._proc.join(5)
                if self._proc.is_alive():
                    self._proc.kill()
            self._proc = None

    def evict(self, name: str, version: str) -> int:
        """Sessions live in the child; a new package version gets its own key there."""
        del name, version
        return 0

    def clear(self) -> None:
        self.close()


"""Inference in its own process: memory stays bounded, and a killed worker is replaced.

A 100-class model on a large volume: holding its logits on the whole grid, as a naive
runner does, would take 100 x the volume in float32; the streaming runtime keeps a slab
of the window depth. The child's own peak resident memory (``ru_maxrss``) is measured.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_format2 import axial, document, pointwise

from dicomnode.errors import InferenceError, ModelError
from dicomnode.inference.worker import IsolatedSessions
from dicomnode.modelpkg.write import write_format2_package

pytestmark = pytest.mark.slow

CLASSES = 100
SHAPE = (200, 160, 160)


def _hundred_class_package(tmp_path: Path) -> Path:
    weights = list(np.linspace(-1, 1, CLASSES + 1))
    biases = list(np.linspace(0.5, -0.5, CLASSES + 1))
    doc = document(labels=CLASSES, patch=(16, 64, 64), batch=1)
    pkg = write_format2_package(tmp_path / "pkg",
                                {"m.onnx": pointwise(weights, biases, 1, (16, 64, 64))}, doc)
    return Path(pkg.source)


def test_hundred_classes_on_a_large_volume_stay_under_budget(tmp_path: Path) -> None:
    path = _hundred_class_package(tmp_path)
    volume = (np.linspace(-1, 1, SHAPE[0])[:, None, None]
              * np.ones(SHAPE[1:])).astype(np.float32)
    full_logits = CLASSES * volume.size * 4  # what holding every class on the grid takes
    sessions = IsolatedSessions(memory_budget_mb=1024)
    try:
        out = sessions.get(path).infer_volume(volume, axial(), (2.0, 1.0, 1.0))
        peak = sessions.last_maxrss_kb * 1024
    finally:
        sessions.close()
    assert out.mask is not None and out.mask.shape == SHAPE
    assert len(np.unique(out.mask)) >= 2
    assert out.plan["estimated_bytes"] < 1024 * 2**20
    # the whole worker process, interpreter and libraries included, peaks below
    # half of what the logits alone would take on the whole grid
    assert peak < 0.5 * full_logits, (peak / 2**20, full_logits / 2**20)


def test_budget_refusal_crosses_the_process_boundary(tmp_path: Path) -> None:
    path = _hundred_class_package(tmp_path)
    sessions = IsolatedSessions(memory_budget_mb=50)
    try:
        with pytest.raises(InferenceError, match="memory_budget_mb is 50"):
            sessions.get(path).infer_volume(np.zeros(SHAPE, np.float32), axial(),
                                            (2.0, 1.0, 1.0))
    finally:
        sessions.close()


def test_a_killed_worker_fails_the_job_and_a_new_one_serves_the_next(tmp_path: Path) -> None:
    pkg = write_format2_package(tmp_path / "small", {"m.onnx": pointwise([0, 1], [0, -0.25], 2,
                                                                         (8, 16, 16))},
                                document())
    sessions = IsolatedSessions()
    volume = np.random.default_rng(0).uniform(-1, 1, (60, 96, 96)).astype(np.float32)
    try:
        model = sessions.get(pkg.source)
        model.infer_volume(volume[:8], axial(), (2.0, 1.0, 1.0))  # warm: the child exists
        first = sessions.pid
        assert first is not None

        def kill_soon() -> None:
            time.sleep(0.3)
            os.kill(first, signal.SIGKILL)

        threading.Thread(target=kill_soon).start()
        with pytest.raises(ModelError, match="killed by signal 9"):
            model.infer_volume(volume, axial(), (2.0, 1.0, 1.0))
        out = model.infer_volume(volume[:8], axial(), (2.0, 1.0, 1.0))
        assert sessions.pid not in (None, first)
        np.testing.assert_array_equal(out.mask, (volume[:8] > 0.25).astype(np.uint8))
    finally:
        sessions.close()

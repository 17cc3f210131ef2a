"""dicomnode.training's public names: loaded on first use; the label-side modules need no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dicomnode.training as training


def _run(code: str) -> None:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_label_side_modules_do_not_import_torch() -> None:
    """A node receiving labels (agreement, split, card, drift) works without the train extra."""
    _run(
        """
        import sys
        import numpy as np
        from dicomnode.training import assess_annotations, measure_drift, split_by_patient
        from dicomnode.training.dataset import build_dataset_card
        m = np.zeros((2, 4, 4), np.uint8)
        assess_annotations([m, m]); measure_drift(m, m, study_key="s", model_name="n",
                                                  model_version="1")
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "onnx"))
        assert not bad, bad
        """
    )


def test_every_public_name_resolves() -> None:
    for name in training.__all__:
        assert getattr(training, name) is not None, name
    assert set(dir(training)) >= set(training.__all__)


def test_functions_named_like_their_module_stay_functions() -> None:
    """`train` and `evaluate` are the functions, whichever import came first (as before
    the names were lazy); `retrain` is always the module."""
    _run(
        """
        import dicomnode.training.retrain, dicomnode.training.train, dicomnode.training.evaluate
        from dicomnode.training import evaluate, retrain, train
        import dicomnode.training as t
        import dicomnode.training.retrain as r
        assert callable(train) and train.__module__ == "dicomnode.training.train"
        assert callable(evaluate) and evaluate.__module__ == "dicomnode.training.evaluate"
        assert t.train is train
        assert retrain is r and r.__name__ == "dicomnode.training.retrain"
        assert callable(r.retrain)
        """
    )

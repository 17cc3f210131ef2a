"""Retraining an imported nnU-Net model: time of one fine-tune through the learning loop's path.

    PYTHONPATH=src .venv/bin/python bench/nnunet_finetune.py [--iterations 50] [--epochs 1]

The tests' small nnU-Net v2 model (nnunet_model.py, one fold) is imported and activated in
a real registry (SQLite, a temporary data dir); eight labelled phantom studies of eight
patients go through ``retrain_imported``: raw dataset, fingerprint and preprocessing with
the source plans, nnU-Net's ``run_training`` on CPU from the serving checkpoint, the
re-import (ONNX export, golden case), the gate. Prints the phases' wall seconds as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()

    import nnunet_model as nm
    from test_finetune_nnunet import _studies
    from test_parity_nnunet import PLAN

    from dicomnode.app import model_registry, open_database
    from dicomnode.config import load_settings
    from dicomnode.importers.nnunet import import_nnunet
    from dicomnode.importers.nnunet_finetune import FinetuneSettings, retrain_imported
    from dicomnode.pipeline.learning import NodeRegistryOps
    from dicomnode.training.gate import GatePolicy

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        settings = load_settings(None, {"data_dir": str(tmp / "data")})
        engine, sessions = open_database(settings, upgrade=True)
        registry = model_registry(settings, sessions)
        folder = nm.write_model_folder(tmp / "results", nm.plans(**PLAN), folds=1)
        t = time.perf_counter()
        report = import_nnunet(folder, tmp / "pkg", axes="SPL", generic_codes=True)
        t_import = time.perf_counter() - t
        served = registry.add(report.package)
        registry.activate(served.name, served.version)
        infos, data = _studies()
        result = retrain_imported(
            infos, lambda s: data[s.study_key],
            NodeRegistryOps(SimpleNamespace(registry=registry)), name=served.name,
            active_dir=registry.active(served.name).path, active_version=served.version,
            work_dir=tmp / "work", gate=GatePolicy(min_cases=1),
            settings=FinetuneSettings(epochs=args.epochs, iterations_per_epoch=args.iterations,
                                      device="cpu"))
        engine.dispose()
    print(json.dumps({"epochs": args.epochs, "iterations_per_epoch": args.iterations,
                      "first_import_s": round(t_import, 1), "status": result.status,
                      "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}))


if __name__ == "__main__":
    main()

"""Importing models: time for an nnU-Net v2 results folder, then the imported package
against ``nnUNetPredictor`` on the same model and input.

    .venv/bin/python bench/import_models.py [--folds 5] [--threads 2] [--json out.json]

The model folder is made as the parity tests make it (tests/parity/nnunet_model.py:
nnU-Net's ``PlainConvUNet`` from the plans, fixed random weights, ``--folds`` folds,
mirroring on), for two plans: the tests' small one and a larger one. The import is timed
end to end (ONNX export and check per fold, nnU-Net's predictor for the golden case, the
node's golden-case run) and by phase. Then one process each runs the 5-fold, mirrored
model on a CT phantom: ``nnUNetPredictor.predict_single_npy_array`` on the results folder
and the node's ``SlidingWindowModel`` on the imported package (ONNX Runtime CPU); each
reports wall seconds and its own peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))
sys.path.insert(0, str(ROOT / "bench"))
PLANS = {"small": {"patch": (16, 32, 32), "spacing": (2.0, 1.5, 1.5)},
         "medium": {"patch": (32, 64, 64), "spacing": (2.0, 1.5, 1.5),
                    "features": (16, 32, 64)}}
SHAPE, SPACING = (24, 96, 96), (2.5, 1.2, 1.2)


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _volume() -> np.ndarray:
    from test_parity_nnunet import phantom

    return phantom(SHAPE, 11)


def time_import(work: Path, plan_name: str, folds: int) -> dict[str, Any]:
    import nnunet_model as nm

    from dicomnode.importers import nnunet as imp

    folder = nm.write_model_folder(work / plan_name, nm.plans(**PLANS[plan_name]),
                                   folds=folds, mirroring=(0, 1, 2))
    phases: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    imp.export_checked = timed("export_and_check", imp.export_checked)
    imp._golden_case = timed("golden_case_nnunet_predictor", imp._golden_case)
    from dicomnode.inference import golden

    golden.run_golden_cases = timed("golden_case_node", golden.run_golden_cases)
    t = time.perf_counter()
    report = imp.import_nnunet(folder, work / f"{plan_name}-pkg", axes="SPL",
                               generic_codes=True)
    return {"plan": plan_name, "folds": folds, "patch": PLANS[plan_name]["patch"],
            "seconds": round(time.perf_counter() - t, 2),
            "phases": {k: round(v, 2) for k, v in phases.items()},
            "golden_passed": all(g["passed"] for g in report.golden)}


def one(name: str, work: Path, folds: int) -> None:
    volume = _volume()
    t = time.perf_counter()
    if name == "nnunet":
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=False, device=torch.device("cpu"),
                            verbose=False, allow_tqdm=False)
        folder = work / "medium" / "Dataset999_Parity" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        p.initialize_from_trained_model_folder(str(folder), use_folds=tuple(range(folds)))
        labels = p.predict_single_npy_array(volume[None], {"spacing": list(SPACING)},
                                            None, None, False)
    else:
        from test_parity_nnunet import axial_affine

        from dicomnode.inference.sliding import SlidingWindowModel
        from dicomnode.modelpkg.format1 import read_model_package

        model = SlidingWindowModel.load(read_model_package(work / "medium-pkg"))
        labels = model.run(volume, axial_affine(SPACING)).labels
    np.save(work / f"{name}.npy", np.asarray(labels, np.uint8))
    print(json.dumps({"tool": name, "seconds": round(time.perf_counter() - t, 2),
                      "peak_mb": round(_peak_mb(), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, "/nonexistent")
    if args.one:
        one(args.one, args.work, args.folds)
        return
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads, "cpu": os.cpu_count(),
                               "shape": SHAPE, "spacing": SPACING, "imports": [], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for plan in PLANS:
            results["imports"].append(time_import(work, plan, args.folds))
            print(json.dumps(results["imports"][-1]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT / "src"))
        for name in ("nnunet", "node"):
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work),
                                   "--folds", str(args.folds)], env=env, capture_output=True,
                                  text=True, check=True)
            results["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results["runs"][-1]), flush=True)
        a, b = np.load(work / "nnunet.npy"), np.load(work / "node.npy")
        results["agreement"] = float((a == b).mean())
    print(json.dumps({"agreement": results["agreement"]}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Inference benchmark: the demo model in ONNX Runtime vs PyTorch eager on CPU, plus its quality.

    .venv/bin/python bench/inference.py [--threads 2] [--reps 7] [--size 128] [--json out.jsonl]

Speed: the shipped package's architecture (U-Net base/levels from its
provenance) is rebuilt in PyTorch, exported to ONNX in memory, and both run on
the same weights and the same (N, 1, size, size) input: ONNX Runtime
(CPUExecutionProvider, intra_op = threads, inter_op = 1, ORT_ENABLE_ALL) and
torch eager (inference_mode, set_num_threads(threads)). Weights do not change
the arithmetic, so random ones time the shipped network; the shipped
model.onnx itself is timed too. Each repetition runs enough batches for >= 64
slices, the runtimes taking turns; the table gives s/batch median (min-max)
over the repetitions.

Also: end-to-end ``OnnxModel.run`` on a 32-slice phantom study, and Dice on
held-out phantoms through the runtime vs a fixed-HU-threshold baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from dicomnode.inference import OnnxModel, RuntimeOptions, demo_model_path, load_model_package  # noqa: E402
from dicomnode.training.data import phantom_cases  # noqa: E402
from dicomnode.training.demo import demo_cases  # noqa: E402
from dicomnode.training.evaluate import evaluate, threshold_predictor  # noqa: E402
from dicomnode.training.export import export_onnx, max_abs_difference  # noqa: E402
from dicomnode.training.unet import UNet2d  # noqa: E402


def _time(fns: dict, n_calls: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` times; the functions take turns
    within each repetition (rotating order), so background load hits them alike."""
    for fn in fns.values():
        fn()
        fn()  # warm-up: allocator, ORT arena, torch kernels
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(n_calls):
                fns[name]()
            out[name].append((time.perf_counter() - t0) / n_calls)
    return out


def _session(data: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def speed(threads: int, reps: int, size: int) -> list[dict]:
    pkg = load_model_package(demo_model_path())
    base, levels = int(pkg.provenance["config_base"]), int(pkg.provenance["config_levels"])
    torch.manual_seed(0)
    net = UNet2d(len(pkg.labels), base, levels).eval()
    data = export_onnx(net, input_name=pkg.input.name)
    rows = []
    runners = {
        "onnxruntime": _session(data, threads),
        "onnxruntime (shipped model.onnx)": _session(pkg.read_onnx_bytes(), threads),
    }
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    for batch in (1, 8, 16):
        x = rng.random((batch, 1, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)
        n_calls = max(1, 64 // batch)
        assert max_abs_difference(net, data, x[:2], pkg.input.name) < 1e-4
        fns = {
            name: (lambda s=s, x=x: s.run(None, {pkg.input.name: x})) for name, s in runners.items()
        }

        def eager(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                net(xt)

        fns["torch eager"] = eager
        for name, t in _time(fns, n_calls, reps).items():
            med = statistics.median(t)
            rows.append(
                {
                    "runtime": name,
                    "threads": threads,
                    "batch": batch,
                    "size": size,
                    "s_per_batch": med,
                    "min": min(t),
                    "max": max(t),
                    "ms_per_slice": 1000 * med / batch,
                    "slices_per_s": batch / med,
                }
            )
    return rows


def end_to_end(threads: int, reps: int) -> dict:
    model = OnnxModel.load(
        demo_model_path(), RuntimeOptions(intra_op_threads=threads, inter_op_threads=1)
    )
    case = phantom_cases([9100])[0]
    t = _time({"run": lambda: model.run(case.volume, case.spacing)}, 1, reps)["run"]
    return {
        "what": "OnnxModel.run, 32 x 128 x 128 phantom",
        "s_median": statistics.median(t),
        "min": min(t),
        "max": max(t),
        "ms_per_slice": 1000 * statistics.median(t) / 32,
    }


def quality(threads: int) -> dict:
    model = OnnxModel.load(demo_model_path(), RuntimeOptions(intra_op_threads=threads))
    out = {}
    for name, cases in (
        ("heldout_demo_3000+16", demo_cases(3000, 16)),
        ("default_phantoms_9000+12", phantom_cases(range(9000, 9012))),
    ):
        ev = evaluate(cases, model.predict_mask)
        # The threshold baseline, best of a grid, with and without 3x3 smoothing.
        best = max(
            (evaluate(cases, threshold_predictor(lo, hi, smooth)).mean[1], lo, hi, smooth)
            for lo in (60.0, 70.0, 80.0, 90.0)
            for hi in (np.inf, 160.0)
            for smooth in (1, 3, 5)
        )
        out[name] = {
            "model_dice_mean": ev.mean[1],
            "ci95": ev.ci[1],
            "pooled": ev.pooled[1],
            "min_case": float(ev.values(1).min()),
            "threshold_best_dice": best[0],
            "threshold_best": {
                "low": best[1],
                "high": None if np.isinf(best[2]) else best[2],
                "smooth": best[3],
            },
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    info = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "providers": ort.get_available_providers(),
    }
    print(json.dumps(info))
    rows = speed(args.threads, args.reps, args.size)
    print("| runtime | threads | batch | s/batch median (min-max) | ms/slice | slices/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['runtime']} | {r['threads']} | {r['batch']} | {r['s_per_batch']:.4f} "
            f"({r['min']:.4f}-{r['max']:.4f}) | {r['ms_per_slice']:.2f} | {r['slices_per_s']:.0f} |"
        )
    for batch in (1, 8, 16):
        ort_r = next(r for r in rows if r["runtime"] == "onnxruntime" and r["batch"] == batch)
        tor_r = next(r for r in rows if r["runtime"] == "torch eager" and r["batch"] == batch)
        print(
            f"batch {batch}: onnxruntime / torch eager speed ratio "
            f"{tor_r['s_per_batch'] / ort_r['s_per_batch']:.2f}"
        )
    e2e = end_to_end(args.threads, args.reps)
    print(json.dumps(e2e))
    q = {} if args.skip_quality else quality(args.threads)
    if q:
        print(json.dumps(q, indent=1))
    if args.json:
        with args.json.open("a") as fh:
            fh.write(
                json.dumps({"info": info, "speed": rows, "end_to_end": e2e, "quality": q}) + "\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

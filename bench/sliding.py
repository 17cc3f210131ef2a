"""Sliding-window inference: the node's runtime against nnU-Net's predictor and MONAI's inferer.

    .venv/bin/python bench/sliding.py [--slices 300] [--size 512] [--threads 2] [--json out.json]

Same network weights, same input (a CT phantom of size x size x slices at 0.7 x 0.7 x 1.0
mm), same threads, one run each in its own process (so that each process's peak
resident memory, ``ru_maxrss``, is its own):

- nnU-Net: ``nnUNetPredictor.predict_single_npy_array`` on a model folder made as the
  parity tests make it (nnU-Net's ``PlainConvUNet``, one fold), mirroring off and on,
  against the node running the same weights from a format 2 package with nnU-Net's
  conventions (``SlidingWindowModel`` in the process, ONNX Runtime CPU);
- MONAI: its bundle pipeline (``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``,
  ``sliding_window_inference`` Gaussian, ``Invertd``) with a MONAI ``UNet``, against the
  node with MONAI's conventions.

Reported: wall seconds and peak RSS of each, and node/reference ratios (time: how many
times faster the node is; memory: node peak over reference peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))
SPACING = (1.0, 0.7, 0.7)  # (slice, row, column) mm
NNUNET_PLAN = {"patch": (64, 128, 128), "spacing": (2.0, 2.0, 2.0),
               "features": (16, 32, 64, 128)}
MONAI_ROI = (128, 128, 64)
MONAI_PIXDIM = (2.0, 2.0, 2.0)


def phantom(slices: int, size: int) -> np.ndarray:
    """A body ellipse of soft tissue in air with two brighter spheres (HU), float32."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :size, :size]
    zc, yc, xc = slices / 2, size / 2, size / 2
    body = ((y - yc) / (0.38 * size)) ** 2 + ((x - xc) / (0.45 * size)) ** 2 < 1
    vol = np.broadcast_to(np.where(body, 40.0, -1000.0), (slices, size, size)).astype(np.float32)
    for dz, dy, dx, r in ((0.1, 0.1, -0.1, 0.05), (-0.15, -0.05, 0.12, 0.04)):
        m = ((z - zc * (1 + dz)) ** 2 / (r * slices) ** 2 * 0.25
             + (y - yc * (1 + dy)) ** 2 / (r * size) ** 2
             + (x - xc * (1 + dx)) ** 2 / (r * size) ** 2) < 1
        vol[m] = 110.0
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    return vol


def affine() -> np.ndarray:
    sz, sy, sx = SPACING
    return np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1.0]])


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM): reset by exec, unlike ``ru_maxrss``,
    which on Linux keeps the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -------------------------------------------------------------------------- one measurement


def run_nnunet(work: Path, volume: np.ndarray, mirror: bool) -> dict[str, Any]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = work / "nnunet" / "Dataset999_Parity" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    t0 = time.perf_counter()
    seg = predictor.predict_single_npy_array(volume[None], {"spacing": list(SPACING)})
    return {"seconds": time.perf_counter() - t0, "labels": np.bincount(seg.ravel()).tolist()}


def prepare(work: Path) -> None:
    """Write the model folder and the packages (torch lives here, not in the node's runs)."""
    import nnunet_model as nm
    from test_parity_monai import _document
    from test_parity_nnunet import package_document

    from dicomnode.modelpkg.write import write_format2_package
    from dicomnode.training.export import export_static

    plan = nm.plans(**NNUNET_PLAN)
    nm.write_model_folder(work / "nnunet", plan, folds=1)
    patch = tuple(plan["configurations"]["3d_fullres"]["patch_size"])
    onnx = nm.onnx_bytes(nm.network(plan, 100), 2, patch)
    for mirror, name in (((), "pkg-nnunet"), ((0, 1, 2), "pkg-nnunet-tta")):
        write_format2_package(work / name, {"fold_0.onnx": onnx},
                              package_document(plan, mirror))
    write_format2_package(work / "pkg-monai",
                          {"model.onnx": export_static(_monai_net(), (2, 1, *MONAI_ROI))},
                          _document(MONAI_PIXDIM, MONAI_ROI, 0.5, "gaussian", 2, "RAS"))


def run_node(work: Path, volume: np.ndarray, package: str) -> dict[str, Any]:
    from dicomnode.inference.sliding import SlidingWindowModel
    from dicomnode.modelpkg import read_model_package

    model = SlidingWindowModel.load(read_model_package(work / package))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    out = model.run(volume, affine())
    return {"seconds": time.perf_counter() - t0, "labels": np.bincount(out.labels.ravel()).tolist(),
            "plan": out.plan, "parts": out.seconds, "torch_loaded": "torch" in sys.modules}


def _monai_net() -> Any:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(7)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1).eval()


def run_monai(work: Path, volume: np.ndarray) -> dict[str, Any]:
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    net = _monai_net()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine()
    pre = Compose([
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=MONAI_PIXDIM, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
    ])
    t0 = time.perf_counter()
    d = pre({"image": MetaTensor(torch.from_numpy(volume), affine=torch.from_numpy(ras))})
    with torch.no_grad():
        d["pred"] = sliding_window_inference(d["image"][None], MONAI_ROI, 2, net, overlap=0.5,
                                             mode="gaussian")[0]
    post = Compose([Activationsd("pred", softmax=True),
                    Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted("pred", argmax=True)])
    seg = np.asarray(post(d)["pred"])[0].astype(np.uint8)
    return {"seconds": time.perf_counter() - t0, "labels": np.bincount(seg.ravel()).tolist()}


RUNS = {
    "nnunet": lambda w, v: run_nnunet(w, v, False),
    "nnunet-tta": lambda w, v: run_nnunet(w, v, True),
    "node-nnunet": lambda w, v: run_node(w, v, "pkg-nnunet"),
    "node-nnunet-tta": lambda w, v: run_node(w, v, "pkg-nnunet-tta"),
    "monai": run_monai,
    "node-monai": lambda w, v: run_node(w, v, "pkg-monai"),
}


def one(name: str, work: Path, slices: int, size: int, threads: int) -> None:
    """Run one measurement in this process and print its JSON (with this process's peak)."""
    if not name.startswith("node"):
        import torch

        torch.set_num_threads(threads)
    volume = phantom(slices, size)
    before = _peak_mb()
    result = RUNS[name](work, volume)
    result.update({"peak_rss_mb": _peak_mb(), "rss_before_mb": before})
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=sorted(RUNS))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", default="node-nnunet,nnunet,node-nnunet-tta,nnunet-tta,"
                                          "node-monai,monai")
    args = parser.parse_args()
    if args.one:
        one(args.one, args.work, args.slices, args.size, args.threads)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "nnUNet_raw": "/tmp", "nnUNet_preprocessed": "/tmp", "nnUNet_results": "/tmp"}
    os.environ.update(env)
    work = Path(tempfile.mkdtemp(prefix="bench-sliding-"))
    prepare(work)
    results = {}
    for name in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work),
                               "--slices", str(args.slices), "--size", str(args.size),
                               "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1])
        r = results[name]
        parts = " ".join(f"{k} {v:.1f}" for k, v in r.get("parts", {}).items())
        print(f"{name:17s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"labels {r['labels']}  {parts}", flush=True)
    print()
    for ref, node in (("nnunet", "node-nnunet"), ("nnunet-tta", "node-nnunet-tta"),
                      ("monai", "node-monai")):
        if ref not in results or node not in results:
            continue
        r, n = results[ref], results[node]
        print(f"{ref:12s}: node {r['seconds'] / n['seconds']:.2f}x faster, "
              f"peak RSS node/ref {n['peak_rss_mb'] / r['peak_rss_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Association benchmark: one 512x512 CT image per association, as modalities and PACS
forwarders that open an association per image do, sent by dcmtk storescu to dcmtk
storescp, Orthanc (defaults, SQLite) and dicomnode (durable writes on), in one run.

    .venv/bin/python bench/associations.py [--images 100] [--reps 5] [--json out.json]

Each repetition starts every receiver on a fresh directory and sends ``--images``
images, one storescu process (one association) per image, one after another; receivers
take turns within each round and round 0 is a warm-up. The time includes starting
storescu, which is the same for every receiver. Prints associations/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ingest import count_received  # noqa: E402
from nodeutil import DCMTK_ENV, write_study  # noqa: E402
from peers import fresh_dir, machine, start_dicomnode, start_orthanc, start_storescp  # noqa: E402

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402

RECEIVERS = ("storescp", "orthanc", "dicomnode", "dicomnode-1proc")
NODE_CONFIG = {"dicomnode": {}, "dicomnode-1proc": {"scp": {"processes": 1}}}


def send_each(port: int, aec: str, files: list[Path]) -> float:
    """One storescu association per file, sequentially; wall seconds."""
    t0 = time.perf_counter()
    for f in files:
        res = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec,
                              "127.0.0.1", str(port), str(f)],
                             env=DCMTK_ENV, capture_output=True)
        if res.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {res.stderr.decode()[-500:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    times: dict[str, list[float]] = {r: [] for r in RECEIVERS}
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        study = make_ct_study(n_slices=args.images, rows=512, columns=512, seed=2025,
                              patient_id="BENCH-ASSOC")
        files = write_study(study, work / "study")
        print(f"{machine()}; {len(files)} images, one association each", flush=True)
        for rep in range(args.reps + 1):
            for name in RECEIVERS:
                d = fresh_dir(work / f"{name}-{rep}")
                r = (start_storescp(d) if name == "storescp" else start_orthanc(d)
                     if name == "orthanc" else
                     start_dicomnode(d, {"completion": {"quiet_period_s": 600.0},
                                         **NODE_CONFIG[name]}))
                try:
                    t = send_each(r.port, r.ae_title, files)
                    if count_received(name, r) != len(files):
                        raise RuntimeError(f"{name} did not store every image")
                finally:
                    r.stop()
                if rep > 0:
                    times[name].append(t)
    n = len(files)
    node = n / statistics.median(times["dicomnode"])
    print("\n| receiver | wall s median (min–max) | associations/s | ms per association | "
          "dicomnode / this (speed) |\n|---|---|---|---|---|")
    results = []
    for name in RECEIVERS:
        ts = times[name]
        med = statistics.median(ts)
        results.append({"receiver": name, "times": ts, "median_s": med, "per_s": n / med})
        print(f"| {name} | {med:.2f} ({min(ts):.2f}–{max(ts):.2f}) | {n / med:.1f} | "
              f"{1000 * med / n:.1f} | {node / (n / med):.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

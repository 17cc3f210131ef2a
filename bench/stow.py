"""STOW-RS ingest benchmark: one 300-instance 512x512 CT study into dicomnode over
STOW-RS and over C-STORE, and into Orthanc's own STOW-RS, durable writes on, in one run.

    .venv/bin/python bench/stow.py [--reps 5] [--json out.json]

Each repetition starts the receiver on a fresh directory, sends the study, and stops
it; the time is the sender's wall time (C-STORE: dcmtk storescu, one association;
STOW-RS: one ``POST /dicom-web/studies`` of the whole study, the same
``multipart/related`` body for both receivers, sent by httpx from memory). Receivers
take turns within each round; round 0 is a warm-up. dicomnode fsyncs each file and its
directory and commits its index row before answering; Orthanc runs with its defaults
(``SyncStorageArea`` on: it fsyncs each file too). Prints medians (min-max),
instances/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "transports_node"))

from dwpeers import PEER_PASSWORD, PEER_USER, start_dicomweb_orthanc, stow_node  # noqa: E402
from nodeutil import write_study  # noqa: E402
from peers import fresh_dir, machine, orthanc_get, send  # noqa: E402

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402
from dicomnode.pipeline.dicomweb import encode_multipart  # noqa: E402

N = 300
NAMES = ("dicomnode C-STORE", "dicomnode STOW-RS", "Orthanc STOW-RS")


def post(url: str, body: bytes, content_type: str, auth: tuple[str, str] | None) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url, content=body, headers={"Content-Type": content_type,
                                               "Accept": "application/dicom+json"},
                   auth=auth, timeout=600)
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    return wall


def one(name: str, files: list[Path], body: bytes, ct: str, work: Path) -> float:
    d = fresh_dir(work)
    if name == "Orthanc STOW-RS":
        o = start_dicomweb_orthanc(d, extra={"SyncStorageArea": True})  # its default
        try:
            t = post(f"http://127.0.0.1:{o.http_port}/dicom-web/studies", body, ct, None)
            got = int(orthanc_get(o, "/statistics")["CountInstances"])
        finally:
            o.stop()
    else:
        node = stow_node(d, {"completion": {"quiet_period_s": 600.0}}).start()
        try:
            if name == "dicomnode C-STORE":
                t = send(node.port, files, aec="DICOMNODE")
            else:
                url = f"http://127.0.0.1:{node.config['api']['port']}/dicom-web/studies"
                t = post(url, body, ct, (PEER_USER, PEER_PASSWORD))
            got = sum(s["instances"] for s in node.studies())
        finally:
            node.stop()
    if got != len(files):
        raise RuntimeError(f"{name} holds {got} of {len(files)} instances")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        study = make_ct_study(n_slices=N, rows=512, columns=512, pixel_spacing_mm=0.7,
                              slice_thickness_mm=1.0, seed=2024, patient_id="BENCH-STOW")
        files = write_study(study, work / "study")
        body, ct = encode_multipart([f.read_bytes() for f in files])
        size_mb = len(body) / 1e6
        print(f"{machine()}; study: {len(files)} instances, body {size_mb:.0f} MB", flush=True)
        times: dict[str, list[float]] = {n: [] for n in NAMES}
        for rep in range(args.reps + 1):
            for name in NAMES:
                t = one(name, files, body, ct, work / f"r{rep}-{name.replace(' ', '-')}")
                if rep > 0:
                    times[name].append(t)
                print(f"round {rep} {name}: {t:.3f} s", flush=True)
    results = []
    for name in NAMES:
        ts = times[name]
        med = statistics.median(ts)
        results.append({"receiver": name, "times": ts, "median_s": med, "min_s": min(ts),
                        "max_s": max(ts), "inst_per_s": N / med})
    base = {r["receiver"]: r for r in results}["dicomnode STOW-RS"]
    print("\n| receiver | wall s median (min-max) | inst/s | MB/s | dicomnode STOW-RS / this |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['receiver']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
              f"{r['inst_per_s']:.0f} | {size_mb / r['median_s']:.0f} | "
              f"{base['inst_per_s'] / r['inst_per_s']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Radiograph path: the bundled classifier through the runtime, its explanation's cost, and
one film end to end (completion to results stored in Orthanc).

    .venv/bin/python bench/radiograph.py [--images 40] [--reps 3] [--json out.json]

- Runtime: ``ImageModel.classify`` on 256 x 256 DX phantoms (preparation, one forward
  pass, activation), images/s; one forward pass alone (the ONNX session on the prepared
  tensor); occlusion saliency per positive image, its forward passes and its cost as a
  ratio to one forward pass and to one whole classification.
- End to end: a fresh Orthanc and node per repetition (quiet period 2 s); storescu sends
  one positive film; from the study's completion to the last of SR, Parametric Map and
  key image stored in Orthanc (the node's own records, as bench/e2e.py).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nodeutil import NodeProcess, free_port, storescu, wait_for  # noqa: E402
from peers import fresh_dir, machine, orthanc_get, start_orthanc  # noqa: E402

from dicomnode.dicom.radiograph import make_chest_radiograph  # noqa: E402
from dicomnode.inference.image_model import ImageModel  # noqa: E402
from dicomnode.inference.package import DEMO_CXR_MODEL, demo_model_paths  # noqa: E402
from dicomnode.inference.runtime import RuntimeOptions  # noqa: E402
from dicomnode.modelpkg.format1 import read_model_package  # noqa: E402


def _median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})"


def runtime(n: int, threads: int) -> dict[str, object]:
    [path] = [p for p in demo_model_paths() if p.name == DEMO_CXR_MODEL]
    model = ImageModel.load(read_model_package(path),
                            RuntimeOptions(providers=["CPUExecutionProvider"],
                                           intra_op_threads=threads))
    films = [make_chest_radiograph(seed=30000 + k, nodule=k % 2 == 0).dataset
             for k in range(n)]
    model.classify(films[0])  # warm-up
    t0 = time.perf_counter()
    for ds in films:
        model.classify(ds)
    classify_s = (time.perf_counter() - t0) / n
    prep = model.prepare(films[0])
    forward = []
    for _ in range(50):
        t = time.perf_counter()
        model._probabilities(prep.tensor[None])  # noqa: SLF001 - the bare forward pass
        forward.append(time.perf_counter() - t)
    forward_s = statistics.median(forward)
    sal, passes = [], []
    for ds in films[0::2][:10]:
        _, info = model.explain(ds, 1)
        sal.append(float(info["seconds"]))
        passes.append(int(info["passes"]))
    return {"images": n, "classify_s": classify_s, "images_per_s": 1.0 / classify_s,
            "forward_s": forward_s, "saliency_s": statistics.median(sal),
            "saliency_passes": statistics.median(passes),
            "saliency_over_forward": statistics.median(sal) / forward_s,
            "saliency_over_classify": statistics.median(sal) / classify_s}


def _q(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def end_to_end(work: Path) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    film = work / "film.dcm"
    make_chest_radiograph(seed=30500, nodule=True, patient_id="BENCH-CXR").dataset.save_as(
        film, enforce_file_format=True)
    node_port = free_port()
    pacs = start_orthanc(fresh_dir(work / "orthanc"),
                         modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]})
    node = NodeProcess(fresh_dir(work / "node"), {
        "scp": {"port": node_port},
        "completion": {"quiet_period_s": 2.0, "check_interval_s": 0.1},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port}},
        "results": {"destinations": ["pacs"]},
    })
    try:
        node.start()
        if storescu(node.port, [film]).returncode != 0:
            raise RuntimeError("storescu failed")
        db = node.data_dir / "dicomnode.db"
        wait_for(lambda: _q(db, "select count(*) from outbox where status = 'sent'")[0][0]
                 == 3, 300, 0.05)
        if len(orthanc_get(pacs, "/instances")) != 3:
            raise RuntimeError("Orthanc does not hold the SR, the map and the key image")
        [(completed_at,)] = _q(db, "select completed_at from study")
        [(timings, result_at)] = _q(db, "select timings, created_at from inference_result")
        [(sent_last,)] = _q(db, "select max(sent_at) from outbox")
        t = json.loads(timings)
        return {"classify_s": float(t["prepare_s"]) + float(t["run_s"]),
                "explain_s": float(t["explain_s"]),
                "result_recorded_after_completion_s": result_at - completed_at,
                "completion_to_stored_s": sent_last - completed_at}
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(machine(), flush=True)
    rt = runtime(args.images, args.threads)
    print(json.dumps(rt, indent=2), flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dicomnode-cxr-") as tmp:
        for rep in range(args.reps):
            r = end_to_end(Path(tmp) / f"run{rep}")
            runs.append(r)
            print(f"run {rep}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    print("\n| stage | median s (min-max) |\n|---|---|")
    for key in runs[0]:
        print(f"| {key} | {_median([r[key] for r in runs])} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runtime": rt, "runs": runs},
                                        indent=2))


if __name__ == "__main__":
    main()

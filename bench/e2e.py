"""End-to-end benchmark: study completion to SEG and SR stored in Orthanc, by stage.

    .venv/bin/python bench/e2e.py [--reps 3] [--slices 300] [--size 512] [--json out.json]

Each repetition: a fresh Orthanc (the PACS) and a fresh node (quiet period 2 s,
results to Orthanc); dcmtk storescu sends the phantom CT; the node completes,
de-identifies what is left, routes, runs the demo model, encodes SEG and SR,
re-identifies and sends them. Stages come from the node's own records
(study.completed_at, instance de-identification times, inference timings, the
encoding time, the outbox's re-identification and send times).
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

from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study  # noqa: E402
from peers import fresh_dir, machine, orthanc_get, start_orthanc  # noqa: E402

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402


def q(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def one_run(files: list[Path], work: Path) -> dict[str, float]:
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
        t_send = time.time()
        if storescu(node.port, files, timeout=600).returncode != 0:
            raise RuntimeError("storescu failed")
        t_sent = time.time()
        db = node.data_dir / "dicomnode.db"
        wait_for(lambda: q(db, "select count(*) from outbox where status = 'sent'")[0][0] == 2,
                 900, 0.05)
        if len(orthanc_get(pacs, "/instances")) != 2:
            raise RuntimeError("Orthanc does not hold the SEG and SR")
        [(completed_at, info)] = q(db, "select completed_at, info from study")
        [(deid_last,)] = q(db, "select max(deidentified_at) from instance")
        [(timings, result_at)] = q(db, "select timings, created_at from inference_result")
        outbox = q(db, "select kind, timings, sent_at from outbox")
        t = json.loads(timings)
        sent_last = max(r[2] for r in outbox)
        per = {kind: json.loads(tm) for kind, tm, _ in outbox}
        return {
            "ingest_s": t_sent - t_send,
            "deid_after_completion_s": max(0.0, deid_last - completed_at),
            "assembly_s": t["assembly_s"],
            "inference_s": t["run_s"] + t.get("other_s", 0.0),
            "encoding_s": json.loads(info)["results"]["encode_s"],
            "reidentification_s": sum(p["reidentify_s"] for p in per.values()),
            "send_s": sum(p["send_s"] for p in per.values()),
            "completion_to_stored_s": sent_last - completed_at,
            "result_recorded_after_completion_s": result_at - completed_at,
        }
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-e2e-") as tmp:
        work = Path(tmp)
        spacing = 0.7 if args.size >= 512 else 1.5
        study = make_ct_study(n_slices=args.slices, rows=args.size, columns=args.size,
                              pixel_spacing_mm=spacing, slice_thickness_mm=1.0, seed=300,
                              patient_id="BENCH-E2E", n_lesions=4)
        files = write_study(study, work / "study")
        print(f"{machine()}; {len(files)} x {args.size}x{args.size} CT", flush=True)
        runs = []
        for rep in range(args.reps):
            r = one_run(files, work / f"run{rep}")
            runs.append(r)
            print(f"run {rep}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    print("\n| stage | median s (min-max) |\n|---|---|")
    for key in runs[0]:
        vals = [r[key] for r in runs]
        print(f"| {key} | {statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f}) |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

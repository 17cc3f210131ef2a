"""Ingest benchmark: one 300-instance 512x512 CT study sent by dcmtk storescu to
dcmtk storescp, Orthanc (defaults, SQLite) and dicomnode (durable writes on), in one run.

    .venv/bin/python bench/ingest.py [--reps 5] [--associations 1 2 4] [--json out.json]

Each repetition starts the receiver on a fresh directory, sends the study with K
parallel storescu processes (the files split K ways), and stops it; the time is the
wall time of the senders. Receivers take turns within each round; round 0 is a warm-up.
Every dcmtk process and Orthanc run with TCP_NODELAY=1.
Prints medians (min-max), instances/s and the ratios to storescp and Orthanc.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nodeutil import write_study  # noqa: E402
from peers import (  # noqa: E402
    fresh_dir,
    machine,
    orthanc_get,
    send,
    start_dicomnode,
    start_orthanc,
    start_storescp,
)

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402

N = 300
# The node as shipped, and two variants that show what a choice costs or gains:
# without fsync (durability), and without the two ingest optimisations of ours
# (the event-driven acceptor loop, scp/reactor.py; spare temporary files, storage/spool.py).
NODE_VARIANTS: dict[str, dict] = {
    "dicomnode": {},
    "dicomnode-nofsync": {"storage": {"fsync": False}},
    "dicomnode-stockloop": {"scp": {"event_reactor": False}},
    "dicomnode-nospares": {"storage": {"spare_files": 0}},
}


def count_received(name: str, receiver) -> int:  # noqa: ANN001
    if name.startswith("dicomnode"):
        return sum(s["instances"] for s in receiver.node.studies())
    if name == "storescp":
        return sum(1 for _ in (receiver.workdir / "out").rglob("*") if _.is_file())
    return int(orthanc_get(receiver, "/statistics")["CountInstances"])


def run(files: list[Path], reps: int, ks: list[int], work: Path) -> list[dict]:
    """Receivers interleaved round-robin (drift on a shared VM hits them alike); round 0
    is a warm-up and is dropped."""
    names = ("storescp", "orthanc", *NODE_VARIANTS)
    results = []
    for k in ks:
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps + 1):
            for name in names:
                d = fresh_dir(work / f"{name}-k{k}-{rep}")
                if name == "storescp":
                    r = start_storescp(d, fork=k > 1)
                elif name == "orthanc":
                    r = start_orthanc(d)
                else:
                    r = start_dicomnode(d, {"completion": {"quiet_period_s": 600.0},
                                            **NODE_VARIANTS[name]})
                try:
                    t = send(r.port, files, associations=k, aec=r.ae_title)
                    got = count_received(name, r)
                    if got != len(files):
                        raise RuntimeError(f"{name} holds {got} of {len(files)} instances")
                finally:
                    r.stop()
                if rep > 0:
                    times[name].append(t)
        for name in names:
            ts = times[name]
            med = statistics.median(ts)
            results.append({"receiver": name, "associations": k, "times": ts,
                            "median_s": med, "min_s": min(ts), "max_s": max(ts),
                            "inst_per_s": len(files) / med})
            print(f"{name:10s} K={k}: {med:.3f} s ({min(ts):.3f}-{max(ts):.3f}), "
                  f"{len(files) / med:.0f} inst/s", flush=True)
    return results


def table(results: list[dict], size_mb: float) -> str:
    by = {(r["receiver"], r["associations"]): r for r in results}
    lines = ["| receiver | associations | wall s median (min-max) | inst/s | MB/s | "
             "dicomnode / this (speed) |", "|---|---|---|---|---|---|"]
    for r in results:
        k = r["associations"]
        dn = by[("dicomnode", k)]  # the ratio column: durable dicomnode vs this row
        ratio = dn["inst_per_s"] / r["inst_per_s"]
        lines.append(
            f"| {r['receiver']} | {k} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
            f"{r['inst_per_s']:.0f} | {size_mb / r['median_s']:.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        study = make_ct_study(n_slices=N, rows=512, columns=512, pixel_spacing_mm=0.7,
                              slice_thickness_mm=1.0, seed=2024, patient_id="BENCH-INGEST")
        files = write_study(study, work / "study")
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{machine()}; study: {len(files)} instances, {size_mb:.0f} MB", flush=True)
        results = run(files, args.reps, args.associations, work)
    print()
    print(table(results, size_mb))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

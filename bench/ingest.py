"""Ingest benchmark: K modalities sending at once, each its own study, over dcmtk storescu,
to dcmtk storescp, Orthanc (defaults, SQLite) and dicomnode (durable writes on), in one run.

    .venv/bin/python bench/ingest.py [--reps 5] [--associations 1 4 16] [--slices 100]
                                     [--variants dicomnode dicomnode-1proc ...] [--json out.json]

Each association sends its own ``--slices``-slice 512x512 CT study (a copy of one phantom
under new UIDs), all K storescu processes started at once; the time is the wall time
until the last one finishes. Each repetition starts the receiver on a fresh directory.
Receivers take turns within each round; round 0 is a warm-up. Every dcmtk process and
Orthanc run with TCP_NODELAY=1. Prints medians (min-max), instances/s and the ratios of
the node (as shipped) to every other receiver.
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

from nodeutil import DCMTK_ENV, deep_merge, write_study  # noqa: E402
from peers import (  # noqa: E402
    fresh_dir,
    machine,
    orthanc_get,
    start_dicomnode,
    start_orthanc,
    start_storescp,
)
from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402

# The node as shipped (one receiving process per core, polling per load), and variants
# that show what each choice costs or gains.
NODE_VARIANTS: dict[str, dict] = {
    "dicomnode": {},
    "dicomnode-1proc": {"scp": {"processes": 1}},
    # the network thread polling fast (0.2 ms) whatever the load, instead of per load
    "dicomnode-fastpoll": {"scp": {"fast_poll_max_associations": 1024}},
    # pynetdicom's own association loop instead of the event-driven one (scp/reactor.py)
    "dicomnode-stockloop": {"scp": {"event_reactor": False}},
    "dicomnode-nofsync": {"storage": {"fsync": False}},
}


def count_received(name: str, receiver) -> int:  # noqa: ANN001
    if name.startswith("dicomnode"):
        return sum(s["instances"] for s in receiver.node.studies())
    if name == "storescp":
        return sum(1 for _ in (receiver.workdir / "out").rglob("*") if _.is_file())
    return int(orthanc_get(receiver, "/statistics")["CountInstances"])


def copy_study(files: list[Path], out: Path) -> list[Path]:
    """The same images as another study: new Study, Series and SOP Instance UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for f in files:
        ds = dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        copies.append(out / f.name)
    return copies


def send_studies(port: int, aec: str, studies: list[list[Path]]) -> float:
    """One storescu per study, all started at once; wall seconds until the last ends."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", f"MOD{i:02d}", "-aec", aec,
                               "127.0.0.1", str(port), *map(str, files)],
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, files in enumerate(studies)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    bad = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"storescu failed: {bad[0][-500:]!r}")
    return wall


def run(studies: list[list[Path]], reps: int, ks: list[int], variants: list[str],
        work: Path) -> list[dict]:
    """Receivers interleaved round-robin (drift on a shared VM hits them alike); round 0
    is a warm-up and is dropped."""
    names = ("storescp", "orthanc", *variants)
    results = []
    for k in ks:
        sent = studies[:k]
        n = sum(len(s) for s in sent)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps + 1):
            for name in names:
                d = fresh_dir(work / f"{name}-k{k}-{rep}")
                if name == "storescp":
                    r = start_storescp(d, fork=k > 1)
                elif name == "orthanc":
                    r = start_orthanc(d)
                else:
                    r = start_dicomnode(d, deep_merge(
                        {"completion": {"quiet_period_s": 600.0},
                         "scp": {"max_associations": 32}}, NODE_VARIANTS[name]))
                try:
                    t = send_studies(r.port, r.ae_title, sent)
                    got = count_received(name, r)
                    if got != n:
                        raise RuntimeError(f"{name} holds {got} of {n} instances")
                finally:
                    r.stop()
                if rep > 0:
                    times[name].append(t)
        for name in names:
            ts = times[name]
            med = statistics.median(ts)
            results.append({"receiver": name, "associations": k, "instances": n, "times": ts,
                            "median_s": med, "min_s": min(ts), "max_s": max(ts),
                            "inst_per_s": n / med})
            print(f"{name:20s} K={k}: {med:.3f} s ({min(ts):.3f}-{max(ts):.3f}), "
                  f"{n / med:.0f} inst/s", flush=True)
    return results


def table(results: list[dict], mb_per_instance: float) -> str:
    by = {(r["receiver"], r["associations"]): r for r in results}
    lines = ["| receiver | associations | instances | wall s median (min–max) | inst/s | MB/s | "
             "dicomnode / this (speed) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        k = r["associations"]
        dn = by[("dicomnode", k)]  # the ratio column: the node as shipped vs this row
        ratio = dn["inst_per_s"] / r["inst_per_s"]
        lines.append(
            f"| {r['receiver']} | {k} | {r['instances']} | {r['median_s']:.3f} "
            f"({r['min_s']:.3f}–{r['max_s']:.3f}) | {r['inst_per_s']:.0f} | "
            f"{r['inst_per_s'] * mb_per_instance:.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=list(NODE_VARIANTS),
                    choices=list(NODE_VARIANTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    variants = ["dicomnode", *[v for v in args.variants if v != "dicomnode"]]
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        study = make_ct_study(n_slices=args.slices, rows=512, columns=512,
                              pixel_spacing_mm=0.7, slice_thickness_mm=1.0, seed=2024,
                              patient_id="BENCH-INGEST")
        first = write_study(study, work / "study-00")
        studies = [first, *[copy_study(first, work / f"study-{i:02d}")
                            for i in range(1, max(args.associations))]]
        mb = sum(f.stat().st_size for f in first) / 1e6 / len(first)
        print(f"{machine()}; {len(studies)} studies of {args.slices} instances, "
              f"{mb * args.slices:.0f} MB each", flush=True)
        results = run(studies, args.reps, args.associations, variants, work)
    print()
    print(table(results, mb))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

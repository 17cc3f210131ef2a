"""Scale-out benchmark: studies per minute with 1 and 2 worker processes.

    .venv/bin/python bench/scaleout.py [--studies 6] [--slices 64] [--size 256]

A receiver (SCP only) and N workers (all queues) share one PostgreSQL database
(a fresh one per run on 127.0.0.1:5432) and one data directory; Orthanc is the
PACS. All studies are sent at once (one storescu per study, in parallel), and the
time runs from the first send to the last SEG/SR stored in Orthanc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study  # noqa: E402
from peers import machine, start_orthanc  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def run(n_workers: int, files: list[list[Path]], work: Path) -> float:
    name = f"dicomnode_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    pacs = start_orthanc(work / "orthanc")
    procs: list[NodeProcess] = []
    cfg = {
        "database_url": url, "jobs": {"backend": "procrastinate"},
        "completion": {"quiet_period_s": 2.0, "check_interval_s": 0.2},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port}},
        "results": {"destinations": ["pacs"]}, "learning": {"enabled": False},
    }
    try:
        receiver = NodeProcess(work / "r", {**cfg, "scp": {"port": free_port()}},
                               data_dir=work / "data", command=["serve", "--role", "receiver"])
        procs.append(receiver.start())
        for i in range(n_workers):
            procs.append(NodeProcess(work / f"w{i}", cfg, data_dir=work / "data",
                                     command=["worker", "--queues",
                                              "default,ingest,cpu,gpu,send"]).start())
        engine = create_engine(url)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=storescu, args=(receiver.port, f)) for f in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def sent() -> bool:
            with engine.connect() as c:
                n = c.execute(text("select count(*) from outbox where status = 'sent'")).scalar()
            return n == 2 * len(files)

        wait_for(sent, 1800, 0.2)
        wall = time.perf_counter() - t0
        engine.dispose()
        return wall
    finally:
        for p in procs:
            p.stop()
        pacs.stop()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-scale-") as tmp:
        work = Path(tmp)
        files = [write_study(make_ct_study(seed=100 + i, n_slices=args.slices, rows=args.size,
                                           columns=args.size, pixel_spacing_mm=0.75,
                                           slice_thickness_mm=1.5, patient_id=f"SCALE-{i}"),
                             work / f"s{i}") for i in range(args.studies)]
        print(f"{machine()}; {args.studies} studies x {args.slices} x {args.size}^2", flush=True)
        out = {}
        for n in (1, 2):
            walls = [run(n, files, work / f"run{n}-{r}") for r in range(args.reps)]
            med = statistics.median(walls)
            out[n] = med
            print(f"{n} worker(s): {med:.1f} s ({min(walls):.1f}-{max(walls):.1f}), "
                  f"{args.studies / med * 60:.1f} studies/min", flush=True)
        print(f"\nspeed-up 1 -> 2 workers: {out[1] / out[2]:.2f}x on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

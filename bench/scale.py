"""Does the node stay flat as its index grows? Receive, list, metrics and start-up at
1 k, 100 k and 1 M indexed instances, as ratios to 1 k (issue 18; target <= 1.2x).

Each size is its own database filled the way the node writes its rows
(tests/bulkfill.py: 100-instance studies received, de-identified, completed, inferred
and delivered, with their done jobs, outbox rows and vault identities), migrated to
head. Then, in this process, the sizes are measured in turns (round robin, ``--rounds``
times after a warm-up round; medians over rounds), so that a shared machine's load
weighs on every size alike:

- receive: the C-STORE handler's index transaction (StudyIndex.record_instance) for
  each instance of a new 300-instance study; median per instance, and the study total;
- list: ``/api/studies?limit=10`` (queries.studies) and ``dicomnode studies --limit 10``
  (StudyIndex.studies): the same page at every size (the 1 k database holds 10
  studies); median of repeated calls;
- metrics: the database gauges of ``/metrics`` (DatabaseCollector via
  generate_latest); median;
- start-up: what start-up reads from the index: open the engine, check the schema,
  reconcile an empty spool, the pending de-identification and unhooked studies.

Usage: ``PYTHONPATH=src python bench/scale.py [--sizes 1000,100000,1000000]
[--postgres URL] [--json out.json]``. PostgreSQL databases are created and dropped
on the server of URL (a maintenance database such as ``.../test``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bulkfill import fill  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from dicomnode.api import queries  # noqa: E402
from dicomnode.api.metrics_collector import database_registry  # noqa: E402
from dicomnode.api.services import ApiServices  # noqa: E402
from dicomnode.config import load_settings  # noqa: E402
from dicomnode.storage import tally  # noqa: E402
from dicomnode.storage.db import (  # noqa: E402
    create_db_engine,
    migrate,
    schema_state,
    session_factory,
)
from dicomnode.storage.index import ReceivedInstance, StudyIndex  # noqa: E402

PAGE = 10


def _median_s(fn: Callable[[], Any], n: int) -> float:
    fn()  # warm (page cache, statement cache)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Sized:
    """One filled database, open as a running node holds it."""

    def __init__(self, url: str, data_dir: Path, n: int) -> None:
        self.url, self.data_dir, self.n = url, data_dir, n
        engine = create_db_engine(url)
        migrate(engine)
        t = time.perf_counter()
        fill(engine, n)
        self.fill_s = time.perf_counter() - t
        with session_factory(engine).begin() as s:  # as the node's completion loop does
            tally.compact(s)
        engine.dispose()
        self.engine = create_db_engine(url)
        self.sessions = session_factory(self.engine)
        self.index = StudyIndex(self.sessions)
        settings = load_settings(None, {"data_dir": data_dir, "database_url": url})
        self.svc = ApiServices.over(settings, self.sessions)
        self.registry = database_registry(self.svc)

    def startup(self) -> None:
        """What start-up reads from the index, on a fresh engine as a starting node has."""
        e = create_db_engine(self.url)
        schema_state(e)
        idx = StudyIndex(session_factory(e))
        spool = self.data_dir / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        batch = [p.relative_to(self.data_dir).as_posix() for p in spool.rglob("*.dcm")]
        if batch:
            idx.indexed_spool_paths(batch)
        idx.pending_deid()
        idx.unhooked()
        e.dispose()

    def receive(self) -> tuple[float, float]:
        """A new 300-instance study through the C-STORE handler's index transaction:
        (median per instance, whole study), seconds."""
        study = uuid.uuid4().hex * 2
        per = []
        t0 = time.perf_counter()
        for i in range(300):
            rec = ReceivedInstance(
                study_key=study, series_key=f"{study[:60]}{i // 100:04d}",
                sop_key=uuid.uuid4().hex * 2, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", series_number=1,
                path=f"spool/bench/{study[:8]}/{i}.dcm", size=140000, dataset_offset=132,
                calling_ae="BENCH")
            t = time.perf_counter()
            self.index.record_instance(rec, quiet_period_s=30, max_wait_s=3600,
                                       deid_delay_s=600)
            per.append(time.perf_counter() - t)
        return statistics.median(per), time.perf_counter() - t0

    def round(self) -> dict[str, float]:
        out = {"startup_ms": 1000 * _median_s(self.startup, 3)}
        # A page of PAGE studies at every size: the 1 k database holds only 10 studies, so
        # a page of 50 there would do a fifth of the work and flatter the ratios.
        out["api_studies_ms"] = 1000 * _median_s(
            lambda: queries.studies(self.svc, limit=PAGE), 7)
        out["cli_studies_ms"] = 1000 * _median_s(lambda: self.index.studies(limit=PAGE), 7)
        out["metrics_ms"] = 1000 * _median_s(lambda: generate_latest(self.registry), 7)
        inst, study = self.receive()
        out["receive_instance_ms"], out["receive_study_ms"] = 1000 * inst, 1000 * study
        return out


def run(kind: str, sizes: list[int], pg: str | None, rounds: int) -> dict[int, dict[str, float]]:
    """Fill every size, then measure them in turns (round robin, ``rounds`` times): a
    shared machine's load then weighs on every size alike. Medians over rounds."""
    dbs: dict[int, Sized] = {}
    dropped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        try:
            for n in sizes:
                d = Path(tmp) / str(n)
                d.mkdir()
                if kind == "sqlite":
                    url = f"sqlite:///{d / 'dicomnode.db'}"
                else:
                    assert pg is not None
                    name = f"dicomnode_scale_{uuid.uuid4().hex[:8]}"
                    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
                    with admin.connect() as c:
                        c.execute(text(f'CREATE DATABASE "{name}"'))
                    admin.dispose()
                    dropped.append(name)
                    url = pg.rsplit("/", 1)[0] + "/" + name
                dbs[n] = Sized(url, d, n)
                print(kind, n, f"filled in {dbs[n].fill_s:.1f} s", flush=True)
            samples: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
            for r in range(rounds + 1):
                for n in sizes:
                    m = dbs[n].round()
                    if r:  # round 0 warms caches
                        samples[n].append(m)
            res = {n: {k: statistics.median(x[k] for x in samples[n]) for k in samples[n][0]}
                   for n in sizes}
            for n in sizes:
                res[n]["fill_s"] = dbs[n].fill_s
                if kind == "sqlite":
                    res[n]["db_mb"] = os.path.getsize(dbs[n].url.removeprefix("sqlite:///")) / 1e6
                print(kind, n, json.dumps({k: round(v, 3) for k, v in res[n].items()}),
                      flush=True)
            return res
        finally:
            for db in dbs.values():
                db.engine.dispose()
            if dropped and pg is not None:
                admin = create_engine(pg, isolation_level="AUTOCOMMIT")
                with admin.connect() as c:
                    for name in dropped:
                        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()


def table(kind: str, res: dict[int, dict[str, float]]) -> str:
    """Markdown: each measure's median and its ratio to the smallest size."""
    keys = ["receive_instance_ms", "receive_study_ms", "api_studies_ms", "cli_studies_ms",
            "metrics_ms", "startup_ms"]
    base = res[min(res)]
    lines = [f"| {kind} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n, r in sorted(res.items()):
        cells = [f"{r[k]:.2f} ms ({r[k] / base[k]:.2f}x)" for k in keys]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--postgres", help="e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--pg-sizes", help="sizes for PostgreSQL (default: --sizes)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    out: dict[str, Any] = {"machine": f"{platform.node()} {platform.processor()} "
                                      f"{os.cpu_count()} cpus", "date": time.strftime("%F"),
                           "loadavg_start": os.getloadavg()}
    if not a.skip_sqlite:
        out["sqlite"] = run("sqlite", sizes, None, a.rounds)
        print(table("SQLite", out["sqlite"]))
    if a.postgres:
        pg_sizes = [int(x) for x in (a.pg_sizes or a.sizes).split(",")]
        out["postgres"] = run("postgres", pg_sizes, a.postgres, a.rounds)
        print(table("PostgreSQL", out["postgres"]))
    out["loadavg_end"] = os.getloadavg()
    print("load average", out["loadavg_start"], "->", out["loadavg_end"])
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

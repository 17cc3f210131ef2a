"""Scale-out: receivers and workers as separate processes on one PostgreSQL (procrastinate)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study
from peers import Receiver, orthanc_get, start_orthanc
from sqlalchemy import create_engine, text

from dicomnode.api import queries
from dicomnode.api.services import ApiServices
from dicomnode.app import open_database
from dicomnode.config import load_settings
from dicomnode.dicom.phantom import make_ct_study

QUEUES = "default,ingest,cpu,gpu,send,train"


class Cluster:
    """Processes sharing one database URL, one data directory (the "shared mount") and keys."""

    def __init__(self, tmp: Path, db_url: str, pacs: Receiver | None, **extra: Any) -> None:
        self.tmp, self.db_url, self.pacs = tmp, db_url, pacs
        self.data = tmp / "shared"
        self.extra = extra
        self.procs: list[NodeProcess] = []
        self.engine = create_engine(db_url)

    def config(self, port: int | None = None) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "database_url": self.db_url,
            "jobs": {"backend": "procrastinate", "stalled_after_s": 6.0},
            "completion": {"quiet_period_s": 2.0, "check_interval_s": 0.2},
            "results": {"destinations": ["pacs"] if self.pacs else []},
            "learning": {"enabled": False},
        }
        if self.pacs is not None:
            cfg["peers"] = {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                     "port": self.pacs.port, "allow_store": False}}
        if port is not None:
            cfg["scp"] = {"port": port}
        for key, value in self.extra.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        return cfg

    def receiver(self, name: str) -> NodeProcess:
        p = NodeProcess(self.tmp / name, self.config(free_port()), data_dir=self.data,
                        command=["serve", "--role", "receiver"]).start()
        self.procs.append(p)
        return p

    def worker(self, name: str, queues: str = QUEUES) -> NodeProcess:
        p = NodeProcess(self.tmp / name, self.config(), data_dir=self.data,
                        command=["worker", "--queues", queues]).start()
        self.procs.append(p)
        return p

    def all_in_one(self, name: str) -> NodeProcess:
        p = NodeProcess(self.tmp / name, self.config(free_port()), data_dir=self.data).start()
        self.procs.append(p)
        return p

    def rows(self, sql: str) -> list[tuple]:
        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql)).all()]

    def close(self) -> None:
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
        self.engine.dispose()


@pytest.fixture
def pacs(tmp_path: Path):
    pacs = start_orthanc(tmp_path / "orthanc")
    yield pacs
    pacs.stop()


def _instances_by_study(pacs: Receiver) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in orthanc_get(pacs, "/instances"):
        tags = orthanc_get(pacs, f"/instances/{i}/simplified-tags")
        out.setdefault(tags["StudyInstanceUID"], []).append(tags["SOPInstanceUID"])
    return out


def test_two_receivers_two_workers_deliver_each_study_once(tmp_path: Path, pg_url: str,
                                                           pacs: Receiver) -> None:
    cluster = Cluster(tmp_path, pg_url, pacs)
    try:
        r1 = cluster.receiver("r1")  # the first process creates schema, keys and the demo model
        r2 = cluster.receiver("r2")
        cluster.worker("w1")
        cluster.worker("w2")
        studies = [make_ct_study(seed=800 + i, n_slices=12, rows=64, columns=64,
                                 patient_id=f"PAT-SCALE-{i}") for i in range(3)]
        files = [write_study(s, tmp_path / f"study{i}") for i, s in enumerate(studies)]
        # study 0 to receiver 1, study 1 to receiver 2, study 2 split across both
        sends = [(r1, files[0]), (r2, files[1]), (r1, files[2][::2]), (r2, files[2][1::2])]
        results: list[int] = []
        threads = [threading.Thread(target=lambda r=r, f=f: results.append(
            storescu(r.port, f).returncode)) for r, f in sends]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [0, 0, 0, 0]
        wait_for(lambda: cluster.rows("select count(*) from outbox where status = 'sent'")
                 == [(6,)], 180, 0.5)
        time.sleep(3)  # nothing else arrives late
        delivered = _instances_by_study(pacs)
        assert sorted(delivered) == sorted(s.study_instance_uid for s in studies)
        assert all(len(v) == 2 for v in delivered.values())  # one SEG and one SR each
        assert cluster.rows("select count(*), max(attempts) from outbox") == [(6, 1)]
        assert cluster.rows("select count(*) from inference_result") == [(3,)]
        assert cluster.rows("select count(*) from study where hooked_version = 1") == [(3,)]
        assert cluster.rows("select count(*) from instance where state = 'deidentified'") \
            == [(36,)]
        # the operator API sees procrastinate's jobs and queues
        settings = load_settings(r1.config_path)
        engine, sessions = open_database(settings, upgrade=False)
        try:
            svc = ApiServices.over(settings, sessions)
            listed = queries.jobs(svc, status="done", limit=500).items
            assert {"infer", "send_result", "study_complete"} <= {j.task for j in listed}
            assert queries.queue_depths(svc)["gpu"]["done"] == 3
        finally:
            engine.dispose()
    finally:
        cluster.close()


def test_killed_worker_job_runs_again_on_another(tmp_path: Path, pg_url: str,
                                                 pacs: Receiver) -> None:
    cluster = Cluster(tmp_path, pg_url, pacs)
    try:
        r1 = cluster.receiver("r1")
        # w1 is the only GPU worker at first; w2 does everything else
        w1 = cluster.worker("w1", "gpu")
        cluster.worker("w2", "default,ingest,cpu,send")
        study = make_ct_study(seed=900, n_slices=200, rows=256, columns=256,
                              pixel_spacing_mm=0.75, patient_id="PAT-KILLED")
        assert storescu(r1.port, write_study(study, tmp_path / "study")).returncode == 0
        wait_for(lambda: cluster.rows(
            "select count(*) from procrastinate_jobs where task_name = 'infer' "
            "and status = 'doing'") == [(1,)], 180, 0.05)
        w1.kill()  # mid-inference
        cluster.worker("w3", "gpu")
        wait_for(lambda: cluster.rows("select count(*) from outbox where status = 'sent'")
                 == [(2,)], 240, 0.5)
        [(attempts,)] = cluster.rows(
            "select attempts from procrastinate_jobs where task_name = 'infer'")
        assert attempts == 2  # the killed run, then the recovered one
        assert cluster.rows("select count(*) from inference_result") == [(1,)]
        delivered = _instances_by_study(pacs)
        assert list(delivered) == [study.study_instance_uid]
        assert len(delivered[study.study_instance_uid]) == 2
    finally:
        cluster.close()


def test_two_all_in_one_nodes_run_a_scheduled_retrain_once_per_tick(tmp_path: Path,
                                                                    pg_url: str) -> None:
    cluster = Cluster(tmp_path, pg_url, None,
                      learning={"enabled": True, "interval_s": 5.0, "min_new_labels": 1})
    try:
        cluster.all_in_one("a")
        cluster.all_in_one("b")
        wait_for(lambda: cluster.rows("select count(*) from training_run")[0][0] >= 3, 90, 0.5)
        runs = cluster.rows("select tick, status from training_run order by id")
        ticks = [t for t, _ in runs]
        assert None not in ticks and len(ticks) == len(set(ticks)), runs
        assert {s for _, s in runs} <= {"skipped", "running"}  # no labels: nothing to train
    finally:
        cluster.close()

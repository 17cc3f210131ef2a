"""What only the procrastinate backend has: its schema, the optional extra, periodic
tasks, stalled-job dead letters, and enqueue with a session on another database."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from backends import make_queue, make_registry

from dicomnode.errors import JobError
from dicomnode.jobs.base import RetryPolicy
from dicomnode.jobs.procrastinate_queue import (
    ProcrastinateQueue,
    apply_schema,
    conninfo,
)
from dicomnode.storage.db import create_db_engine, session_factory


@pytest.fixture
def url(pg_url: str) -> str:
    apply_schema(pg_url)
    return pg_url


@pytest.fixture
def queues():
    made: list[ProcrastinateQueue] = []
    yield made
    for q in made:
        q.stop()


def test_apply_schema_is_idempotent_and_safe_to_race(pg_url: str) -> None:
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(apply_schema(pg_url)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False, False, True]
    assert apply_schema(pg_url) is False


def test_construction_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "procrastinate", None)
    with pytest.raises(JobError, match=r"dicomnode\[scale\]"):
        ProcrastinateQueue("postgresql://db/x", make_registry({}), workers={})


def test_importing_the_module_does_not_import_procrastinate() -> None:
    code = ("import sys, dicomnode.jobs.procrastinate_queue as m; "
            "assert 'procrastinate' not in sys.modules, 'imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]


def test_construction_with_a_sqlite_url() -> None:
    with pytest.raises(JobError, match="PostgreSQL URL"):
        ProcrastinateQueue("sqlite:///x.db", make_registry({}), workers={})


def test_construction_with_heartbeat_not_below_stalled_timeout() -> None:
    with pytest.raises(JobError, match="stalled_after_s"):
        ProcrastinateQueue("postgresql://db/x", make_registry({}), workers={},
                           heartbeat_s=30, stalled_after_s=30)


def test_conninfo_drops_the_sqlalchemy_driver() -> None:
    assert conninfo("postgresql+psycopg://u:p@h:5433/db?sslmode=require") == (
        "postgresql://u:p@h:5433/db?sslmode=require"
    )


def test_start_without_schema(pg_url: str, queues: list[ProcrastinateQueue]) -> None:
    q = make_queue("procrastinate", pg_url, make_registry({"t": lambda ctx: None}), {"q": 1})
    queues.append(q)
    with pytest.raises(JobError, match="apply_schema"):
        q.start(None)


def test_periodic_task_fires_once_per_tick_across_nodes(
    url: str, queues: list[ProcrastinateQueue]
) -> None:
    ticks: list[int] = []
    guard = threading.Lock()

    def tick(ctx, timestamp: int, label: str) -> None:
        with guard:
            ticks.append(timestamp)
        assert label == "nightly"

    for _ in range(2):  # two nodes, each deferring every tick
        q = make_queue("procrastinate", url, make_registry({"tick": tick}), {"q": 1})
        q.add_periodic("tick", "* * * * * *", args={"label": "nightly"})
        queues.append(q)
    for q in queues:
        q.start(None)
    time.sleep(3.2)
    for q in queues:
        q.stop()
    assert len(ticks) >= 2
    assert len(set(ticks)) == len(ticks)  # no tick ran twice


def test_add_periodic_validates(url: str) -> None:
    q = make_queue("procrastinate", url, make_registry({"t": lambda ctx, timestamp: None}), {})
    with pytest.raises(JobError, match="cron"):
        q.add_periodic("t", "every night")
    with pytest.raises(JobError, match="unknown task"):
        q.add_periodic("nope", "0 2 * * *")
    q.add_periodic("t", "0 2 * * *")
    with pytest.raises(JobError, match="already has a schedule"):
        q.add_periodic("t", "0 3 * * *")


def test_stalled_job_on_its_last_attempt_is_dead_lettered(
    url: str, queues: list[ProcrastinateQueue]
) -> None:
    ran: list[int] = []
    q = make_queue("procrastinate", url, make_registry({"t": lambda ctx: ran.append(1)},
                                                       retry=RetryPolicy(2, 0.05, 0.2)), {"q": 1})
    queues.append(q)
    job_id = q.enqueue("t", {})
    with psycopg.connect(conninfo(url)) as conn:  # what a worker killed in attempt 2 leaves
        (worker_id,) = conn.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat)"
            " VALUES (now() - interval '1 hour') RETURNING id"
        ).fetchone()
        conn.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s,"
                     " attempts = 1 WHERE id = %s", (worker_id, job_id))
    q.start(None)
    assert _wait(lambda: q.job(job_id).status == "failed")
    job = q.job(job_id)
    assert job.attempts == 2 and job.error.startswith("WorkerLost:")
    assert ran == []


def test_task_errors_reach_procrastinate_logs_without_their_message(
    url: str, queues: list[ProcrastinateQueue], caplog: pytest.LogCaptureFixture
) -> None:
    def leaky(ctx) -> None:
        raise ValueError("Invalid value 'Doe^Jane' for PatientName")

    q = make_queue("procrastinate", url, make_registry({"t": leaky}, RetryPolicy(1, 0, 0)),
                   {"q": 1})
    queues.append(q)
    with caplog.at_level(logging.INFO):
        q.start(None)
        job_id = q.enqueue("t", {})
        assert _wait(lambda: q.job(job_id).status == "failed")
    assert q.job(job_id).error.startswith("ValueError at test_procrastinate.py:")
    text = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert "ended with status: Error" in text  # procrastinate did log the failure
    assert "Doe^Jane" not in text


def test_enqueue_with_a_session_on_another_database_is_not_transactional(
    url: str, tmp_path: Path, queues: list[ProcrastinateQueue]
) -> None:
    q = make_queue("procrastinate", url, make_registry({"t": lambda ctx: None}), {})
    queues.append(q)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with pytest.raises(RuntimeError):
            with session_factory(engine).begin() as s:
                job_id = q.enqueue("t", {}, session=s)
                raise RuntimeError("abort")
    finally:
        engine.dispose()
    assert q.job(job_id).status == "todo"  # committed on the queue's own connection


def _wait(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()

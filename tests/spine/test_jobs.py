"""The embedded job queue on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, update

from dicomnode.errors import SendError
from dicomnode.jobs.base import RetryPolicy, TaskRegistry, backoff_delay
from dicomnode.jobs.local import LocalQueue, describe_error
from dicomnode.storage.db import create_db_engine, migrate, session_factory
from dicomnode.storage.models import Job, JobStatus


@pytest.fixture
def sessions(db_url: str):
    engine = create_db_engine(db_url)
    migrate(engine)
    yield session_factory(engine)
    engine.dispose()


FAST_RETRY = RetryPolicy(3, 0.05, 0.2)


def make_queue(sessions, tasks, workers=None, retry=FAST_RETRY):
    reg = TaskRegistry(retry)
    for name, fn in tasks.items():
        reg.register(name, fn, queue="q")
    return LocalQueue(sessions, reg, workers=workers or {"q": 2}, poll_interval_s=0.05)


def jobs(sessions):
    with sessions() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def test_runs_with_context_and_args(sessions) -> None:
    seen: list[tuple[str, int]] = []
    q = make_queue(sessions, {"t": lambda ctx, x: seen.append((ctx, x))})
    q.start("CTX")
    try:
        for x in range(5):
            q.enqueue("t", {"x": x})
        assert q.wait_idle(10)
    finally:
        q.stop()
    assert sorted(seen) == [("CTX", x) for x in range(5)]
    assert {j.status for j in jobs(sessions)} == {JobStatus.DONE}


def test_dedup_key_admits_one_job_ever(sessions) -> None:
    q = make_queue(sessions, {"t": lambda ctx: None})
    assert q.enqueue("t", {}, dedup_key="k") is not None
    assert q.enqueue("t", {}, dedup_key="k") is None
    assert len(jobs(sessions)) == 1


def test_enqueue_in_caller_transaction_rolls_back_with_it(sessions) -> None:
    q = make_queue(sessions, {"t": lambda ctx: None})
    with pytest.raises(RuntimeError):
        with sessions.begin() as s:
            q.enqueue("t", {}, session=s)
            raise RuntimeError("abort")
    assert jobs(sessions) == []


def test_failures_retry_with_backoff_then_dead_letter(sessions) -> None:
    calls: list[float] = []

    def flaky(ctx) -> None:
        calls.append(time.monotonic())
        raise SendError("peer down")

    q = make_queue(sessions, {"t": flaky})
    q.start(None)
    try:
        q.enqueue("t", {})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and jobs(sessions)[0].status != JobStatus.FAILED:
            time.sleep(0.05)
    finally:
        q.stop()
    [job] = jobs(sessions)
    assert job.status == JobStatus.FAILED and job.attempts == 3
    assert job.last_error == "SendError: peer down"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # 0.05 s doubling


def test_success_after_a_retry(sessions) -> None:
    state = {"n": 0}

    def once_flaky(ctx) -> None:
        state["n"] += 1
        if state["n"] == 1:
            raise OSError("transient")

    q = make_queue(sessions, {"t": once_flaky})
    q.start(None)
    try:
        q.enqueue("t", {})
        assert q.wait_idle(10)
    finally:
        q.stop()
    [job] = jobs(sessions)
    assert (job.status, job.attempts) == (JobStatus.DONE, 2)


def test_running_rows_from_a_crash_run_again(sessions) -> None:
    ran = threading.Event()
    q = make_queue(sessions, {"t": lambda ctx: ran.set()})
    q.enqueue("t", {})
    with sessions.begin() as s:  # what a crash mid-job leaves behind
        s.execute(update(Job).values(status=JobStatus.RUNNING, attempts=1, locked_by="dead:1"))
    q.start(None)
    try:
        assert ran.wait(10)
        assert q.wait_idle(10)
    finally:
        q.stop()
    [job] = jobs(sessions)
    assert (job.status, job.attempts) == (JobStatus.DONE, 2)


def test_many_workers_never_run_a_job_twice(sessions) -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def work(ctx, n: int) -> None:
        with lock:
            counts[n] = counts.get(n, 0) + 1

    q = make_queue(sessions, {"t": work}, workers={"q": 6})
    for n in range(60):
        q.enqueue("t", {"n": n})
    q.start(None)
    try:
        assert q.wait_idle(30)
    finally:
        q.stop()
    assert counts == dict.fromkeys(range(60), 1)


def test_backoff_is_capped() -> None:
    p = RetryPolicy(10, 30, 600)
    assert [backoff_delay(p, a) for a in (1, 2, 3, 5, 9)] == [30, 60, 120, 480, 600]


def test_foreign_error_messages_are_withheld() -> None:
    """A third-party message may quote a dataset value: only its type and place are kept."""
    try:
        raise ValueError("Invalid value 'Doe^Jane' for PatientName")
    except ValueError as exc:
        text = describe_error(exc)
    assert "Doe" not in text and text.startswith("ValueError at test_jobs.py:")

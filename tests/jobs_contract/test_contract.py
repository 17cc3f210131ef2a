"""The JobQueue contract (dicomnode.jobs.base), one set of tests for every backend.

Each test runs on LocalQueue/SQLite, LocalQueue/PostgreSQL and ProcrastinateQueue/
PostgreSQL, each on a fresh database (the ``backend`` fixture in conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from backends import crash_registry
from conftest import Harness

from dicomnode.jobs.base import RetryPolicy


def wait_for(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_runs_with_context_and_args(backend: Harness) -> None:
    seen: list[tuple[str, int]] = []
    q = backend.queue({"t": lambda ctx, x: seen.append((ctx, x))})
    q.start("CTX")
    ids = [q.enqueue("t", {"x": x}) for x in range(5)]
    assert q.wait_idle(15)
    assert sorted(seen) == [("CTX", x) for x in range(5)]
    infos = [q.job(i) for i in ids if i is not None]
    assert [(j.task, j.queue, j.status, j.attempts, j.error) for j in infos] == [
        ("t", "q", "done", 1, None)
    ] * 5


def test_delay_holds_a_job_back(backend: Harness) -> None:
    ran: list[float] = []
    q = backend.queue({"t": lambda ctx: ran.append(time.monotonic())})
    q.start(None)
    t0 = time.monotonic()
    q.enqueue("t", {}, delay_s=0.6)
    time.sleep(0.3)
    assert ran == []
    assert q.wait_idle(15)
    assert len(ran) == 1 and ran[0] - t0 >= 0.6


def test_dedup_key_admits_one_job_ever(backend: Harness) -> None:
    runs: list[int] = []
    q = backend.queue({"t": lambda ctx, n: runs.append(n)})
    first = q.enqueue("t", {"n": 1}, dedup_key="study_complete:1:1")
    assert first is not None
    assert q.enqueue("t", {"n": 2}, dedup_key="study_complete:1:1") is None  # while waiting
    q.start(None)
    assert q.wait_idle(15)
    assert q.enqueue("t", {"n": 3}, dedup_key="study_complete:1:1") is None  # after it ran
    assert q.enqueue("t", {"n": 4}, dedup_key="study_complete:1:2") is not None
    assert q.wait_idle(15)
    assert sorted(runs) == [1, 4]


def test_enqueue_in_caller_transaction_rolls_back_with_it(backend: Harness) -> None:
    q = backend.queue({"t": lambda ctx: None})
    with pytest.raises(RuntimeError):
        with backend.sessions.begin() as s:
            job_id = q.enqueue("t", {}, session=s, dedup_key="k")
            assert job_id is not None
            raise RuntimeError("abort")
    assert q.job(job_id) is None
    with backend.sessions.begin() as s:  # the key went with the rolled-back job
        job_id = q.enqueue("t", {}, session=s, dedup_key="k")
    assert job_id is not None
    info = q.job(job_id)
    assert info is not None and info.status == "todo"


def test_failures_retry_with_backoff_then_dead_letter(backend: Harness) -> None:
    calls: list[float] = []

    def flaky(ctx) -> None:
        calls.append(time.monotonic())
        raise ConnectionRefusedError("peer down")

    q = backend.queue({"t": flaky})
    q.start(None)
    job_id = q.enqueue("t", {})
    assert wait_for(lambda: q.job(job_id).status == "failed")
    job = q.job(job_id)
    assert job.attempts == 3 and len(calls) == 3
    # a third-party message may quote a dataset value: type and place only
    assert job.error and job.error.startswith("ConnectionRefusedError at test_contract.py:")
    assert "peer down" not in job.error
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # 0.05 s doubling
    assert q.wait_idle(5)


def test_success_after_a_retry(backend: Harness) -> None:
    state = {"n": 0}

    def once_flaky(ctx) -> None:
        state["n"] += 1
        if state["n"] == 1:
            raise OSError("transient")

    q = backend.queue({"t": once_flaky})
    q.start(None)
    job_id = q.enqueue("t", {})
    assert q.wait_idle(15)
    job = q.job(job_id)
    assert (job.status, job.attempts, job.error) == ("done", 2, None)


def test_concurrent_workers_never_run_a_job_twice(backend: Harness) -> None:
    counts: dict[int, int] = defaultdict(int)
    lock = threading.Lock()

    def work(ctx, n: int) -> None:
        with lock:
            counts[n] += 1

    queues = [backend.queue({"t": work}, {"q": 3}) for _ in range(backend.nodes)]
    for n in range(60):
        queues[n % len(queues)].enqueue("t", {"n": n})
    for q in queues:
        q.start(None)
    assert all(q.wait_idle(30) for q in queues)
    assert counts == dict.fromkeys(range(60), 1)


def test_lock_serialises_the_jobs_of_one_study(backend: Harness) -> None:
    guard = threading.Lock()
    active: dict[int, int] = defaultdict(int)
    most: dict[int, int] = defaultdict(int)
    order: dict[int, list[int]] = defaultdict(list)
    both = {"now": 0, "most": 0}

    def work(ctx, study: int, n: int) -> None:
        with guard:
            active[study] += 1
            most[study] = max(most[study], active[study])
            order[study].append(n)
            both["now"] += 1
            both["most"] = max(both["most"], both["now"])
        time.sleep(0.1)
        with guard:
            active[study] -= 1
            both["now"] -= 1

    # two tasks on two queues: a study lock holds across queues
    q = backend.queue({"infer": work, "send": work}, {"q": 3, "q2": 3},
                      queues={"send": "q2"})
    for n in range(5):
        for study in (1, 2):
            q.enqueue(("infer", "send")[n % 2], {"study": study, "n": n}, lock=f"study:{study}")
    q.start(None)
    assert q.wait_idle(30)
    assert most == {1: 1, 2: 1}
    assert order == {1: list(range(5)), 2: list(range(5))}  # in enqueue order
    assert both["most"] == 2  # a lock is per study, not global


def test_a_locked_job_waits_for_earlier_ones_until_they_finish_or_dead_letter(
    backend: Harness,
) -> None:
    calls: list[str] = []

    def first(ctx) -> None:
        calls.append("first")
        raise OSError("always")

    q = backend.queue({"first": first, "second": lambda ctx: calls.append("second")},
                      retry=RetryPolicy(2, 0.3, 1.0))
    q.start(None)
    q.enqueue("first", {}, lock="study:7")
    q.enqueue("second", {}, lock="study:7")
    assert q.wait_idle(15)
    # the second job waited through the first one's backoff, and ran once it dead-lettered
    assert calls == ["first", "first", "second"]


def test_a_worker_killed_mid_job_runs_it_again(backend: Harness, tmp_path: Path) -> None:
    """SIGKILL a worker process mid-job; another worker runs the job again, and the
    effect happens once (LocalQueue: at its next start; procrastinate: stalled-job
    recovery, while the other worker is already running)."""
    q = backend.queue(crash_registry(), {"q": 1})
    job_id = q.enqueue("hang_once", {"n": 5})
    here = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, str(here / "backends.py"), backend.kind, backend.url, str(tmp_path)],
        cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: (tmp_path / "started-1").exists(), 30), (
            proc.poll(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
        )
        assert q.job(job_id).status == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    q.start(str(tmp_path))
    # generous: under load, heartbeats, the stalled check and the next claim all slow down
    assert wait_for(lambda: q.job(job_id).status == "done", 90)
    job = q.job(job_id)
    assert job.attempts == 2
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-1", "started-2"]
    assert (tmp_path / "effect-5").read_text() == "x"

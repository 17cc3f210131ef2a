"""The embedded queue backend: a job table in the node's database, worker threads in-process.

Claiming is one ``UPDATE ... WHERE id = (oldest runnable) RETURNING``: atomic on
SQLite (every transaction holds the writer lock, see ``storage.db``) and on
PostgreSQL (``FOR UPDATE SKIP LOCKED`` in the sub-select). This backend assumes
one node process owns the table, so rows left ``running`` by a crash go back to
``todo`` when it starts; several processes use the procrastinate backend.

A job's ``lock`` is kept in its ``args`` under :data:`LOCK_KEY` (the ``job``
table has no column for it) and removed before the task is called. A job is
claimed only if no job with the same lock is running and none enqueued before
it waits, as in procrastinate. On PostgreSQL two claims can pass that check at
once (each sees the other's row as ``todo``), so a claim of a locked job also
takes a transaction-level advisory lock on the lock name and checks again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Select, and_, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicomnode.errors import JobError, NodeError
from dicomnode.jobs.base import JobInfo, TaskRegistry, backoff_delay, call_dead_letter_hook
from dicomnode.storage.models import Job, JobStatus

__all__ = ["LOCK_KEY", "LocalQueue"]

LOCK_KEY = "__lock__"
"""Key of a job's lock in its stored ``args``; tasks never see it."""


def _lock_of(job: Any) -> Any:
    """SQL expression: the lock of ``job`` (the Job entity or an alias), NULL if none."""
    return job.args[LOCK_KEY].as_string()


_SQL_ENQUEUE = text(
    "INSERT INTO job (task, queue, args, dedup_key, status, attempts, max_attempts, run_after,"
    " created_at, updated_at) VALUES (:task, :queue, :args, :dedup_key, :status, :attempts,"
    " :max_attempts, :run_after, :created_at, :updated_at)"
    " ON CONFLICT (dedup_key) DO NOTHING RETURNING id"
)

log = logging.getLogger(__name__)


def describe_error(error: BaseException) -> str:
    """A job failure as stored and logged: the node's own errors with their message (they
    never carry patient data, see errors.py); anything else by type and place only, since
    a third-party message may quote a dataset value."""
    if isinstance(error, NodeError):
        return f"{error.__class__.__name__}: {error}"[:2000]
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{error.__class__.__name__}{where} (message withheld: may quote patient data)"


class LocalQueue:
    """Job table + worker threads.

    Parameters
    ----------
    sessions
        Session factory of the node's database.
    registry
        The tasks this queue runs.
    workers
        Threads per queue name; queues not named get none (jobs wait there).
    poll_interval_s
        How often an idle worker looks for due jobs (enqueue wakes it sooner).
    lease_s
        Recorded on claim, for operators: how long a job is expected to take at most.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: TaskRegistry,
        *,
        workers: Mapping[str, int],
        poll_interval_s: float = 0.5,
        lease_s: float = 600.0,
    ) -> None:
        self.sessions = sessions
        self.registry = registry
        self.workers = dict(workers)
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._ctx: Any = None

    # -- producer side -------------------------------------------------------------------

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any],
        *,
        dedup_key: str | None = None,
        delay_s: float = 0.0,
        session: Session | Connection | None = None,
        lock: str | None = None,
    ) -> int | None:
        """See :meth:`dicomnode.jobs.base.JobQueue.enqueue`.

        With ``session``, the job is inserted in that transaction (it must be on
        this queue's database).

        Raises
        ------
        JobError
            ``task`` is not registered, or ``args`` uses the reserved key :data:`LOCK_KEY`.
        """
        spec = self.registry[task]
        if LOCK_KEY in args:
            raise JobError(f"job args must not use the reserved key {LOCK_KEY!r}")
        now = time.time()
        stored = dict(args)
        if lock is not None:
            stored[LOCK_KEY] = lock
        values = {
            "task": task,
            "queue": spec.queue,
            "args": stored,
            "dedup_key": dedup_key,
            "status": JobStatus.TODO,
            "attempts": 0,
            "max_attempts": spec.retry.max_attempts,
            "run_after": now + delay_s,
            "created_at": now,
            "updated_at": now,
        }
        if session is not None:
            job_id = self._insert(session, values)
        else:
            with self.sessions.begin() as own:
                job_id = self._insert(own, values)
        if job_id is not None:
            self.notify()
        return job_id

    @staticmethod
    def _insert(session: Session | Connection, values: dict[str, Any]) -> int | None:
        # Prepared text: enqueue sits on the C-STORE path (one de-identification job per
        # instance), where building a Core insert would cost more than the SQL.
        params = {**values, "args": json.dumps(values["args"])}
        return session.execute(_SQL_ENQUEUE, params).scalar()

    def notify(self) -> None:
        """Wake idle workers (a job was added)."""
        with self._wake:
            self._wake.notify_all()

    # -- worker side ---------------------------------------------------------------------

    def recover(self) -> int:
        """Put jobs left ``running`` by a crashed process back to ``todo``; return how many."""
        with self.sessions.begin() as s:
            res = s.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING)
                .values(status=JobStatus.TODO, locked_by=None, lease_until=None)
            )
            return int(getattr(res, "rowcount", 0) or 0)

    def start(self, ctx: Any) -> None:
        self.registry.frozen = True
        self._ctx = ctx
        recovered = self.recover()
        if recovered:
            log.info("job queue: %d interrupted job(s) will run again", recovered)
        for queue, n in sorted(self.workers.items()):
            for i in range(n):
                t = threading.Thread(
                    target=self._worker, args=(queue,), name=f"job-{queue}-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.notify()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def _claim(self, queue: str, worker: str) -> Job | None:
        now = time.time()
        with self.sessions.begin() as s:
            postgres = s.get_bind().dialect.name == "postgresql"
            due = (Job.status == JobStatus.TODO, Job.queue == queue, Job.run_after <= now)
            pick = select(Job.id).where(*due).order_by(Job.run_after, Job.id).limit(1)
            if postgres:
                pick = pick.with_for_update(skip_locked=True)
            # Fast path (a covering-index read, as before locks existed): the oldest due
            # job, if it has no lock. Only a locked one needs the lock-aware search.
            job_id = s.execute(pick).scalar()
            if job_id is None:
                return None
            lock = s.execute(select(_lock_of(Job)).where(Job.id == job_id)).scalar()
            if lock is not None:
                picked = s.execute(self._pick_unblocked(due, postgres)).first()
                if picked is None:
                    return None
                job_id, lock = picked
                if lock is not None and postgres and self._lock_is_taken(s, lock):
                    return None  # another worker claimed a job of this lock meanwhile
            row = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.TODO)
                .values(
                    status=JobStatus.RUNNING,
                    attempts=Job.attempts + 1,
                    locked_by=worker,
                    lease_until=now + self.lease_s,
                    updated_at=now,
                )
                .returning(Job)
            ).scalar()
            return row

    @staticmethod
    def _pick_unblocked(due: tuple[Any, ...], postgres: bool) -> Select[tuple[int, str | None]]:
        """The oldest due job that no job of its lock blocks (procrastinate's rule: a
        running one, or one enqueued earlier that still waits, also for a retry).

        A locked job may run if it is the oldest waiting job of its lock and its lock has
        no running job. Both sets come from uncorrelated subqueries, computed once per
        claim: a correlated one per candidate made a claim quadratic on PostgreSQL.
        """
        other = aliased(Job)
        heads = (
            select(func.min(other.id))
            .where(other.status == JobStatus.TODO, _lock_of(other).is_not(None))
            .group_by(_lock_of(other))
        )
        busy = select(_lock_of(other)).where(
            other.status == JobStatus.RUNNING, _lock_of(other).is_not(None)
        )
        pick = (
            select(Job.id, _lock_of(Job))
            .where(
                *due,
                or_(
                    _lock_of(Job).is_(None),
                    and_(Job.id.in_(heads), _lock_of(Job).not_in(busy)),
                ),
            )
            .order_by(Job.run_after, Job.id)
            .limit(1)
        )
        return pick.with_for_update(of=Job, skip_locked=True) if postgres else pick

    @staticmethod
    def _lock_is_taken(s: Session, lock: str) -> bool:
        """PostgreSQL: serialise claims of one lock, then look again for a running job.

        Two claims can both find a lock free (each sees the other's row as ``todo``);
        SQLite claims are serialised by BEGIN IMMEDIATE already.
        """
        s.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"dicomnode.job:{lock}"}
        )
        running = s.execute(
            select(Job.id).where(_lock_of(Job) == lock, Job.status == JobStatus.RUNNING).limit(1)
        ).first()
        return running is not None

    def _finish(self, job: Job, error: BaseException | None) -> None:
        now = time.time()
        values: dict[str, Any] = {"locked_by": None, "lease_until": None, "updated_at": now}
        if error is None:
            values["status"] = JobStatus.DONE
            values["last_error"] = None
        else:
            values["last_error"] = describe_error(error)
            if job.attempts >= job.max_attempts:
                values["status"] = JobStatus.FAILED
            else:
                spec = self.registry[job.task]
                values["status"] = JobStatus.TODO
                values["run_after"] = now + backoff_delay(spec.retry, job.attempts)
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job.id).values(**values))
        if values.get("status") == JobStatus.FAILED:
            args = {k: v for k, v in job.args.items() if k != LOCK_KEY}
            call_dead_letter_hook(
                self.registry[job.task], self._ctx, args, values["last_error"], log
            )

    def _worker(self, queue: str) -> None:
        name = f"{os.getpid()}:{threading.current_thread().name}"
        while not self._stop.is_set():
            try:
                job = self._claim(queue, name)
            except Exception:  # database briefly unavailable: back off, never die
                log.exception("job queue: claim failed on %s", queue)
                self._stop.wait(self.poll_interval_s)
                continue
            if job is None:
                with self._wake:
                    self._wake.wait(self.poll_interval_s)
                continue
            with self._busy_lock:
                self._busy += 1
            error: BaseException | None = None
            args = {k: v for k, v in job.args.items() if k != LOCK_KEY}
            try:
                self.registry[job.task].fn(self._ctx, **args)
            except Exception as exc:
                error = exc
                log.warning(
                    "job %d %s attempt %d/%d failed: %s",
                    job.id,
                    job.task,
                    job.attempts,
                    job.max_attempts,
                    describe_error(exc),
                )
            try:
                self._finish(job, error)
            except Exception:
                log.exception("job queue: cannot record the outcome of job %d", job.id)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    # -- introspection -------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs per queue and status."""
        with self.sessions() as s:
            rows = s.execute(
                select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status)
            ).all()
        out: dict[str, dict[str, int]] = {}
        for queue, status, n in rows:
            out.setdefault(queue, {})[status] = n
        return out

    def job(self, job_id: int) -> JobInfo | None:
        """The job ``job_id`` as it is now; None if there is no such job."""
        with self.sessions() as s:
            row = s.get(Job, job_id)
            if row is None:
                return None
            return JobInfo(row.id, row.task, row.queue, row.status, row.attempts, row.last_error)

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.sessions() as s:
                pending = s.execute(
                    select(func.count()).where(
                        Job.status.in_([JobStatus.TODO, JobStatus.RUNNING]),
                        Job.queue.in_(list(self.workers)),
                        Job.run_after <= time.time() + max(0.0, deadline - time.monotonic()),
                    )
                ).scalar()
            if not pending and self._busy == 0:
                return True
            time.sleep(0.05)
        return False

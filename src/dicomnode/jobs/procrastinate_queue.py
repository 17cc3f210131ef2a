"""The scale-out queue backend: procrastinate on PostgreSQL.

Several node processes (receivers, CPU and GPU workers) share one PostgreSQL
database; each runs the same task functions from the :class:`TaskRegistry`.
procrastinate (an optional extra, ``pip install 'dicomnode[scale]'``) is
imported only when this backend is used.

What it adds to, or changes from, :class:`dicomnode.jobs.local.LocalQueue`
(docs/procrastinate-notes.md gives the reasons):

- **dedup key**: procrastinate's ``queueing_lock`` only keeps a second job out
  while the first is *waiting*. The protocol promises one job *ever* per key,
  so the key is also inserted into ``dicomnode_job_dedup`` (primary key) in the
  transaction that defers the job; a conflict rolls the job back (savepoint).
- **session**: when the caller's SQLAlchemy session or connection is on the
  same PostgreSQL database (psycopg 3 driver), the job and its dedup row are
  written on that connection and commit or roll back with it. Otherwise the job
  is committed at once on the queue's own connection, before the caller commits:
  the task may run before the caller's rows are visible (it fails and is retried)
  or after the caller rolled back (it finds nothing to do). Tasks are idempotent
  and the node re-enqueues at start, so that costs time, never correctness.
- **errors**: procrastinate keeps no error text, so each failed attempt writes
  ``dicomnode_job_error`` (one row per job, deleted with the job) with the same
  patient-safe text as the local backend; procrastinate sees (and logs) only
  that text, never the original exception.
- **crashed workers**: a periodic task (``retry_stalled_jobs``, as procrastinate
  documents it) puts the jobs of workers whose heartbeat is older than
  ``stalled_after_s`` back to ``todo``, or dead-letters them when that run was
  their last attempt. Until then such a job waits; nothing resets ``doing`` rows
  at start, since other processes may be running them.
- **periodic tasks**: :meth:`ProcrastinateQueue.add_periodic` fires a task once
  per cron tick across all nodes (procrastinate's unique periodic-defer row).

Attempts count the same way on both backends: ``max_attempts`` runs in all,
backoff :func:`dicomnode.jobs.base.backoff_delay` between them, a run lost with
its worker included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session

from dicomnode.errors import JobError
from dicomnode.jobs.base import (
    JobInfo,
    RetryPolicy,
    TaskRegistry,
    TaskSpec,
    backoff_delay,
    call_dead_letter_hook,
)
from dicomnode.jobs.local import describe_error
from dicomnode.storage.models import JobStatus

if TYPE_CHECKING:
    import procrastinate
    import psycopg
    import psycopg_pool
    from procrastinate.job_context import JobContext

__all__ = ["MAINTENANCE_QUEUE", "ProcrastinateQueue", "apply_schema", "conninfo"]

log = logging.getLogger(__name__)

EXTRA = "scale"
MAINTENANCE_QUEUE = "jobs_maintenance"
"""Queue of the stalled-job recovery task; every started queue runs one worker on it."""
_STALLED_TASK = "dicomnode.retry_stalled_jobs"
_WORKER_LOST = "WorkerLost: the worker running this attempt stopped without finishing it"

_SIDE_TABLES = """
CREATE TABLE IF NOT EXISTS dicomnode_job_dedup (
    dedup_key text PRIMARY KEY,
    job_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS dicomnode_job_error (
    job_id bigint PRIMARY KEY REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    error text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""
_SQL_DEDUP = (
    "INSERT INTO dicomnode_job_dedup (dedup_key, job_id) VALUES (%s, %s)"
    " ON CONFLICT (dedup_key) DO NOTHING RETURNING job_id"
)
_SQL_ERROR = (
    "INSERT INTO dicomnode_job_error (job_id, attempt, error) VALUES (%s, %s, %s)"
    " ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt,"
    " error = EXCLUDED.error, at = now()"
)
_SQL_ERROR_NAMED = _SQL_ERROR % ("%(job_id)s", "%(attempt)s", "%(error)s")  # procrastinate style
# The same identity seen from two connections means the same database on the same server.
_SQL_FINGERPRINT = "SELECT current_database(), pg_postmaster_start_time()"
_STATUS = {
    "todo": JobStatus.TODO,
    "doing": JobStatus.RUNNING,
    "aborting": JobStatus.RUNNING,
    "succeeded": JobStatus.DONE,
    "failed": JobStatus.FAILED,
    "aborted": JobStatus.FAILED,
    "cancelled": "cancelled",
}


def _require() -> tuple[Any, Any, Any]:
    """procrastinate, psycopg and psycopg_pool, or a JobError naming the extra."""
    try:
        import procrastinate
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise JobError(
            f"the procrastinate job backend needs the optional extra [{EXTRA}] "
            f"(pip install 'dicomnode[{EXTRA}]'); {exc.name or 'a module'} is not installed"
        ) from exc
    return procrastinate, psycopg, psycopg_pool


def conninfo(url: str) -> str:
    """The libpq connection string for a PostgreSQL URL (SQLAlchemy or libpq form).

    Raises
    ------
    JobError
        ``url`` is not a PostgreSQL URL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise JobError("jobs: the procrastinate backend needs a PostgreSQL URL") from None
    if parsed.get_backend_name() != "postgresql":
        raise JobError(
            f"jobs: the procrastinate backend needs a PostgreSQL URL, not {parsed.drivername!r}"
        )
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def apply_schema(url: str, *, connect_timeout_s: int = 30) -> bool:
    """Create procrastinate's schema and this backend's two tables, if absent.

    Idempotent and safe to run from several processes at once (a transaction-level
    advisory lock serialises them). An existing procrastinate schema is left as it
    is: upgrading it to a newer procrastinate is a migration
    (``procrastinate schema --migrations-path``), not this function's job.

    Returns
    -------
    bool
        True if procrastinate's schema was created by this call.

    Raises
    ------
    JobError
        procrastinate is not installed, or the database cannot be reached or changed.
    """
    _, psycopg, _ = _require()
    from procrastinate.schema import SchemaManager

    try:
        with psycopg.connect(conninfo(url), connect_timeout=connect_timeout_s) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('dicomnode.procrastinate_schema'))")
            row = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
            created = not (row and row[0])
            if created:
                conn.execute(SchemaManager.get_schema())
            conn.execute(_SIDE_TABLES)
    except psycopg.Error as exc:
        raise JobError(f"jobs: cannot apply the procrastinate schema: {exc}") from exc
    return created


class _TaskFailed(JobError):
    """A task attempt failed; carries only the patient-safe description of the error."""


def _retry_strategy(policy: RetryPolicy) -> Any:
    """procrastinate retry strategy for ``policy``: ``max_attempts`` runs in all."""
    from procrastinate.retry import BaseRetryStrategy, RetryDecision

    class PolicyRetry(BaseRetryStrategy):
        def get_retry_decision(self, *, exception: BaseException, job: Any) -> Any:
            # job.attempts counts the finished runs before this one
            attempt = job.attempts + 1
            if attempt >= policy.max_attempts:
                return None
            return RetryDecision(retry_in={"seconds": backoff_delay(policy, attempt)})

    return PolicyRetry()


@dataclass(frozen=True)
class _Periodic:
    task: str
    cron: str
    periodic_id: str
    args: dict[str, Any] = field(default_factory=dict)


class ProcrastinateQueue:
    """procrastinate jobs + worker threads, a :class:`~dicomnode.jobs.base.JobQueue`.

    Nothing connects until the first :meth:`enqueue`, :meth:`job` or :meth:`start`.
    The schema must exist first (:func:`apply_schema`). Call :meth:`stop` (or
    :meth:`close` if it never started) to release the connections.

    Parameters
    ----------
    url
        PostgreSQL URL (``postgresql+psycopg://...`` or ``postgresql://...``).
    registry
        The tasks; each runs on its registry queue with its retry policy.
    workers
        Concurrent jobs per queue name in this process; queues not named get no
        worker here (other processes may run them). Empty: enqueue only.
    poll_interval_s
        How often an idle worker looks for due jobs. New jobs arrive sooner
        (LISTEN/NOTIFY); jobs due later (delay, retry backoff) at the next poll.
    heartbeat_s
        How often each worker records that it is alive.
    stalled_after_s
        A worker silent this long is taken for dead: its running jobs run again
        (or are dead-lettered after their last attempt). Must exceed ``heartbeat_s``.
    stalled_check_cron
        When the recovery runs (cron, optional 6th field for seconds); once per
        tick across all nodes.
    recover_stalled
        Run a worker on :data:`MAINTENANCE_QUEUE` that does the recovery. Keep it
        on in at least one process.
    pool_size
        Connections for enqueueing and bookkeeping (workers hold their own:
        a small pool plus one LISTEN connection per queue).
    connect_timeout_s
        How long to wait for the database when connecting.

    Raises
    ------
    JobError
        procrastinate is not installed, or an argument is invalid.
    """

    def __init__(
        self,
        url: str,
        registry: TaskRegistry,
        *,
        workers: Mapping[str, int],
        poll_interval_s: float = 1.0,
        heartbeat_s: float = 10.0,
        stalled_after_s: float = 30.0,
        stalled_check_cron: str = "* * * * *",
        recover_stalled: bool = True,
        pool_size: int = 4,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self._procrastinate, self._psycopg, self._psycopg_pool = _require()
        if not 0 < heartbeat_s < stalled_after_s:
            raise JobError(
                f"jobs: stalled_after_s must exceed heartbeat_s > 0, got heartbeat_s={heartbeat_s},"
                f" stalled_after_s={stalled_after_s}"
            )
        bad = {q: n for q, n in workers.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise JobError(f"jobs: workers must be counts >= 0, got {bad}")
        _check_cron(stalled_check_cron)
        self.url = url
        self.registry = registry
        self.workers = dict(workers)
        self.poll_interval_s = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self.stalled_after_s = stalled_after_s
        self.stalled_check_cron = stalled_check_cron
        self.recover_stalled = recover_stalled
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self._conninfo = conninfo(url)
        self._periodic: list[_Periodic] = []
        self._open_lock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._producer: procrastinate.App | None = None
        self._same_database: dict[str, bool] = {}
        self._fingerprint: tuple[Any, ...] | None = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False

    # -- wiring --------------------------------------------------------------------------

    def add_periodic(
        self,
        task: str,
        cron: str,
        *,
        periodic_id: str = "",
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """Run registered ``task`` as ``fn(ctx, timestamp=<tick>, **args)`` once per cron tick.

        Every node that runs workers defers the tick; the database admits one job
        per (task, periodic_id, tick), so it runs once across the cluster, on a
        worker of the task's queue. At most one such job waits and one runs at a
        time (a tick that finds the previous one still waiting is skipped). A tick
        missed while no worker ran is deferred late only within 10 minutes.

        Parameters
        ----------
        task
            A task in the registry; it must accept ``timestamp`` (the tick, Unix seconds).
        cron
            Five cron fields, or six with seconds last (``"0 2 * * *"``: 02:00 daily).
        periodic_id
            Tells apart several schedules of one task.
        args
            Further JSON keyword arguments for the task.

        Raises
        ------
        JobError
            The queue has started, ``task`` is unknown, ``cron`` is invalid, or this
            (task, periodic_id) is already scheduled.
        """
        if self.registry.frozen:
            raise JobError(f"cannot schedule task {task!r}: the queue has started")
        self.registry[task]
        _check_cron(cron)
        if any(p.task == task and p.periodic_id == periodic_id for p in self._periodic):
            raise JobError(f"task {task!r} already has a schedule with periodic_id {periodic_id!r}")
        self._periodic.append(_Periodic(task, cron, periodic_id, dict(args or {})))

    # -- connections ---------------------------------------------------------------------

    def _open(self) -> tuple[procrastinate.App, psycopg_pool.ConnectionPool]:
        with self._open_lock:
            if self._producer is None or self._pool is None:
                pool = self._psycopg_pool.ConnectionPool(
                    self._conninfo, min_size=1, max_size=self.pool_size, open=False,
                    name="dicomnode-jobs", check=self._psycopg_pool.ConnectionPool.check_connection,
                )
                try:
                    pool.open(wait=True, timeout=self.connect_timeout_s)
                except self._psycopg_pool.PoolTimeout as exc:
                    pool.close()
                    raise JobError(
                        f"jobs: no connection to the job database within {self.connect_timeout_s} s"
                    ) from exc
                app = self._procrastinate.App(connector=self._procrastinate.SyncPsycopgConnector())
                app.open(pool)  # procrastinate borrows the pool; close() closes it
                self._pool, self._producer = pool, app
            return self._producer, self._pool

    def close(self) -> None:
        """Close this queue's own connections (after :meth:`stop`, or if it never started)."""
        with self._open_lock:
            pool, self._pool, self._producer = self._pool, None, None
        if pool is not None:
            pool.close()

    def _caller_connection(self, session: Session | Connection) -> psycopg.Connection[Any] | None:
        """The caller's psycopg connection if it is on this queue's database, else None."""
        conn = session.connection() if isinstance(session, Session) else session
        if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
            return None
        key = conn.engine.url.render_as_string(hide_password=True)
        same = self._same_database.get(key)
        if same is None:
            _, pool = self._open()
            if self._fingerprint is None:
                with pool.connection() as own:
                    self._fingerprint = tuple(own.execute(_SQL_FINGERPRINT).fetchone() or ())
            theirs = tuple(conn.exec_driver_sql(_SQL_FINGERPRINT).one())
            same = self._same_database[key] = theirs == self._fingerprint
            if not same:
                log.info("jobs: sessions of %s are on another database; enqueue with them"
                         " is not transactional", conn.engine.url)
        if not same:
            return None
        driver = conn.connection.driver_connection
        return driver  # type: ignore[no-any-return]

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
        """See :meth:`dicomnode.jobs.base.JobQueue.enqueue` and the module docstring.

        Raises
        ------
        JobError
            ``task`` is not registered, or the job cannot be stored.
        """
        spec = self.registry[task]
        app, pool = self._open()
        try:
            caller = self._caller_connection(session) if session is not None else None
            if caller is not None:
                return self._defer(app, caller, spec, args, dedup_key, delay_s, lock)
            with pool.connection() as conn:
                return self._defer(app, conn, spec, args, dedup_key, delay_s, lock)
        except (self._psycopg.Error, self._procrastinate.exceptions.ProcrastinateException) as exc:
            raise JobError(
                f"cannot enqueue task {task!r}: {exc.__class__.__name__}: {exc}"
            ) from exc

    def _defer(
        self,
        app: procrastinate.App,
        conn: psycopg.Connection[Any],
        spec: TaskSpec,
        args: Mapping[str, Any],
        dedup_key: str | None,
        delay_s: float,
        lock: str | None,
    ) -> int | None:
        deferrer = app.configure_task(
            spec.name, allow_unknown=True, queue=spec.queue, lock=lock,
            queueing_lock=dedup_key, schedule_in={"seconds": delay_s} if delay_s > 0 else None,
            connection=conn,
        )
        job_id: int | None = None
        try:
            # A savepoint inside the caller's transaction, a transaction on our own connection:
            # a refused job leaves the caller's transaction usable.
            with conn.transaction():
                job_id = deferrer.defer(**args)
                if dedup_key is not None:
                    if conn.execute(_SQL_DEDUP, (dedup_key, job_id)).fetchone() is None:
                        job_id = None
                        raise self._psycopg.Rollback()
        except self._procrastinate.exceptions.AlreadyEnqueued:
            return None  # a waiting job holds the key (its dedup row was removed by hand)
        return job_id

    # -- worker side ---------------------------------------------------------------------

    def _runner(self, spec: TaskSpec) -> Callable[..., None]:
        def run(context: JobContext, **kwargs: Any) -> None:
            job = context.job
            try:
                spec.fn(self._ctx, **kwargs)
            except Exception as exc:
                text = describe_error(exc)
                self._record_error(job.id, job.attempts + 1, text)
                if job.attempts + 1 >= spec.retry.max_attempts:
                    call_dead_letter_hook(spec, self._ctx, kwargs, text, log)
                # procrastinate logs what it catches, traceback included; a third-party
                # message may quote a dataset value, so it gets the safe text only.
                raise _TaskFailed(text) from None
            if job.attempts:
                self._record_error(job.id, None, None)

        run.__name__ = run.__qualname__ = spec.name
        return run

    def _record_error(self, job_id: int | None, attempt: int | None, text: str | None) -> None:
        try:
            _, pool = self._open()
            with pool.connection() as conn:
                if text is None:
                    conn.execute("DELETE FROM dicomnode_job_error WHERE job_id = %s", (job_id,))
                else:
                    conn.execute(_SQL_ERROR, (job_id, attempt, text))
        except Exception:  # bookkeeping only: the job's own outcome must still be recorded
            log.exception("jobs: cannot record the outcome of job %s", job_id)

    async def _retry_stalled_jobs(self, context: JobContext, timestamp: int) -> None:
        jm = context.app.job_manager
        failed = self._procrastinate.jobs.Status.FAILED
        for job in await jm.get_stalled_jobs(seconds_since_heartbeat=self.stalled_after_s):
            attempt = job.attempts + 1
            ours = job.task_name in self.registry
            last = ours and attempt >= self.registry[job.task_name].retry.max_attempts
            try:
                if ours:
                    await context.app.connector.execute_query_async(
                        _SQL_ERROR_NAMED, job_id=job.id, attempt=attempt, error=_WORKER_LOST
                    )
                if last:
                    await jm.finish_job(job, status=failed, delete_job=False)
                    call_dead_letter_hook(
                        self.registry[job.task_name], self._ctx, dict(job.task_kwargs or {}),
                        _WORKER_LOST, log,
                    )
                else:
                    await jm.retry_job(job)
            except self._procrastinate.exceptions.ConnectorException:
                # e.g. it finished after all, or a recovery on another node got there first
                log.warning("jobs: cannot recover stalled job %s", job.id, exc_info=True)
                continue
            log.warning("jobs: job %s %s lost its worker in attempt %d; %s", job.id,
                        job.task_name, attempt, "dead letter" if last else "it runs again")

    def _worker_app(self) -> procrastinate.App:
        pc = self._procrastinate
        app = pc.App(connector=pc.PsycopgConnector(
            conninfo=self._conninfo, min_size=1, max_size=len(self.workers) + 3,
            name="dicomnode-workers", timeout=self.connect_timeout_s,
        ))
        tasks: dict[str, Any] = {}
        for spec in self.registry:
            tasks[spec.name] = app.task(
                name=spec.name, queue=spec.queue, pass_context=True,
                retry=_retry_strategy(spec.retry),
            )(self._runner(spec))
        for p in self._periodic:
            # lock + queueing_lock: one run at a time, ticks coalesce (APScheduler's
            # max_instances=1, coalesce=True)
            key = f"periodic:{p.task}:{p.periodic_id}"
            app.periodic(cron=p.cron, periodic_id=p.periodic_id, task_kwargs=dict(p.args),
                         lock=key, queueing_lock=key)(tasks[p.task])
        if self.recover_stalled:
            stalled = app.task(
                name=_STALLED_TASK, queue=MAINTENANCE_QUEUE, pass_context=True,
                lock=_STALLED_TASK, queueing_lock=_STALLED_TASK,
            )(self._retry_stalled_jobs)
            app.periodic(cron=self.stalled_check_cron)(stalled)
        return app

    def _check_schema(self, pool: psycopg_pool.ConnectionPool) -> None:
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT to_regclass('procrastinate_jobs') IS NOT NULL"
                " AND to_regclass('dicomnode_job_dedup') IS NOT NULL"
                " AND to_regclass('dicomnode_job_error') IS NOT NULL"
            ).fetchone()
        if not (row and row[0]):
            raise JobError(
                "jobs: the job database has no procrastinate schema; apply it first"
                " (dicomnode.jobs.procrastinate_queue.apply_schema)"
            )

    def start(self, ctx: Any) -> None:
        """Start workers for the configured queues in a background thread.

        The thread runs one event loop with one procrastinate worker per queue;
        sync tasks run in a thread pool sized to the total concurrency.

        Raises
        ------
        JobError
            Already started, the database cannot be reached, or the schema is missing.
        """
        if self._thread is not None:
            raise JobError("jobs: the queue has already started")
        self.registry.frozen = True
        self._ctx = ctx
        self._stopping = False
        _, pool = self._open()
        try:
            self._check_schema(pool)
        except self._psycopg.Error as exc:
            raise JobError(f"jobs: cannot read the job database: {exc}") from exc
        queues = [(q, n) for q, n in sorted(self.workers.items()) if n > 0]
        if self.recover_stalled:
            queues.append((MAINTENANCE_QUEUE, 1))
        if not queues:
            return
        app = self._worker_app()
        self._ready.clear()
        self._start_error = None
        threads = sum(n for _, n in queues) + 2
        self._thread = threading.Thread(
            target=self._run_loop, args=(app, queues, threads), name="jobs-procrastinate",
            daemon=True,
        )
        self._thread.start()
        self._ready.wait(self.connect_timeout_s + 5)
        if self._start_error is not None or not self._ready.is_set():
            error = self._start_error
            self.stop(5)
            raise JobError(f"jobs: the workers could not start: {error}") from error

    def _run_loop(
        self, app: procrastinate.App, queues: list[tuple[str, int]], threads: int
    ) -> None:
        loop = asyncio.new_event_loop()
        # procrastinate runs sync tasks through the loop's default executor
        loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="job"))
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(app, queues))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except BaseException as exc:
            self._start_error = exc
            log.exception("jobs: the worker loop stopped")
        finally:
            self._ready.set()
            self._loop = None
            loop.close()

    async def _serve(self, app: procrastinate.App, queues: list[tuple[str, int]]) -> None:
        try:
            await app.open_async()
        except Exception as exc:
            self._start_error = exc
            return
        try:
            self._worker_tasks = [
                asyncio.create_task(self._supervise(app, q, n), name=f"worker {q}")
                for q, n in queues
            ]
            self._ready.set()
            await asyncio.gather(*self._worker_tasks, return_exceptions=True)
        finally:
            await app.close_async()

    async def _supervise(self, app: procrastinate.App, queue: str, concurrency: int) -> None:
        name = f"{socket.gethostname()}:{os.getpid()}:{queue}"
        while not self._stopping:
            try:
                await app.run_worker_async(
                    queues=[queue], concurrency=concurrency, name=name,
                    install_signal_handlers=False, listen_notify=True,
                    fetch_job_polling_interval=self.poll_interval_s,
                    update_heartbeat_interval=self.heartbeat_s,
                    stalled_worker_timeout=self.stalled_after_s, delete_jobs="never",
                )
            except Exception:
                log.exception("jobs: worker %s failed; restarting", name)
            if not self._stopping:
                # e.g. the database restarted: procrastinate stops a worker whose
                # heartbeat or listener fails; its jobs are recovered as stalled
                await asyncio.sleep(1.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; wait up to ``timeout_s`` for running ones; close connections.

        A sync task cannot be interrupted: one still running after ``timeout_s``
        finishes in its (daemon) thread, and if the process exits first, its job
        is recovered as stalled by another node.
        """
        self._stopping = True
        loop, thread = self._loop, self._thread
        if loop is not None:
            try:
                loop.call_soon_threadsafe(lambda: [t.cancel() for t in self._worker_tasks])
            except RuntimeError:
                pass  # the loop has just closed
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("jobs: workers still busy %.0f s after stop", timeout_s)
            else:
                self._thread = None
        self.close()

    # -- introspection -------------------------------------------------------------------

    def job(self, job_id: int) -> JobInfo | None:
        """The job ``job_id`` as it is now; None if there is no such job."""
        _, pool = self._open()
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT j.id, j.task_name, j.queue_name, j.status::text, j.attempts, e.error"
                " FROM procrastinate_jobs j LEFT JOIN dicomnode_job_error e ON e.job_id = j.id"
                " WHERE j.id = %s",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        id_, task, queue, status, attempts, error = row
        # procrastinate counts finished runs; the protocol counts started ones
        if status in ("doing", "aborting"):
            attempts += 1
        return JobInfo(id_, task, queue, _STATUS.get(status, status), attempts, error)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job of this process's queues is running or due within ``timeout_s``.

        Jobs of the maintenance queue are not counted. Returns False on timeout.
        """
        queues = [q for q, n in self.workers.items() if n > 0]
        _, pool = self._open()
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            with pool.connection() as conn:
                row = conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
                    " AND queue_name = ANY(%s) AND (scheduled_at IS NULL"
                    " OR scheduled_at <= now() + make_interval(secs => %s))",
                    (queues, max(0.0, remaining)),
                ).fetchone()
            if not (row and row[0]):
                return True
            if remaining <= 0:
                return False
            time.sleep(0.05)


def _check_cron(cron: str) -> None:
    import croniter  # a dependency of procrastinate

    if not croniter.croniter.is_valid(cron):
        raise JobError(f"jobs: invalid cron expression {cron!r}")

"""The job interface: tasks, their registry, and what a queue backend provides.

A task is a plain synchronous function ``fn(ctx, **args)``: ``ctx`` is whatever
the composition root passes to every task (the node's services), ``args`` are
JSON values, IDs only. Tasks are idempotent: every backend delivers at least
once (a crash between the work and the acknowledgement runs the job again).
A task that raises is retried with exponential backoff until its attempts are
used up; the job then stays ``failed`` with the error text (dead letter).

Jobs enqueued with the same ``lock`` (e.g. ``study:<id>``) never run at the
same time, on any queue or worker, and start in the order they were enqueued:
a job of a lock waits while an earlier job of that lock is running or waiting
(also while it waits for a retry); a dead-lettered job no longer holds the lock.

Backends: :class:`dicomnode.jobs.local.LocalQueue` (a table in the node's own
database, worker threads in the node process) and, for scale-out, procrastinate
on PostgreSQL behind the same :class:`JobQueue` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from dicomnode.errors import JobError

__all__ = [
    "DeadLetterHook",
    "JobInfo",
    "JobQueue",
    "RetryPolicy",
    "TaskRegistry",
    "TaskSpec",
    "backoff_delay",
    "call_dead_letter_hook",
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**(attempt-1)``, capped at ``max_s``."""

    max_attempts: int = 5
    base_s: float = 5.0
    max_s: float = 600.0


def backoff_delay(policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after ``attempt`` failed (1-based)."""
    return float(min(policy.max_s, policy.base_s * 2 ** max(0, attempt - 1)))


DeadLetterHook = Callable[[Any, Mapping[str, Any], str], None]
"""``hook(ctx, args, error)``: called once when a job of the task is dead-lettered, with
the job's arguments and its patient-safe error text (see ``describe_error``)."""


@dataclass(frozen=True)
class TaskSpec:
    """A registered task."""

    name: str
    fn: Callable[..., Any]
    queue: str
    retry: RetryPolicy
    on_dead: DeadLetterHook | None = None
    """Called when a job's attempts are used up (the dead letter), so that the work it
    belonged to can be marked as failed with the reason instead of staying "running"."""


class TaskRegistry:
    """Task name -> function, queue and retry policy. Frozen once a backend starts."""

    def __init__(self, default_retry: RetryPolicy | None = None) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self._default_retry = default_retry or RetryPolicy()
        self.frozen = False

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        queue: str = "default",
        retry: RetryPolicy | None = None,
        on_dead: DeadLetterHook | None = None,
    ) -> TaskSpec:
        """Register ``fn`` as task ``name`` on ``queue`` (``on_dead``: see :class:`TaskSpec`)."""
        if self.frozen:
            raise JobError(f"cannot register task {name!r}: the queue has started")
        if name in self._tasks:
            raise JobError(f"task {name!r} is already registered")
        spec = TaskSpec(name, fn, queue, retry or self._default_retry, on_dead)
        self._tasks[name] = spec
        return spec

    def __getitem__(self, name: str) -> TaskSpec:
        try:
            return self._tasks[name]
        except KeyError:
            raise JobError(f"unknown task {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._tasks.values())

    def queues(self) -> set[str]:
        """Queues that have at least one task."""
        return {t.queue for t in self._tasks.values()}


@dataclass(frozen=True)
class JobInfo:
    """One job as a backend reports it (for operators, tests and the dead-letter view).

    ``status`` is one of ``todo``, ``running``, ``done``, ``failed`` (attempts used
    up: dead letter) and, procrastinate only, ``cancelled`` (cancelled by an
    operator before it ran). ``attempts`` counts the runs started so far, the
    current one included. ``error`` is the last failure as ``"Type: message"``
    (None after a success).
    """

    id: int
    task: str
    queue: str
    status: str
    attempts: int
    error: str | None


class JobQueue(Protocol):
    """What every backend provides."""

    registry: TaskRegistry

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any],
        *,
        dedup_key: str | None = None,
        delay_s: float = 0.0,
        session: Session | None = None,
        lock: str | None = None,
    ) -> int | None:
        """Queue ``task(ctx, **args)``; return the job's ID, or None if ``dedup_key`` was used.

        With ``dedup_key``, at most one job ever exists per key: a second enqueue
        returns None and adds nothing, also after the first job has finished.
        With ``session``, the job is inserted in that session's transaction
        (committed or rolled back with it) where the backend can; otherwise in
        its own, at once (see the backend). With ``lock``, the job never runs
        while another job with the same lock runs (see the module docstring).

        Raises
        ------
        JobError
            ``task`` is not registered, or the job cannot be stored.
        """
        ...

    def start(self, ctx: Any) -> None:
        """Start workers that pass ``ctx`` to every task."""
        ...

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; wait for running ones up to ``timeout_s``."""
        ...

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job is running or due within ``timeout_s``; False on timeout."""
        ...

    def job(self, job_id: int) -> JobInfo | None:
        """The job ``job_id`` as it is now; None if there is no such job."""
        ...


def call_dead_letter_hook(
    spec: TaskSpec, ctx: Any, args: Mapping[str, Any], error: str, log: Any
) -> None:
    """Run ``spec.on_dead`` if it has one; a failing hook is logged, never raised (the
    job's own outcome is already recorded)."""
    if spec.on_dead is None:
        return
    try:
        spec.on_dead(ctx, args, error)
    except Exception as exc:  # bookkeeping only
        log.error("dead-letter hook of %s failed: %s", spec.name, type(exc).__name__)

"""What the API needs from the node: stores over one database, and a way to enqueue jobs.

The API does not take the :class:`~dicomnode.app.Node` (``app`` sits above it): it
takes :class:`ApiServices`, built from a running node's task context
(:meth:`ApiServices.from_context`, jobs then wake the node's workers at once) or
over a database another process runs (:meth:`ApiServices.over`, jobs are picked
up at that node's next poll). It deliberately holds no vault: the API never
re-identifies anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import NodeSettings
from dicomnode.jobs.base import RetryPolicy, TaskRegistry
from dicomnode.jobs.local import LocalQueue
from dicomnode.storage.db import create_db_engine, session_factory
from dicomnode.storage.index import StudyIndex
from dicomnode.storage.ingest import Ingestor
from dicomnode.storage.labels import LabelStore
from dicomnode.storage.outbox import Outbox
from dicomnode.storage.registry import ModelRegistry
from dicomnode.storage.results import ResultStore
from dicomnode.storage.spool import FileStore

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["ApiServices", "Enqueue"]

Enqueue = Callable[..., Any]
"""``enqueue(task, args, *, dedup_key=None, delay_s=0.0)`` of a job queue."""


@dataclass(frozen=True)
class ApiServices:
    """The node's stores as the API uses them (one database, one data directory)."""

    settings: NodeSettings
    sessions: sessionmaker[Session]
    files: FileStore
    index: StudyIndex
    outbox: Outbox
    registry: ModelRegistry
    results: ResultStore
    labels: LabelStore
    enqueue: Enqueue
    """Where ``send_result`` jobs go when an operator retries an outbox item."""
    queue_sessions: sessionmaker[Session] | None = None
    """Sessions on procrastinate's database when ``jobs.url`` is another database than
    the node's; None: the queue's tables (if any) are in ``sessions``'."""
    ingestor: Ingestor | None = None
    """The node's ingest (STOW-RS stores through it); None where this process does not
    receive (STOW-RS then answers 503)."""
    ingest_gate: Callable[[], float | None] | None = None
    """Admission check before an HTTP ingest: seconds to wait (503 Retry-After), or None."""

    @classmethod
    def from_context(cls, ctx: TaskContext, sessions: sessionmaker[Session],
                     ingestor: Ingestor | None = None,
                     ingest_gate: Callable[[], float | None] | None = None) -> ApiServices:
        """The services of a running node (``node.ctx``, ``node.sessions``, and its
        ``node.ingestor`` for STOW-RS)."""
        return cls(settings=ctx.settings, sessions=sessions, files=ctx.files, index=ctx.index,
                   outbox=ctx.outbox, registry=ctx.registry,
                   results=ctx.results, labels=ctx.labels,
                   enqueue=ctx.queue.enqueue, queue_sessions=_queue_sessions(ctx.settings),
                   ingestor=ingestor, ingest_gate=ingest_gate)

    @classmethod
    def over(cls, settings: NodeSettings, sessions: sessionmaker[Session],
             enqueue: Enqueue | None = None) -> ApiServices:
        """Services over a node's database and data directory, without its workers.

        Jobs go through ``enqueue`` (the configured backend's, from the CLI); by default
        to the embedded job table, run by the node that owns the workers.
        """
        data_dir = settings.data_dir.resolve()
        files = FileStore(data_dir, fsync=settings.storage.fsync,
                          spares=settings.storage.spare_files)
        if enqueue is None:
            tasks = TaskRegistry()
            # Only the name and queue matter to an enqueue-only queue.
            tasks.register("send_result", lambda ctx, **kw: None, queue="send",
                           retry=RetryPolicy(max_attempts=1))
            tasks.register("study_complete", lambda ctx, **kw: None, queue="default")
            enqueue = LocalQueue(sessions, tasks, workers={}).enqueue
        return cls(settings=settings, sessions=sessions, files=files,
                   index=StudyIndex(sessions), outbox=Outbox(sessions),
                   registry=ModelRegistry(sessions, data_dir, validator=_validator(settings)),
                   results=ResultStore(sessions, files), labels=LabelStore(sessions, files),
                   enqueue=enqueue, queue_sessions=_queue_sessions(settings))


def _validator(settings: NodeSettings) -> Any:
    """Golden cases at activation, as the node runs them (``inference.golden``)."""
    from dicomnode.inference.golden import golden_validator
    from dicomnode.inference.runtime import RuntimeOptions

    inf = settings.inference
    providers = inf.providers if isinstance(inf.providers, str) else tuple(inf.providers)
    return golden_validator(
        RuntimeOptions(providers=providers, intra_op_threads=inf.intra_op_threads,
                       inter_op_threads=inf.inter_op_threads), inf.memory_budget_mb)


def _queue_sessions(settings: NodeSettings) -> sessionmaker[Session] | None:
    """Sessions on the procrastinate queue's own database, when it has one."""
    jobs = settings.jobs
    if jobs.backend != "procrastinate" or jobs.url in (None, settings.database_url):
        return None
    assert jobs.url is not None
    return session_factory(create_db_engine(jobs.url))

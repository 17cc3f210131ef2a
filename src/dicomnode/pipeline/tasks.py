"""Task functions run by the job queue, the context they receive, and the task table.

Every task takes the :class:`TaskContext` and IDs only, is idempotent, and knows
nothing of the backend that runs it (see ``dicomnode.jobs.base``). :data:`TASKS`
names each task, its queue, its function and its failure policy in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dicomnode.config import NodeSettings
from dicomnode.dicom.deid import Deidentifier
from dicomnode.inference import ModelSessions
from dicomnode.jobs.base import JobQueue, RetryPolicy, TaskRegistry
from dicomnode.pipeline.deid import deidentify_instance, deidentify_study
from dicomnode.pipeline.delivery import send_result
from dicomnode.pipeline.infer import infer
from dicomnode.pipeline.learning import ingest_label, is_label, retrain_periodic, retrain_task
from dicomnode.pipeline.outcome import job_dead
from dicomnode.pipeline.results import encode_results
from dicomnode.storage.index import StudyIndex
from dicomnode.storage.labels import LabelStore
from dicomnode.storage.outbox import Outbox
from dicomnode.storage.registry import ModelRegistry
from dicomnode.storage.results import ResultStore
from dicomnode.storage.spool import FileStore
from dicomnode.storage.vault import Vault

__all__ = [
    "TASKS",
    "CompletionHook",
    "PipelineTask",
    "ResultHook",
    "TaskContext",
    "enqueue_encoding",
    "enqueue_label",
    "register_tasks",
    "study_complete",
]

log = logging.getLogger(__name__)

CompletionHook = Callable[["TaskContext", int, int], None]
"""``hook(ctx, study_id, version)``: runs once a study version has settled (at least once)."""
ResultHook = Callable[["TaskContext", int], None]
"""``hook(ctx, result_id)``: runs after a model's result was recorded."""


@dataclass
class TaskContext:
    """The node's services, as every task sees them: every part is there (the app builds
    them all, whatever the process's role), so no task checks for a missing one."""

    settings: NodeSettings
    index: StudyIndex
    files: FileStore
    queue: JobQueue
    deidentifier: Deidentifier
    vault: Vault
    registry: ModelRegistry
    models: ModelSessions
    results: ResultStore
    outbox: Outbox
    labels: LabelStore
    completion_hooks: list[CompletionHook] = field(default_factory=list)
    result_hooks: list[ResultHook] = field(default_factory=list)
    deid_hooks: list[ResultHook] = field(default_factory=list)
    """``hook(ctx, instance_id)`` after an instance was de-identified (not quarantined)."""


def study_complete(ctx: TaskContext, study_id: int, version: int) -> None:
    """Run the completion hooks for one settled study version, then record it.

    A hook that raises makes the job retry (all hooks run again: they are
    idempotent). A version that a later instance superseded still runs its
    hooks; hooks that do expensive work check ``study.version`` first.
    """
    for hook in ctx.completion_hooks:
        hook(ctx, study_id, version)
    ctx.index.mark_hooked(study_id, version)
    log.info("study %d version %d complete", study_id, version)


@dataclass(frozen=True)
class PipelineTask:
    """One row of the task table."""

    name: str
    queue: str
    function: Callable[..., Any]
    retry: RetryPolicy | None = None
    """None: the queue's default policy (``[jobs]``)."""
    records_failure: bool = False
    """A dead letter is recorded on the study (``pipeline.outcome.job_dead``), so it ends
    ``failed`` with the reason."""


_ONCE = RetryPolicy(max_attempts=1)

TASKS: tuple[PipelineTask, ...] = (
    PipelineTask("study_complete", "default", study_complete, records_failure=True),
    PipelineTask("deidentify_instance", "ingest", deidentify_instance),
    PipelineTask("deidentify_study", "ingest", deidentify_study, records_failure=True),
    PipelineTask("infer", "gpu", infer, records_failure=True),
    PipelineTask("encode_results", "cpu", encode_results, records_failure=True),
    # send_result keeps its own retry schedule on the outbox row: one attempt per job
    PipelineTask("send_result", "send", send_result, retry=_ONCE),
    PipelineTask("ingest_label", "cpu", ingest_label),
    # a failed training run is recorded, not retried (minutes of CPU each time)
    PipelineTask("retrain", "train", retrain_task, retry=_ONCE),
    PipelineTask("retrain_periodic", "train", retrain_periodic, retry=_ONCE),
)
"""Every pipeline task: name, queue, function, retry policy, dead-letter recording."""


def register_tasks(registry: TaskRegistry) -> None:
    """Register the pipeline's tasks (:data:`TASKS`) on their queues."""
    for t in TASKS:
        registry.register(
            t.name, t.function, queue=t.queue, retry=t.retry,
            on_dead=partial(job_dead, t.name) if t.records_failure else None,
        )


def enqueue_label(ctx: TaskContext, instance_id: int) -> None:
    """De-identification hook: an annotator's SEG becomes a label."""
    inst = ctx.index.instance(instance_id)
    if inst is not None and is_label(ctx, inst.sop_class_uid, inst.calling_ae):
        ctx.queue.enqueue("ingest_label", {"instance_id": instance_id})


def enqueue_encoding(ctx: TaskContext, result_id: int) -> None:
    """Result hook: build SEG/SR for a new result."""
    ctx.queue.enqueue("encode_results", {"result_id": result_id})

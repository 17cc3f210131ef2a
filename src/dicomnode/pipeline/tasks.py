"""Task functions run by the job queue, and the context they receive.

Every task takes the :class:`TaskContext` and IDs only, is idempotent, and knows
nothing of the backend that runs it (see ``dicomnode.jobs.base``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

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
    "CompletionHook",
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
    """The node's services, as every task sees them."""

    settings: NodeSettings
    index: StudyIndex
    files: FileStore
    queue: JobQueue
    deidentifier: Deidentifier | None = None
    vault: Vault | None = None
    registry: ModelRegistry | None = None
    models: ModelSessions | None = None
    results: ResultStore | None = None
    outbox: Outbox | None = None
    labels: LabelStore | None = None
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


def register_tasks(registry: TaskRegistry) -> None:
    """Register the pipeline's tasks on their queues.

    The tasks that carry a study's processing record their dead letter on the study
    (``pipeline.outcome.job_dead``), so it ends ``failed`` with the reason.
    """
    registry.register(
        "study_complete", study_complete, queue="default",
        on_dead=partial(job_dead, "study_complete"),
    )
    registry.register("deidentify_instance", deidentify_instance, queue="ingest")
    registry.register(
        "deidentify_study", deidentify_study, queue="ingest",
        on_dead=partial(job_dead, "deidentify_study"),
    )
    registry.register("infer", infer, queue="gpu", on_dead=partial(job_dead, "infer"))
    registry.register(
        "encode_results", encode_results, queue="cpu", on_dead=partial(job_dead, "encode_results")
    )
    # send_result keeps its own retry schedule on the outbox row: one attempt per job
    registry.register("send_result", send_result, queue="send", retry=RetryPolicy(max_attempts=1))
    registry.register("ingest_label", ingest_label, queue="cpu")
    # a failed training run is recorded, not retried (minutes of CPU each time)
    registry.register("retrain", retrain_task, queue="train", retry=RetryPolicy(max_attempts=1))
    registry.register(
        "retrain_periodic", retrain_periodic, queue="train", retry=RetryPolicy(max_attempts=1)
    )


def enqueue_label(ctx: TaskContext, instance_id: int) -> None:
    """De-identification hook: an annotator's SEG becomes a label."""
    inst = ctx.index.instance(instance_id)
    if inst is not None and is_label(ctx, inst.sop_class_uid, inst.calling_ae):
        ctx.queue.enqueue("ingest_label", {"instance_id": instance_id})


def enqueue_encoding(ctx: TaskContext, result_id: int) -> None:
    """Result hook: build SEG/SR for a new result."""
    ctx.queue.enqueue("encode_results", {"result_id": result_id})

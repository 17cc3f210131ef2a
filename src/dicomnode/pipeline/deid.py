"""De-identification tasks and the sweep that schedules them.

The C-STORE handler only stores; every stored instance carries its de-identification
deadline (``instance.deid_due_at`` = receipt + ``deid.max_delay_s``). The sweep
(:func:`sweep_deid`, every ``deid.sweep_interval_s`` in the completion loop) schedules a
``deidentify_study`` job for each study with identified instances at the earlier of

- the study having paused for ``deid.settle_s`` (so de-identification does not compete
  with a burst of C-STOREs for the same CPU and GIL), and
- its earliest instance deadline,

as soon as that moment falls within the next sweep interval, with the job delayed to
that moment. Nothing depends on which second an instance arrived in: however a burst
ends, every instance is de-identified by its deadline (plus the queue's pick-up time),
also with a quiet period far longer than ``max_delay_s``, and also after a restart.

``deidentify_instance`` turns the identified spool file into its de-identified copy
under ``archive/`` (or ``quarantine/``), writes the UID map and the study identity to
the encrypted vault in the same transaction as the index update, and deletes the spool
file (unless ``deid.spool_retention_s`` keeps it for a while). After that, nothing
outside the vault identifies the patient.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from dicomnode import metrics
from dicomnode.audit import audit
from dicomnode.dicom.deid import deidentify_bytes
from dicomnode.errors import DeidentificationError, StorageError

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["deidentify_instance", "deidentify_pending", "deidentify_study", "sweep_deid"]

log = logging.getLogger(__name__)


NOT_MINE = "not_mine"
"""What :func:`deidentify_instance` returns for an instance no longer ``received``."""


def deidentify_instance(ctx: TaskContext, instance_id: int) -> str:
    """De-identify one received instance; idempotent. Returns its new state, or
    :data:`NOT_MINE` when it was not ``received`` (gone, or handled by another run).

    An instance that cannot be de-identified safely (unreadable, no Patient ID) is
    marked ``failed`` with the reason and its spool file kept for an operator; an
    instance at risk of burned-in identity is ``quarantined`` under the pixel policy.

    Raises
    ------
    StorageError
        Files or database unavailable (the job is retried).
    """
    inst = ctx.index.instance(instance_id)
    if inst is None or inst.state != "received":
        # done by the other path (the completion hook and a deadline job can hold the
        # same pending list): not this run's work, so not counted in its audit line
        return NOT_MINE
    spool_path = inst.path
    t0 = time.perf_counter()
    raw = ctx.files.read(spool_path)
    digest = ctx.deidentifier.pseudonymizer.content_digest(raw[inst.dataset_offset :])
    try:
        out = deidentify_bytes(raw, ctx.deidentifier)
    except DeidentificationError as exc:
        with ctx.index.engine.begin() as c:
            ctx.index.finish_deid(
                c,
                instance_id,
                from_path=spool_path,
                state="failed",
                path=spool_path,
                digest=digest,
                patient_key=None,
                keep_spool=True,
                error=str(exc),
            )
        log.warning("instance %d cannot be de-identified: %s", instance_id, exc)
        return "failed"
    result = out.result
    study_key = result.study_instance_uid
    if study_key != ctx.index.study_key_of(instance_id):
        # The index keys studies by the same keyed pseudonym; a mismatch is a bug.
        raise DeidentificationError(f"instance {instance_id}: study pseudonym mismatch")
    quarantined = result.quarantine and ctx.settings.deid.quarantine_risky
    area = "quarantine" if quarantined else "archive"
    path = (
        f"{area}/{study_key}/{result.series_instance_uid}/"
        f"{result.sop_instance_uid}.{uuid.uuid4().hex[:8]}.dcm"
    )
    ctx.files.write(path, out.data)
    keep = ctx.settings.deid.spool_retention_s > 0
    reason = ",".join(f.value for f in result.flags) or None
    with ctx.index.durable_transaction() as c:
        ctx.vault.put(c, result.uid_map, result.identity, study_key)
        done = ctx.index.finish_deid(
            c,
            instance_id,
            from_path=spool_path,
            state="quarantined" if quarantined else "deidentified",
            path=path,
            digest=digest,
            patient_key=result.identity.patient_pseudonym,
            keep_spool=keep,
            error=f"quarantined: {reason}" if quarantined else None,
        )
    metrics.STAGE_SECONDS.labels("deidentify").observe(time.perf_counter() - t0)
    if not done:  # replaced while we worked: its own job handles the new file
        ctx.files.delete(path)
        return "superseded"
    if not keep:
        try:
            ctx.files.delete(spool_path)
        except StorageError:
            log.warning("could not delete spool file of instance %d", instance_id)
    if quarantined:
        log.warning("instance %d quarantined (%s)", instance_id, reason)
        return "quarantined"
    for hook in ctx.deid_hooks:
        hook(ctx, instance_id)
    return "deidentified"


def deidentify_pending(ctx: TaskContext, study_id: int, version: int) -> None:
    """Completion hook: de-identify whatever of the study is still identified, inline.

    Normally the per-instance jobs are done by the time a study settles; this makes
    the study's de-identified copy complete before anything downstream runs.
    """
    states = [
        deidentify_instance(ctx, instance_id)
        for instance_id in ctx.index.instances_in_state("received", study_id)
    ]
    _audit_study(ctx, study_id, states)


def deidentify_study(ctx: TaskContext, study_id: int) -> int:
    """De-identify the study's received instances once it has paused; return how many.

    While the study received an instance within ``deid.settle_s`` and no pending
    instance has reached its deadline, do nothing: the sweep schedules another job.
    """
    study = ctx.index.study(study_id)
    if study is None:
        return 0
    pending = ctx.index.instances_in_state("received", study_id)
    if not pending:
        return 0
    now = time.time()
    if now - study.last_received_at < ctx.settings.deid.settle_s and not _deadline_reached(
        ctx, study_id, now
    ):
        return 0
    _audit_study(ctx, study_id, [deidentify_instance(ctx, i) for i in pending])
    return len(pending)


def _deadline_reached(ctx: TaskContext, study_id: int, now: float) -> bool:
    due = ctx.index.deid_deadline(study_id)
    return due is not None and due <= now + _EARLY_S


_EARLY_S = 0.005
"""A job scheduled for a deadline may start this much before it (clock granularity)."""


def sweep_deid(ctx: TaskContext, now: float | None = None) -> int:
    """Schedule de-identification for studies due within the next sweep interval.

    A study is due at the earlier of its last arrival + ``deid.settle_s`` and its
    earliest instance deadline. Its job is delayed to that moment and keyed by it, so
    a sweep that runs again before the job does adds nothing. Returns how many jobs
    were scheduled.
    """
    d = ctx.settings.deid
    now = time.time() if now is None else now
    n = 0
    for study_id, deadline, last_received in ctx.index.pending_deid():
        due = min(deadline, last_received + d.settle_s)
        if due > now + d.sweep_interval_s:
            continue
        job = ctx.queue.enqueue(
            "deidentify_study",
            {"study_id": study_id},
            dedup_key=f"deid:{study_id}:{int(due * 1000)}",
            delay_s=max(0.0, due - now),
        )
        n += job is not None
    return n


def _audit_study(ctx: TaskContext, study_id: int, states: list[str]) -> None:
    """One audit line per study and run (not per instance), as ATNA aggregates."""
    states = [s for s in states if s != NOT_MINE]
    if not states:
        return
    study = ctx.index.study(study_id)
    counts = {s: states.count(s) for s in sorted(set(states))}
    clean = counts.get("deidentified", 0) + counts.get("superseded", 0) == len(states)
    audit(
        "deidentified",
        study_key=study.study_key if study else None,
        patient_key=study.patient_key if study else None,
        lifecycle=7,
        outcome=0 if clean else 4,
        instances=counts,
        outcome_description=None if clean else "some instances quarantined or failed",
    )

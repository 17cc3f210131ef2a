"""Every accepted study ends in a terminal outcome with a reason.

The pipeline's steps each record what they did (routing decision, one inference
result per model, outbox rows per result object, dead-lettered jobs). :func:`settle`
reads those facts for the study's current version and pipeline run and records the
study's :class:`~dicomnode.storage.models.StudyOutcome`; every step calls it when it
finishes, and so does the dead-letter hook (:func:`job_dead`), so that a job whose
attempts ran out leaves the study ``failed`` with the job's patient-safe error instead
of looking "running" forever.

Outcome of one model on the study:

==================  ==========================================================
processing          no result yet, or results not yet encoded or delivered
refused             the model could not run on the series (the node's own reason)
failed              a job of this model died, a result could not be encoded, or
                    delivery was dead-lettered
results_held        results made, but a destination has no address (unroutable),
                    or no destination is configured
results_sent        every result object reached every destination, and the
                    worklist notification (if one is due) was acknowledged
==================  ==========================================================

Once every model's results are sent, the worklist notification stage runs
(:mod:`dicomnode.pipeline.notify`): an ``hl7`` destination gets one ORU^R01 for
the study version; the study stays ``processing`` until it is acknowledged, and
ends ``failed`` when it is dead-lettered.

The study's outcome is ``processing`` while any routed model is; else ``failed``
if any model failed, else ``results_sent`` if any model's results were delivered,
else ``results_held``, else ``refused``; ``not_applicable`` when no rule chose a
model. The reason names each model with its own outcome when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dicomnode.pipeline.notify import ensure_notifications
from dicomnode.storage.models import StudyOutcome, StudyState

if TYPE_CHECKING:
    from dicomnode.pipeline.tasks import TaskContext

__all__ = ["job_dead", "record_failure", "settle"]

log = logging.getLogger(__name__)

_PRECEDENCE = (
    StudyOutcome.FAILED,
    StudyOutcome.RESULTS_SENT,
    StudyOutcome.RESULTS_HELD,
    StudyOutcome.REFUSED,
)
_MAX_REASON = 2000


def _model_outcome(ctx: TaskContext, study_id: int, version: int, model: str,
                   failures: Mapping[str, str], encoded: Mapping[str, Any],
                   run: int) -> tuple[str, str | None]:
    if model in failures:
        return StudyOutcome.FAILED, failures[model]
    result = next(
        (r for r in ctx.results.for_study(study_id)
         if r.study_version == version and r.model_name == model),
        None,
    )
    if result is None:
        return StudyOutcome.PROCESSING, None
    if result.status == "failed":
        return StudyOutcome.REFUSED, result.error
    enc = encoded.get(model)
    if not enc or enc.get("version") != version or enc.get("run") != run:
        return StudyOutcome.PROCESSING, None
    if not enc.get("destinations"):
        return StudyOutcome.RESULTS_HELD, "no result destination is configured"
    items = ctx.outbox.for_result(result.id)
    if not items and enc.get("image_destinations") == []:
        # only notification destinations: nothing to deliver here (the study's
        # notification stage decides)
        return StudyOutcome.RESULTS_SENT, None
    if not items:
        return StudyOutcome.PROCESSING, None
    statuses = {i.status for i in items}
    if "pending" in statuses:
        return StudyOutcome.PROCESSING, None
    dead = [i for i in items if i.status == "dead"]
    if dead:
        return StudyOutcome.FAILED, (
            f"delivery of {dead[0].kind} to {dead[0].destination} failed: {dead[0].last_error}"
        )
    unroutable = [i for i in items if i.status == "unroutable"]
    if unroutable:
        names = sorted({i.destination for i in unroutable})
        return StudyOutcome.RESULTS_HELD, f"no address for destination {', '.join(names)}"
    dropped = [i for i in items if i.status == "dropped"]
    if dropped and len(dropped) == len(items):
        return StudyOutcome.RESULTS_HELD, "every result delivery was dropped by an operator"
    kinds = sorted({i.kind for i in items if i.status in ("sent", "confirmed")})
    dests = sorted({i.destination for i in items if i.status in ("sent", "confirmed")})
    return StudyOutcome.RESULTS_SENT, f"{'+'.join(kinds)} sent to {', '.join(dests)}"


def _notification_stage(ctx: TaskContext, study: Any, destinations: list[str],
                        reason: str | None) -> tuple[str, str | None]:
    """Every SEG/SR is delivered: the worklist notification is due (pipeline.notify).

    The study is ``results_sent`` once the notifications are sent too; it stays
    ``processing`` while one is pending and ends ``failed`` if one is dead-lettered.
    """
    items = ensure_notifications(ctx, study, destinations)
    delivered_images = [
        i for i in ctx.outbox.list(study_id=study.id)
        if i.study_version == study.version and i.kind != "notification"
        and i.status in ("sent", "confirmed")
    ]
    if not items:
        if not delivered_images:
            return StudyOutcome.RESULTS_HELD, (
                "no destination takes SEG or SR, and no notification is due "
                "(negative study, notify_negative off)")
        return StudyOutcome.RESULTS_SENT, reason
    items = [ctx.outbox.get(i.id) or i for i in items]  # current status
    statuses = {i.status for i in items}
    if "pending" in statuses:
        return StudyOutcome.PROCESSING, None
    dead = [i for i in items if i.status == "dead"]
    if dead:
        return StudyOutcome.FAILED, (
            f"worklist notification to {dead[0].destination} failed: {dead[0].last_error}")
    unroutable = sorted(i.destination for i in items if i.status == "unroutable")
    if unroutable:
        return StudyOutcome.RESULTS_HELD, f"no address for destination {', '.join(unroutable)}"
    sent = sorted(i.destination for i in items if i.status in ("sent", "confirmed"))
    if not sent:
        return StudyOutcome.RESULTS_SENT, reason
    note = f"notification sent to {', '.join(sent)}"
    return StudyOutcome.RESULTS_SENT, f"{reason}; {note}" if reason else note


def settle(ctx: TaskContext, study_id: int) -> str | None:
    """Compute the study's outcome from what the pipeline recorded, and store it.

    Idempotent and cheap (a few indexed reads); safe to call from any step. Returns
    the outcome recorded, or None when the study is not complete (still receiving,
    or gone).
    """
    study = ctx.index.study(study_id)
    if study is None or study.state != StudyState.COMPLETE:
        return None
    version, run = study.version, study.run or 1
    info = study.info or {}
    failures: dict[str, str] = {
        k: v for k, v in (info.get("failures") or {}).items()
        if isinstance(v, str)
    }
    routing = info.get("routing") or {}
    if "pipeline" in failures:
        outcome, reason = StudyOutcome.FAILED, failures["pipeline"]
    elif routing.get("version") != version or routing.get("run", 1) != run:
        outcome, reason = StudyOutcome.PROCESSING, None
    elif not routing.get("applicable"):
        outcome = StudyOutcome.NOT_APPLICABLE
        reason = routing.get("note") or "; ".join(
            f"{s.get('rule')}: {s.get('reason')}" for s in routing.get("skipped", [])
        ) or "no routing rule is configured"
    else:
        encoded = info.get("encoded") or {}
        per_model: dict[str, tuple[str, str | None]] = {}
        for route in routing.get("routes", []):
            model = str(route.get("model"))
            per_model[model] = _model_outcome(
                ctx, study_id, version, model, failures, encoded, run
            )
        if not per_model or any(o == StudyOutcome.PROCESSING for o, _ in per_model.values()):
            outcome, reason = StudyOutcome.PROCESSING, None
        else:
            outcome = next(
                o for o in _PRECEDENCE if any(m == o for m, _ in per_model.values())
            )
            if len(per_model) == 1:
                reason = next(iter(per_model.values()))[1]
            else:
                reason = "; ".join(
                    f"{m}: {o}" + (f" ({why})" if why else "")
                    for m, (o, why) in sorted(per_model.items())
                )
            if outcome == StudyOutcome.RESULTS_SENT:
                dests = sorted({d for m in per_model
                                for d in (encoded.get(m) or {}).get("destinations", [])})
                outcome, reason = _notification_stage(ctx, study, dests, reason)
    if reason is not None and len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    if study.outcome != outcome or study.outcome_reason != reason:
        if ctx.index.set_outcome(study_id, version, outcome, reason, run=run):
            if outcome in StudyOutcome.TERMINAL:
                log.info("study %d version %d: %s (%s)", study_id, version, outcome, reason)
    return outcome


def record_failure(ctx: TaskContext, study_id: int, stage: str, error: str) -> None:
    """Record that ``stage`` (a model name, or "pipeline") failed for the study's current
    run, then settle the study. ``error`` must be patient-safe (see ``describe_error``)."""
    if ctx.index.study(study_id) is None:
        return
    ctx.index.update_info_item(study_id, "failures", stage, error)
    settle(ctx, study_id)


def job_dead(task: str, ctx: TaskContext, args: Mapping[str, Any], error: str) -> None:
    """Dead-letter hook: a job of ``task`` used up its attempts.

    Maps the job's arguments to the study (and model) it worked for and records the
    failure there. Jobs of an earlier version or run change nothing (``settle`` reads
    the current one; the failure is kept per stage until an operator retry clears it).
    """
    study_id: int | None = None
    stage = "pipeline"
    if "study_id" in args:
        study_id = int(args["study_id"])
        if task == "infer":
            stage = str(args.get("model", "pipeline"))
            study = ctx.index.study(study_id)
            if study is not None and (
                study.version != args.get("version") or (study.run or 1) != args.get("run", 1)
            ):
                return  # an earlier version's or run's job: its study has moved on
    elif "result_id" in args:
        result = ctx.results.get(int(args["result_id"]))
        if result is None:
            return
        study_id, stage = result.study_id, result.model_name
    if study_id is None:
        return
    record_failure(ctx, study_id, stage, f"{task} failed: {error}")

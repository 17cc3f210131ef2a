"""Read models for the API and the dashboard: database rows -> response models.

Every function reads in short sessions of its own and returns frozen models; the
JSON routes and the HTML pages render the same objects. Pipeline step states
are derived from the rows the pipeline writes (study, instance, inference result,
outbox), never stored twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.api.schemas import (
    CheckOut,
    ClassificationOut,
    DriftPoint,
    FindingOut,
    JobList,
    JobOut,
    ModelOut,
    ModelsOut,
    ModelVersionOut,
    OutboxItemOut,
    OutboxList,
    QuarantineItem,
    QuarantineList,
    QueueDepth,
    QueuesOut,
    ReadinessOut,
    ResultOut,
    StepOut,
    StudyDetail,
    StudyError,
    StudyList,
    StudySummaryOut,
    TrainingRunList,
    TrainingRunOut,
)
from dicomnode.api.services import ApiServices
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.storage import tally
from dicomnode.storage.models import (
    DriftRecord,
    InferenceResult,
    Instance,
    Job,
    ModelVersion,
    OutboxItem,
    Series,
    Study,
    TrainingRun,
)

__all__ = [
    "jobs", "models", "outbox", "outbox_item", "quarantine", "queues", "readiness",
    "studies", "study_detail", "training_runs",
]


# -- studies --------------------------------------------------------------------------------


def _seconds(a: float | None, b: float | None) -> float | None:
    return round(b - a, 3) if a is not None and b is not None else None


def _num_timings(timings: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (timings or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _steps(st: Study, inst: dict[str, int], deid_done_at: float | None,
           results: Sequence[InferenceResult], items: Sequence[OutboxItem]) -> list[StepOut]:
    """The seven steps of the study's current version, from the rows the pipeline wrote."""
    v = st.version
    info = st.info or {}
    complete = st.state == "complete" and st.completed_version == v
    n = sum(inst.values())
    steps = [StepOut(
        name="receive", state="done" if complete else "running",
        started_at=st.version_started_at, finished_at=st.last_received_at,
        seconds=_seconds(st.version_started_at, st.last_received_at),
        detail=f"{n} instance(s) from {st.calling_ae or 'unknown AE'}",
    ), StepOut(
        name="complete", state="done" if complete else "pending",
        started_at=st.last_received_at if complete else None,
        finished_at=st.completed_at if complete else None,
        seconds=_seconds(st.last_received_at, st.completed_at) if complete else None,
        detail=st.completed_reason if complete else f"due {st.complete_after:.0f}",
    )]
    pending, failed = inst.get("received", 0), inst.get("failed", 0)
    deid_state = ("running" if pending else "failed" if failed else
                  "done" if inst.get("deidentified") else "skipped" if n else "pending")
    steps.append(StepOut(
        name="deidentify", state=deid_state,  # type: ignore[arg-type]
        started_at=st.first_received_at, finished_at=None if pending else deid_done_at,
        seconds=None if pending else _seconds(st.first_received_at, deid_done_at),
        detail=", ".join(f"{k} {c}" for k, c in sorted(inst.items())) or None,
    ))
    routing = info.get("routing") if (info.get("routing") or {}).get("version") == v else None
    if routing is None:
        steps.append(StepOut(name="route", state="pending"))
        routed = False
    elif not routing.get("applicable"):
        steps.append(StepOut(name="route", state="skipped",
                             detail=routing.get("note") or "no model applies"))
        routed = False
    else:
        routes = routing.get("routes") or []
        steps.append(StepOut(name="route", state="done", detail=", ".join(
            f"{r.get('model')} ({r.get('rule')})" for r in routes)))
        routed = True
    mine = [r for r in results if r.study_version == v]
    if not routed:
        steps.append(StepOut(name="infer", state="skipped" if routing else "pending"))
    elif not mine:
        steps.append(StepOut(name="infer", state="running"))
    else:
        bad = [r for r in mine if r.status == "failed"]
        secs = [_infer_seconds(r.timings) for r in mine if r.status == "done"]
        steps.append(StepOut(
            name="infer", state="failed" if bad else "done",
            finished_at=max(r.created_at for r in mine),
            seconds=round(sum(secs), 3) if secs else None,
            detail="; ".join(f"{r.model_name} {r.model_version}: "
                             f"{r.error if r.status == 'failed' else r.status}" for r in mine),
        ))
    enc = info.get("results") if (info.get("results") or {}).get("version") == v else None
    done_results = [r for r in mine if r.status == "done"]
    if enc is not None:
        steps.append(StepOut(name="encode", state="done", seconds=enc.get("encode_s"),
                             detail=", ".join(enc.get("objects") or []) or None))
    else:
        steps.append(StepOut(name="encode", state="running" if done_results else
                             "skipped" if routing is not None and not done_results and
                             (not routed or mine) else "pending"))
    sends = [i for i in items if i.study_version == v]
    if not sends:
        steps.append(StepOut(name="send", state="skipped" if steps[-1].state == "skipped"
                             else "pending"))
    else:
        counts: dict[str, int] = {}
        for i in sends:
            counts[i.status] = counts.get(i.status, 0) + 1
        state = ("failed" if counts.get("dead") or counts.get("unroutable") else
                 "running" if counts.get("pending") else "done")
        sent_at = [i.sent_at for i in sends if i.sent_at is not None]
        first = min(i.created_at for i in sends)
        steps.append(StepOut(
            name="send", state=state,  # type: ignore[arg-type]
            started_at=first, finished_at=max(sent_at) if sent_at and state == "done" else None,
            seconds=_seconds(first, max(sent_at)) if sent_at and state == "done" else None,
            detail=", ".join(f"{k} {c}" for k, c in sorted(counts.items())),
        ))
    return steps


def _infer_seconds(timings: dict[str, Any] | None) -> float:
    """Assembly plus the runtime's total (its parts are listed beside the total)."""
    t = _num_timings(timings)
    if "total_s" in t:
        return t.get("assembly_s", 0.0) + t["total_s"]
    return sum(t.values())


def _instance_states(s: Session, study_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for sid, state, n in s.execute(
            select(Instance.study_id, Instance.state, func.count())
            .where(Instance.study_id.in_(list(study_ids)))
            .group_by(Instance.study_id, Instance.state)).all():
        out.setdefault(sid, {})[state] = n
    return out


def _summaries(s: Session, rows: Sequence[Study]) -> list[StudySummaryOut]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    states = _instance_states(s, ids)
    series = dict(s.execute(select(Series.study_id, func.count()).where(
        Series.study_id.in_(ids)).group_by(Series.study_id)).all())
    mods: dict[int, set[str]] = {}
    for sid, mod in s.execute(select(Series.study_id, Series.modality)
                              .where(Series.study_id.in_(ids))).all():
        if mod:
            mods.setdefault(sid, set()).add(mod)
    deid_at = dict(s.execute(select(Instance.study_id, func.max(Instance.deidentified_at))
                             .where(Instance.study_id.in_(ids))
                             .group_by(Instance.study_id)).all())
    results: dict[int, list[InferenceResult]] = {}
    for r in s.execute(select(InferenceResult).where(InferenceResult.study_id.in_(ids))
                       .order_by(InferenceResult.id)).scalars():
        results.setdefault(r.study_id, []).append(r)
    items: dict[int, list[OutboxItem]] = {}
    for i in s.execute(select(OutboxItem).where(OutboxItem.study_id.in_(ids))
                       .order_by(OutboxItem.id)).scalars():
        items.setdefault(i.study_id, []).append(i)
    out = []
    for st in rows:
        inst = states.get(st.id, {})
        out.append(StudySummaryOut(
            id=st.id, study_key=st.study_key, patient_key=st.patient_key,
            state=st.state,  # type: ignore[arg-type]
            version=st.version, completed_version=st.completed_version,
            hooked_version=st.hooked_version, series=series.get(st.id, 0),
            instances=sum(inst.values()), modalities=sorted(mods.get(st.id, set())),
            calling_ae=st.calling_ae, first_received_at=st.first_received_at,
            last_received_at=st.last_received_at, completed_at=st.completed_at,
            completed_reason=st.completed_reason,
            outcome=st.outcome,  # type: ignore[arg-type]
            outcome_reason=st.outcome_reason, run=st.run or 1,
            steps=_steps(st, inst, deid_at.get(st.id), results.get(st.id, []),
                         items.get(st.id, [])),
        ))
    return out


def studies(svc: ApiServices, *, state: str | None = None, limit: int = 100,
            offset: int = 0, since: float | None = None) -> StudyList:
    """Studies, most recently received first (``ix_study_last_received``); ``total``
    counts every study (in ``state``), whatever ``since``."""
    q = select(Study)
    if state is not None:
        q = q.where(Study.state == state)
    if since is not None:
        q = q.where(Study.last_received_at >= since)
    with svc.sessions() as s:
        # The total from the trigger-kept tally: counting the study table grows with it.
        total = sum(n for (_k1, k2), n in tally.counts(s, "study").items()
                    if state is None or k2 == state)
        rows = list(s.execute(q.order_by(Study.last_received_at.desc(), Study.id.desc())
                              .limit(limit).offset(offset)).scalars())
        return StudyList(total=total, items=_summaries(s, rows))


def _finding(f: dict[str, Any]) -> FindingOut | None:
    try:
        return FindingOut(
            label=int(f["label"]), label_name=str(f["label_name"]), index=int(f["index"]),
            voxel_count=int(f["voxel_count"]), volume_mm3=float(f["volume_mm3"]),
            max_diameter_mm=float(f["max_diameter_mm"]),
            max_axial_diameter_mm=(float(f["max_axial_diameter_mm"])
                                   if f.get("max_axial_diameter_mm") is not None else None),
            mean_value=float(f["mean_value"]) if f.get("mean_value") is not None else None,
        )
    except (KeyError, TypeError, ValueError):
        return None  # a result written by another version of the node: shown without it


def _classification(f: dict[str, Any]) -> ClassificationOut | None:
    if f.get("kind") != "classification":
        return None
    try:
        return ClassificationOut(
            image=int(f["image"]), sop_key=str(f["sop_instance_uid"]), label=int(f["label"]),
            label_name=str(f["label_name"]), probability=float(f["probability"]),
            threshold=float(f["threshold"]), present=bool(f["present"]),
            explained=bool((f.get("explanation") or {}).get("map")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def result_out(r: InferenceResult) -> ResultOut:
    providers = (r.timings or {}).get("providers") or []
    return ResultOut(
        id=r.id, study_version=r.study_version, model_name=r.model_name,
        model_version=r.model_version, series_key=r.series_key,
        status=r.status,  # type: ignore[arg-type]
        findings=[f for f in (_finding(x) for x in (r.findings or [])) if f is not None],
        classifications=[c for c in (_classification(x) for x in (r.findings or []))
                         if c is not None],
        timings=_num_timings(r.timings), providers=[str(p) for p in providers],
        error=r.error, created_at=r.created_at,
    )


def _outbox_out(i: OutboxItem, study_key: str | None) -> OutboxItemOut:
    return OutboxItemOut(
        id=i.id, study_id=i.study_id, study_key=study_key, result_id=i.result_id,
        study_version=i.study_version, model_name=i.model_name, model_version=i.model_version,
        kind=i.kind, destination=i.destination,
        status=i.status,  # type: ignore[arg-type]
        attempts=i.attempts, next_attempt_at=i.next_attempt_at, last_error=i.last_error,
        created_at=i.created_at, sent_at=i.sent_at, supersedes_earlier=bool(i.supersedes),
        timings=_num_timings(i.timings),
    )


def _drift_point(d: DriftRecord) -> DriftPoint:
    dice = {str(k): float(v) for k, v in (d.dice or {}).items()}
    return DriftPoint(at=d.at, study_id=d.study_id, model_name=d.model_name,
                      model_version=d.model_version,
                      mean_dice=round(sum(dice.values()) / len(dice), 4) if dice else 1.0,
                      dice=dice)


def study_detail(svc: ApiServices, study_id: int) -> StudyDetail | None:
    """Everything the node knows about one study, or None."""
    with svc.sessions() as s:
        st = s.get(Study, study_id)
        if st is None:
            return None
        [summary] = _summaries(s, [st])
        results = list(s.execute(select(InferenceResult).where(
            InferenceResult.study_id == study_id).order_by(InferenceResult.id)).scalars())
        items = list(s.execute(select(OutboxItem).where(OutboxItem.study_id == study_id)
                               .order_by(OutboxItem.id)).scalars())
        bad = s.execute(select(Instance.id, Instance.state, Instance.error).where(
            Instance.study_id == study_id, Instance.error.is_not(None))
            .order_by(Instance.id).limit(50)).all()
        jobs_failed = s.execute(select(Job.id, Job.task, Job.last_error).where(
            Job.status == "failed",
            Job.args["study_id"].as_integer() == study_id).order_by(Job.id).limit(50)).all()
        drift = list(s.execute(select(DriftRecord).where(DriftRecord.study_id == study_id)
                               .order_by(DriftRecord.at)).scalars())
        instance_states = _instance_states(s, [study_id]).get(study_id, {})
    info = st.info or {}
    errors = [StudyError(source="instance", ref=f"instance {i} ({state})", message=err)
              for i, state, err in bad]
    for key, source in (("inference_error", "inference"), ("label_error", "label")):
        value = info.get(key)
        if isinstance(value, dict):
            errors += [StudyError(source=source, ref=str(k), message=str(v))
                       for k, v in value.items()]
        elif value:
            errors.append(StudyError(source=source, ref=source, message=str(value)))
    errors += [StudyError(source="result", ref=f"{r.model_name} {r.model_version}",
                          message=r.error) for r in results if r.error]
    errors += [StudyError(source="outbox", ref=f"outbox {i.id} ({i.status})",
                          message=i.last_error) for i in items if i.last_error]
    errors += [StudyError(source="job", ref=f"job {j} {task}", message=err or "failed")
               for j, task, err in jobs_failed]
    sent = [i.sent_at for i in items if i.study_version == st.version and i.sent_at]
    return StudyDetail(
        **summary.model_dump(),
        routing=info.get("routing"), results=[result_out(r) for r in results],
        outbox=[_outbox_out(i, st.study_key) for i in items], instance_states=instance_states,
        errors=errors, labels=info.get("labels"), drift=[_drift_point(d) for d in drift],
        turnaround_s=_seconds(st.last_received_at, max(sent)) if sent else None,
    )


# -- outbox ---------------------------------------------------------------------------------


def outbox(svc: ApiServices, *, status: str | None = None, study_id: int | None = None,
           limit: int = 200) -> OutboxList:
    """Outbox items, newest first, with the count per status over all items."""
    q = select(OutboxItem, Study.study_key).join(Study, Study.id == OutboxItem.study_id)
    if status is not None:
        q = q.where(OutboxItem.status == status)
    if study_id is not None:
        q = q.where(OutboxItem.study_id == study_id)
    with svc.sessions() as s:
        rows = s.execute(q.order_by(OutboxItem.id.desc()).limit(limit)).all()
        counts = dict(s.execute(select(OutboxItem.status, func.count())
                                .group_by(OutboxItem.status)).all())
    return OutboxList(items=[_outbox_out(i, key) for i, key in rows],
                      counts={str(k): int(v) for k, v in counts.items()})


def outbox_item(svc: ApiServices, item_id: int) -> OutboxItemOut | None:
    with svc.sessions() as s:
        row = s.execute(select(OutboxItem, Study.study_key)
                        .join(Study, Study.id == OutboxItem.study_id)
                        .where(OutboxItem.id == item_id)).first()
    return _outbox_out(row[0], row[1]) if row else None


# -- models ---------------------------------------------------------------------------------


def _heldout(m: ModelVersion, root: Any) -> tuple[float | None, str | None]:
    gate = (m.metrics or {}).get("gate") or {}
    if isinstance(gate.get("candidate_mean"), int | float):
        return round(float(gate["candidate_mean"]), 4), "held-out test split (retraining)"
    try:
        prov = read_model_package(root / m.path).provenance
    except Exception:  # a package gone or unreadable: the registry row still shows
        return None, None
    for key in ("best_val_dice", "val_dice", "test_dice"):
        if isinstance(prov.get(key), int | float):
            return round(float(prov[key]), 4), f"package provenance ({key})"
    return None, None


def version_out(svc: ApiServices, m: ModelVersion, drift: Sequence[DriftPoint]) -> ModelVersionOut:
    heldout, source = _heldout(m, svc.registry.root)
    mine = [d.mean_dice for d in drift if d.model_version == m.version]
    return ModelVersionOut(
        name=m.name, version=m.version, task=m.task, sha256=m.sha256, status=m.status,
        created_at=m.created_at, created_by=m.created_by, activated_at=m.activated_at,
        reason=m.reason, heldout_dice=heldout, heldout_source=source,
        production_dice=round(sum(mine) / len(mine), 4) if mine else None,
        production_n=len(mine), metrics=dict(m.metrics or {}), card=dict(m.card or {}),
    )


def models(svc: ApiServices, name: str | None = None) -> ModelsOut:
    """Model versions per name (oldest first) with held-out and production Dice, and drift."""
    q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.created_at)
    if name is not None:
        q = q.where(ModelVersion.name == name)
    with svc.sessions() as s:
        rows = list(s.execute(q).scalars())
        drift_rows = list(s.execute(select(DriftRecord).order_by(DriftRecord.at)).scalars())
    drift: dict[str, list[DriftPoint]] = {}
    for d in drift_rows:
        drift.setdefault(d.model_name, []).append(_drift_point(d))
    by_name: dict[str, list[ModelVersion]] = {}
    for m in rows:
        by_name.setdefault(m.name, []).append(m)
    return ModelsOut(items=[
        ModelOut(
            name=n, active_version=next((m.version for m in ms if m.status == "active"), None),
            versions=[version_out(svc, m, drift.get(n, [])) for m in ms],
            drift=drift.get(n, []),
        ) for n, ms in by_name.items()
    ])


def model_version(svc: ApiServices, name: str, version: str) -> ModelVersionOut | None:
    for m in models(svc, name).items:
        for v in m.versions:
            if v.version == version:
                return v
    return None


# -- training, jobs, quarantine -------------------------------------------------------------


def training_runs(svc: ApiServices, *, limit: int = 100) -> TrainingRunList:
    with svc.sessions() as s:
        rows = list(s.execute(select(TrainingRun).order_by(TrainingRun.id.desc())
                              .limit(limit)).scalars())
    return TrainingRunList(items=[TrainingRunOut(
        id=r.id, model_name=r.model_name, started_at=r.started_at, finished_at=r.finished_at,
        status=r.status, reason=r.reason, version=r.version, new_labels=r.new_labels or 0,
        metrics=dict(r.metrics or {}), card=dict(r.card or {}),
    ) for r in rows])


def _scalar_args(args: dict[str, Any] | None) -> dict[str, int | float | str | bool | None]:
    return {str(k): v for k, v in (args or {}).items()
            if isinstance(v, int | float | str | bool) or v is None}


_PROCRASTINATE_STATUS = {"todo": "todo", "doing": "running", "succeeded": "done",
                         "failed": "failed", "cancelled": "failed", "aborted": "failed"}
_OUR_STATUS = {"todo": ["todo"], "running": ["doing"], "done": ["succeeded"],
               "failed": ["failed", "cancelled", "aborted"]}


def _procrastinate(svc: ApiServices) -> bool:
    """Jobs live in procrastinate's tables (scale-out backend), not in ``job``."""
    return svc.settings.jobs.backend == "procrastinate"


def _queue_db(svc: ApiServices) -> sessionmaker[Session]:
    """Sessions on the database that holds procrastinate's tables (``jobs.url``)."""
    return svc.queue_sessions or svc.sessions


def _procrastinate_jobs(svc: ApiServices, status: str | None, queue: str | None,
                        limit: int) -> JobList:
    where, params = ["true"], {"limit": limit}
    if status is not None:
        where.append("j.status::text = ANY(:statuses)")
        params["statuses"] = _OUR_STATUS.get(status, [status])
    if queue is not None:
        where.append("j.queue_name = :queue")
        params["queue"] = queue
    sql = text(
        "SELECT j.id, j.task_name, j.queue_name, j.status::text, j.attempts, j.args,"
        " extract(epoch from j.scheduled_at), e.error,"
        " (SELECT extract(epoch from min(ev.at)) FROM procrastinate_events ev"
        "   WHERE ev.job_id = j.id),"
        " (SELECT extract(epoch from max(ev.at)) FROM procrastinate_events ev"
        "   WHERE ev.job_id = j.id)"
        " FROM procrastinate_jobs j LEFT JOIN dicomnode_job_error e ON e.job_id = j.id"
        f" WHERE {' AND '.join(where)} ORDER BY j.id DESC LIMIT :limit"
    )
    with _queue_db(svc)() as s:
        rows = s.execute(sql, params).all()
    return JobList(items=[JobOut(
        id=r[0], task=r[1], queue=r[2], status=_PROCRASTINATE_STATUS.get(r[3], r[3]),
        attempts=int(r[4] or 0), max_attempts=0, run_after=float(r[6] or 0.0),
        last_error=r[7], created_at=float(r[8] or 0.0), updated_at=float(r[9] or 0.0),
        args=_scalar_args(dict(r[5] or {})),
    ) for r in rows])


def jobs(svc: ApiServices, *, status: str | None = None, queue: str | None = None,
         limit: int = 100) -> JobList:
    """Jobs, most recently updated first (either backend's table)."""
    if _procrastinate(svc):
        return _procrastinate_jobs(svc, status, queue, limit)
    q = select(Job)
    if status is not None:
        q = q.where(Job.status == status)
    if queue is not None:
        q = q.where(Job.queue == queue)
    with svc.sessions() as s:
        rows = list(s.execute(q.order_by(Job.updated_at.desc(), Job.id.desc())
                              .limit(limit)).scalars())
    return JobList(items=[JobOut(
        id=j.id, task=j.task, queue=j.queue, status=j.status, attempts=j.attempts,
        max_attempts=j.max_attempts, run_after=j.run_after, last_error=j.last_error,
        created_at=j.created_at, updated_at=j.updated_at, args=_scalar_args(j.args),
    ) for j in rows])


def queue_depths(svc: ApiServices) -> dict[str, dict[str, int]]:
    """queue -> {todo, due, running, failed, done}, over every queue with a job."""
    now = time.time()
    out: dict[str, dict[str, int]] = {}
    if _procrastinate(svc):
        with _queue_db(svc)() as s:
            for queue, status, n in s.execute(text(
                    "SELECT queue_name, status::text, count(*) FROM procrastinate_jobs"
                    " GROUP BY queue_name, status")).all():
                ours = _PROCRASTINATE_STATUS.get(status, status)
                out.setdefault(queue, {})[ours] = out.get(queue, {}).get(ours, 0) + int(n)
            for queue, n in s.execute(text(
                    "SELECT queue_name, count(*) FROM procrastinate_jobs WHERE status = 'todo'"
                    " AND (scheduled_at IS NULL OR scheduled_at <= now()) GROUP BY queue_name")
                    ).all():
                out.setdefault(queue, {})["due"] = int(n)
        return out
    with svc.sessions() as s:
        # Per status from the trigger-kept tally (storage.tally); "due" is a range of the
        # claim index over the waiting jobs only.
        for (queue, status), n in tally.counts(s, "job").items():
            out.setdefault(queue, {})[status] = int(n)
        for queue, n in s.execute(select(Job.queue, func.count()).where(
                Job.status == "todo", Job.run_after <= now).group_by(Job.queue)).all():
            out.setdefault(queue, {})["due"] = int(n)
    return out


def queues(svc: ApiServices) -> QueuesOut:
    names = sorted(set(queue_depths(svc)) | set(svc.settings.jobs.workers))
    depths = queue_depths(svc)
    return QueuesOut(queues=[QueueDepth(
        queue=q, todo=depths.get(q, {}).get("todo", 0), due=depths.get(q, {}).get("due", 0),
        running=depths.get(q, {}).get("running", 0), failed=depths.get(q, {}).get("failed", 0),
        done=depths.get(q, {}).get("done", 0)) for q in names])


def quarantine(svc: ApiServices, *, limit: int = 500) -> QuarantineList:
    """Instances quarantined or failed de-identification (as ``dicomnode quarantine list``)."""
    with svc.sessions() as s:
        rows = s.execute(
            select(Instance.id, Instance.study_id, Study.study_key, Instance.sop_class_uid,
                   Instance.state, Instance.error, Instance.received_at)
            .join(Study, Study.id == Instance.study_id)
            .where(Instance.state.in_(["quarantined", "failed"]))
            .order_by(Instance.id.desc()).limit(limit)).all()
    return QuarantineList(items=[QuarantineItem(
        instance_id=r[0], study_id=r[1], study_key=r[2], sop_class_uid=r[3], state=r[4],
        reason=r[5], received_at=r[6]) for r in rows])


# -- health ---------------------------------------------------------------------------------


def readiness(svc: ApiServices) -> ReadinessOut:
    """Database reachable, data directory writable, a model active for every routing rule."""
    checks: dict[str, CheckOut] = {}
    try:
        with svc.sessions() as s:
            s.execute(text("SELECT 1"))
            active = set(s.execute(select(ModelVersion.name)
                                   .where(ModelVersion.status == "active")).scalars())
        checks["database"] = CheckOut(ok=True, detail="reachable")
    except Exception as exc:
        checks["database"] = CheckOut(ok=False, detail=f"{exc.__class__.__name__}")
        active = set()
    root = svc.files.root
    writable = root.is_dir() and os.access(root, os.W_OK)
    checks["data_dir"] = CheckOut(ok=writable, detail="writable" if writable else "not writable")
    wanted = sorted({m for r in svc.settings.routing.rules for m in r.models})
    missing = [m for m in wanted if m not in active]
    checks["models"] = CheckOut(ok=not missing, detail=(
        f"no active version of {', '.join(missing)}" if missing
        else f"{len(wanted)} routed model(s) active"))
    ok = all(c.ok for c in checks.values())
    return ReadinessOut(status="ready" if ok else "not_ready", checks=checks)

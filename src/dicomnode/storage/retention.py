"""Retention: remove what has expired, in small batches, never what is still needed.

:func:`sweep` runs daily (``retention.interval_s``) and removes, each kind in batches
of ``retention.batch`` rows per transaction (a receiving writer waits at most one
batch):

- done jobs older than ``jobs_days`` (their dedup keys with them; failed jobs stay);
- delivered outbox rows (sent, confirmed, dropped) older than ``outbox_days``, and
  their object files once no other row names the same object;
- labels older than ``labels_days`` (when set);
- whole studies last received more than ``studies_days`` ago: archive copies, kept
  spool files, result masks and objects, labels, every index row (the foreign keys
  cascade), the vault identity and the vault's UID pairs of the study's own study,
  series and instance UIDs (read from the de-identified archive files);
- rotated audit files older than ``audit_days``.

A study is **protected**, whatever its age, while it is receiving or its outcome is
still being worked out, a delivery of it is pending, a job for it is waiting or
running, or it has labels and ``keep_labelled`` (it is in the training set). Its vault
entries live exactly as long as the study: no result that may still need
re-identification outlives them.

Every removal is audited (``retention_removed``: one line per study with its key, one
per batch of jobs or outbox rows with their ids). On SQLite the sweep ends with
``PRAGMA optimize`` (ANALYZE where it pays) and a VACUUM when the free pages reach
``vacuum_free_fraction`` of the file.

:func:`delete_patient` removes every study of one patient on request (operator), found
through the pseudonymous Patient ID the vault and the index hold; audited.

Reads use the indexes of migration 0005 (``tests/scale`` checks the plans).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import JSON, Engine, column, delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import audit
from dicomnode.config import RetentionSettings
from dicomnode.errors import StorageError
from dicomnode.storage import tally
from dicomnode.storage.models import (
    GroundTruth,
    InferenceResult,
    Instance,
    Job,
    OutboxItem,
    Series,
    Study,
    StudyOutcome,
    StudyState,
    VaultIdentity,
    VaultUID,
)
from dicomnode.storage.spool import FileStore

__all__ = ["RetentionReport", "delete_patient", "delete_studies", "sweep"]

log = logging.getLogger(__name__)

_DAY = 86400.0
DELIVERED = ("sent", "confirmed", "dropped")
"""Outbox statuses after which a row is only history."""
PENDING = ("pending",)


@dataclass
class RetentionReport:
    """What one sweep removed (counts) and what it kept back (protected studies)."""

    jobs: int = 0
    outbox: int = 0
    labels: int = 0
    studies: int = 0
    instances: int = 0
    files: int = 0
    vault_uids: int = 0
    audit_files: int = 0
    protected: int = 0
    vacuumed: bool = False
    removed_study_keys: list[str] = field(default_factory=list)

    def total(self) -> int:
        return self.jobs + self.outbox + self.labels + self.studies + self.audit_files


def _delete_files(files: FileStore, paths: Iterable[str]) -> int:
    n = 0
    for p in sorted(set(paths)):
        try:
            if files.path(p).exists():
                files.delete(p)
                n += 1
        except StorageError as exc:  # a file left behind is harmless; say so
            log.warning("retention: %s", exc)
    return n


def _sweep_jobs(sessions: sessionmaker[Session], s: RetentionSettings, now: float,
                who: str) -> int:
    if not s.jobs_days:
        return 0
    cutoff = now - s.jobs_days * _DAY
    n = 0
    while True:
        with sessions.begin() as db:
            ids = list(db.execute(select(Job.id).where(
                Job.status == "done", Job.updated_at < cutoff).limit(s.batch)).scalars())
            if not ids:
                return n
            db.execute(delete(Job).where(Job.id.in_(ids)))
        audit("retention_removed", user=who, kind="jobs", count=len(ids), ids=ids)
        n += len(ids)


def _sweep_outbox(sessions: sessionmaker[Session], files: FileStore, s: RetentionSettings,
                  now: float, who: str) -> tuple[int, int]:
    if not s.outbox_days:
        return 0, 0
    cutoff = now - s.outbox_days * _DAY
    n = nfiles = 0
    while True:
        with sessions.begin() as db:
            rows = db.execute(
                text(f"SELECT id, path, sop_instance_uid FROM "
                     f"{_indexed(db, 'outbox', 'ix_outbox_status_created')} "
                     f"WHERE status IN ('sent', 'confirmed', 'dropped') "
                     f"AND created_at < :cutoff LIMIT :n"),
                {"cutoff": cutoff, "n": s.batch}).all()
            if not rows:
                return n, nfiles
            ids = [r.id for r in rows]
            db.execute(delete(OutboxItem).where(OutboxItem.id.in_(ids)))
            # the same object sent to another destination keeps its file
            still = set(db.execute(select(OutboxItem.sop_instance_uid).where(
                OutboxItem.sop_instance_uid.in_({r.sop_instance_uid for r in rows}))).scalars())
        nfiles += _delete_files(files, (r.path for r in rows if r.sop_instance_uid not in still))
        audit("retention_removed", user=who, kind="outbox", count=len(ids), ids=ids)
        n += len(ids)


def _sweep_labels(sessions: sessionmaker[Session], files: FileStore, s: RetentionSettings,
                  now: float, who: str) -> int:
    if not s.labels_days:
        return 0
    cutoff = now - s.labels_days * _DAY
    n = 0
    while True:
        with sessions.begin() as db:
            rows = db.execute(select(GroundTruth.id, GroundTruth.mask_path, Study.study_key)
                              .join(Study, Study.id == GroundTruth.study_id)
                              .where(GroundTruth.created_at < cutoff).limit(s.batch)).all()
            if not rows:
                return n
            db.execute(delete(GroundTruth).where(GroundTruth.id.in_([r.id for r in rows])))
        _delete_files(files, (r.mask_path for r in rows))
        for r in rows:
            audit("retention_removed", user=who, kind="label", study_key=r.study_key,
                  label_id=r.id)
        n += len(rows)


def _indexed(db: Session, table: str, index: str) -> str:
    """``table`` with SQLite's ``INDEXED BY``: its planner scans a table that its last
    statistics called small, and a sweep must stay an index search however the table has
    grown since (PostgreSQL keeps its own statistics current)."""
    return f"{table} INDEXED BY {index}" if db.get_bind().dialect.name == "sqlite" else table


def _active_job_studies(db: Session) -> set[int]:
    """Studies a waiting or running job names (few rows: the claim index's todo/running)."""
    out: set[int] = set()
    stmt = text(f"SELECT args FROM {_indexed(db, 'job', 'ix_job_status_updated')} "
                "WHERE status IN ('todo', 'running')").columns(column("args", JSON))
    for args in db.execute(stmt).scalars():
        sid = (args or {}).get("study_id") if isinstance(args, dict) else None
        if isinstance(sid, int):
            out.add(sid)
    return out


def protected_studies(db: Session, ids: Sequence[int], *, keep_labelled: bool) -> set[int]:
    """Which of these studies must stay (see the module docstring), by indexed lookups."""
    if not ids:
        return set()
    keep: set[int] = set(db.execute(select(OutboxItem.study_id).where(
        OutboxItem.study_id.in_(ids), OutboxItem.status.in_(PENDING))).scalars())
    keep |= set(db.execute(select(Study.id).where(Study.id.in_(ids), (
        (Study.state != StudyState.COMPLETE)
        | Study.outcome.in_((StudyOutcome.RECEIVING, StudyOutcome.PROCESSING))
        | (Study.hooked_version < Study.completed_version)))).scalars())
    if keep_labelled:
        keep |= set(db.execute(select(GroundTruth.study_id).where(
            GroundTruth.study_id.in_(ids))).scalars())
    keep |= _active_job_studies(db) & set(ids)
    return keep


def _study_uids(files: FileStore, paths: Iterable[str]) -> set[str]:
    """Pseudonymous Study, Series and SOP Instance UIDs in these de-identified files."""
    from pydicom import dcmread

    uids: set[str] = set()
    for p in paths:
        try:
            ds = dcmread(files.path(p), stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                        "SOPInstanceUID"])
        except Exception:  # unreadable or gone: nothing to look up
            continue
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            v = getattr(ds, kw, None)
            if v:
                uids.add(str(v))
    return uids


def delete_studies(sessions: sessionmaker[Session], files: FileStore, study_ids: Sequence[int],
                   *, who: str, why: str, report: RetentionReport | None = None,
                   event: str = "retention_removed") -> RetentionReport:
    """Remove these studies entirely (rows, files, vault entries); audit one line each.

    The caller decides they may go (:func:`protected_studies`); this only removes.
    """
    report = report or RetentionReport()
    for sid in study_ids:
        with sessions() as db:
            st = db.get(Study, sid)
            if st is None:
                continue
            inst = db.execute(select(Instance.path, Instance.spool_path, Instance.state)
                              .where(Instance.study_id == sid)).all()
            masks = db.execute(select(InferenceResult.mask_path)
                               .where(InferenceResult.study_id == sid)).scalars().all()
            objects = db.execute(select(OutboxItem.path)
                                 .where(OutboxItem.study_id == sid)).scalars().all()
            labels = db.execute(select(GroundTruth.mask_path)
                                .where(GroundTruth.study_id == sid)).scalars().all()
            key = st.study_key
        archive = [r.path for r in inst if r.state != "received" and r.path]
        uids = _study_uids(files, archive)
        with sessions.begin() as db:
            if uids:
                ulist = sorted(uids)
                for i in range(0, len(ulist), 500):
                    report.vault_uids += db.execute(delete(VaultUID).where(
                        VaultUID.pseudonym.in_(ulist[i:i + 500]))).rowcount or 0
            db.execute(delete(VaultIdentity).where(VaultIdentity.study_key == key))
            # instance, series, results, outbox, labels and drift cascade with the study
            db.execute(delete(Instance).where(Instance.study_id == sid))
            db.execute(delete(Series).where(Series.study_id == sid))
            db.execute(delete(Study).where(Study.id == sid))
        paths = [p for r in inst for p in (r.path, r.spool_path) if p]
        paths += [p for p in (*masks, *objects, *labels) if p]
        nfiles = _delete_files(files, paths)
        report.studies += 1
        report.instances += len(inst)
        report.files += nfiles
        report.removed_study_keys.append(key)
        audit(event, user=who, kind="study", study_key=key, instances=len(inst),
              files=nfiles, why=why)
    return report


def _sweep_studies(sessions: sessionmaker[Session], files: FileStore, s: RetentionSettings,
                   now: float, who: str, report: RetentionReport) -> None:
    if not s.studies_days:
        return
    cutoff = now - s.studies_days * _DAY
    after: tuple[float, int] = (float("-inf"), 0)
    while True:
        with sessions() as db:
            # oldest first, a page at a time past the previous one (ix_study_last_received)
            rows = db.execute(select(Study.id, Study.last_received_at).where(
                Study.last_received_at < cutoff,
                (Study.last_received_at > after[0])
                | ((Study.last_received_at == after[0]) & (Study.id > after[1])))
                .order_by(Study.last_received_at, Study.id).limit(s.batch)).all()
            if not rows:
                return
            ids = [r.id for r in rows]
            keep = protected_studies(db, ids, keep_labelled=s.keep_labelled)
            newest = db.execute(select(func.max(Study.id))).scalar()
        after = (rows[-1].last_received_at, rows[-1].id)
        # SQLite may give the highest id again to the next new study; its done jobs'
        # dedup keys (study_complete:<id>:<version>) would then swallow that study's
        # completion. The newest row stays until a newer one exists.
        go = [i for i in ids if i not in keep and i != newest]
        report.protected += len(ids) - len(go)
        delete_studies(sessions, files, go, who=who, why="retention.studies_days",
                       report=report)


def _sweep_audit_files(audit_path: Path | None, s: RetentionSettings, now: float,
                       who: str) -> int:
    if not s.audit_days or audit_path is None:
        return 0
    cutoff = now - s.audit_days * _DAY
    n = 0
    for p in sorted(audit_path.parent.glob(audit_path.name + ".*")):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
                audit("retention_removed", user=who, kind="audit_file", file=p.name)
        except OSError as exc:
            log.warning("retention: cannot remove %s (%s)", p.name, exc.strerror)
    return n


def _sqlite_maintenance(engine: Engine, s: RetentionSettings, removed: int) -> bool:
    if engine.dialect.name != "sqlite":
        return False  # PostgreSQL: autovacuum
    # a write transaction (BEGIN IMMEDIATE): optimize may write sqlite_stat1
    with engine.begin() as c:
        c.exec_driver_sql("PRAGMA optimize")  # ANALYZE of the tables whose stats drifted
        free = c.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
        pages = c.exec_driver_sql("PRAGMA page_count").scalar() or 1
    if not removed or free / pages < s.vacuum_free_fraction:
        return False
    raw = engine.raw_connection()
    try:
        raw.driver_connection.execute("VACUUM")  # type: ignore[union-attr]
    finally:
        raw.close()
    log.info("retention: VACUUM gave back %d of %d pages", free, pages)
    return True


def sweep(engine: Engine, sessions: sessionmaker[Session], files: FileStore,
          s: RetentionSettings, *, who: str = "dicomnode", audit_path: Path | None = None,
          now: float | None = None) -> RetentionReport:
    """One retention sweep (see the module docstring); returns what it removed."""
    now = time.time() if now is None else now
    report = RetentionReport()
    report.jobs = _sweep_jobs(sessions, s, now, who)
    report.outbox, nfiles = _sweep_outbox(sessions, files, s, now, who)
    report.files += nfiles
    report.labels = _sweep_labels(sessions, files, s, now, who)
    _sweep_studies(sessions, files, s, now, who, report)
    report.audit_files = _sweep_audit_files(audit_path, s, now, who)
    with sessions.begin() as db:  # the deletes above appended -1 rows to the tally
        tally.compact(db)
    try:
        report.vacuumed = _sqlite_maintenance(engine, s, report.total())
    except Exception as exc:  # maintenance must not fail the sweep
        log.warning("retention: SQLite maintenance failed (%s)", exc.__class__.__name__)
    if report.total():
        log.info("retention: removed %d studies (%d instances), %d jobs, %d outbox rows, "
                 "%d labels, %d files; %d studies protected", report.studies,
                 report.instances, report.jobs, report.outbox, report.labels, report.files,
                 report.protected)
    return report


def delete_patient(sessions: sessionmaker[Session], files: FileStore, patient_pseudonym: str,
                   *, who: str, force: bool = False) -> tuple[RetentionReport, list[int]]:
    """Remove every study of one patient (by pseudonymous Patient ID); audited.

    Studies still protected (a delivery pending, a job running...) are left unless
    ``force``; returns the report and the ids left. Done jobs naming the studies go too,
    so that no dedup key of a removed study remains for a reused id.
    """
    with sessions() as db:
        keys = set(db.execute(select(VaultIdentity.study_key).where(
            VaultIdentity.patient_key == patient_pseudonym)).scalars())
        ids = set(db.execute(select(Study.id).where(
            (Study.patient_key == patient_pseudonym) | Study.study_key.in_(keys))).scalars())
        keep = set() if force else protected_studies(db, sorted(ids), keep_labelled=False)
    go = sorted(ids - keep)
    report = delete_studies(sessions, files, go, who=who, why="patient deletion on request",
                            event="patient_deleted")
    if go:
        with sessions.begin() as db:
            # a rare operator action: reading the job table once is acceptable here
            for jid, args in db.execute(select(Job.id, Job.args).where(
                    Job.status.in_(("done", "failed")))).all():
                if isinstance(args, dict) and args.get("study_id") in go:
                    db.execute(delete(Job).where(Job.id == jid))
                    report.jobs += 1
        with sessions.begin() as db:
            db.execute(delete(VaultIdentity).where(
                VaultIdentity.patient_key == patient_pseudonym,
                VaultIdentity.study_key.not_in(
                    select(Study.study_key).where(Study.id.in_(sorted(keep))))))
    audit("patient_deleted", user=who, patient_key=patient_pseudonym, studies=len(go),
          kept=len(keep), instances=report.instances)
    return report, sorted(keep)


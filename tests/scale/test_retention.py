"""Retention with short settings: exactly what expired goes, what is needed stays.

A migrated database (SQLite and PostgreSQL) is filled as the node writes it
(tests/bulkfill.py), with real files behind every path and real de-identified DICOM
files in the archive (their UIDs in the vault), then given a study with a pending
delivery, one with labels (training set), one with a waiting job and one still being
processed. One sweep must remove exactly the expired rows and files, keep every
protected study with its vault entries, and audit each removal by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from bulkfill import fill
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select, text, update

from dicomnode.config import RetentionSettings
from dicomnode.storage.db import create_db_engine, migrate, session_factory
from dicomnode.storage.models import (
    GroundTruth,
    InferenceResult,
    Instance,
    Job,
    OutboxItem,
    Study,
    VaultIdentity,
    VaultUID,
)
from dicomnode.storage.retention import delete_patient, sweep
from dicomnode.storage.spool import FileStore

NOW = 2_000_000_000.0
DAY = 86400.0


def _dicom(path: Path, study: str, series: str, sop: str) -> None:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def node_db(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = create_db_engine(db_url)
    migrate(engine)
    fill(engine, 40, per_study=2, days=40, now=NOW, spool_kept=0)  # 20 studies, one per 2 days
    sessions = session_factory(engine)
    files = FileStore(tmp_path / "data", fsync=False, spares=0)
    with sessions.begin() as s:
        for sid in s.execute(select(Study.id)).scalars().all():
            study_uid = f"2.25.{sid}000"
            s.add(VaultUID(pseudonym=study_uid, nonce=b"\0" * 12, ciphertext=b"x",
                           created_at=NOW - 50 * DAY))
            for iid, path, series_id in s.execute(select(
                    Instance.id, Instance.path, Instance.series_id).where(
                    Instance.study_id == sid)).all():
                _dicom(files.path(path), study_uid, f"2.25.{series_id}001", f"2.25.{iid}002")
                s.add(VaultUID(pseudonym=f"2.25.{iid}002", nonce=b"\0" * 12, ciphertext=b"x",
                               created_at=NOW - 50 * DAY))
        s.add(VaultUID(pseudonym="2.25.999", nonce=b"\0" * 12, ciphertext=b"x",
                       created_at=NOW - 50 * DAY))  # another study's: not read from ours
        for p in [*s.execute(select(OutboxItem.path)).scalars(),
                  *s.execute(select(InferenceResult.mask_path)).scalars()]:
            files.path(p).parent.mkdir(parents=True, exist_ok=True)
            files.path(p).write_bytes(b"result")
        # the protected ones, all old enough to expire
        s.execute(update(OutboxItem).where(OutboxItem.study_id == 2).values(status="pending"))
        s.add(GroundTruth(study_id=3, annotator="RADIOLOGIST", seg_instance_id=1,
                          series_key="k", mask_path="labels/3/mask.npz", labels=["a"],
                          created_at=NOW - 30 * DAY))
        s.add(Job(task="infer", queue="infer", args={"study_id": 4, "version": 1},
                  dedup_key="infer:4:2", status="todo", attempts=0, max_attempts=5,
                  run_after=NOW, created_at=NOW, updated_at=NOW))
        s.execute(update(Study).where(Study.id == 5).values(outcome="processing"))
        s.add(Job(task="deidentify", queue="deid", args={"study_id": 1}, dedup_key="old-failed",
                  status="failed", attempts=5, max_attempts=5, run_after=NOW - 39 * DAY,
                  created_at=NOW - 39 * DAY, updated_at=NOW - 39 * DAY))
    files.path("labels/3/mask.npz").parent.mkdir(parents=True)
    files.path("labels/3/mask.npz").write_bytes(b"label")
    yield engine, sessions, files
    files.close()
    engine.dispose()


def _snapshot(sessions, files: FileStore):  # type: ignore[no-untyped-def]
    with sessions() as s:
        studies = dict(s.execute(select(Study.id, Study.last_received_at)).all())
        keys = dict(s.execute(select(Study.id, Study.study_key)).all())
        jobs = dict(s.execute(select(Job.id, Job.status)).all())
        job_at = dict(s.execute(select(Job.id, Job.updated_at)).all())
        outbox = {r.id: r for r in s.execute(select(
            OutboxItem.id, OutboxItem.study_id, OutboxItem.status, OutboxItem.created_at,
            OutboxItem.path)).all()}
        inst = {r.id: r for r in s.execute(select(Instance.id, Instance.study_id,
                                                  Instance.path)).all()}
        vault = set(s.execute(select(VaultUID.pseudonym)).scalars())
        ident = set(s.execute(select(VaultIdentity.study_key)).scalars())
    return studies, keys, jobs, job_at, outbox, inst, vault, ident


def test_sweep_removes_exactly_what_expired(node_db, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    engine, sessions, files = node_db
    settings = RetentionSettings(studies_days=20, jobs_days=30, outbox_days=35, batch=3)
    studies, keys, jobs, job_at, outbox, inst, vault, ident = _snapshot(sessions, files)
    protected = {2, 3, 4, 5}
    old = {sid for sid, t in studies.items() if t < NOW - 20 * DAY}
    assert protected < old and len(old) == 10
    gone_studies = old - protected
    gone_jobs = {j for j, st in jobs.items() if st == "done" and job_at[j] < NOW - 30 * DAY}
    gone_outbox = {o for o, r in outbox.items()
                   if (r.status == "sent" and r.created_at < NOW - 35 * DAY)
                   or r.study_id in gone_studies}
    assert gone_jobs and gone_outbox - {o for o, r in outbox.items()
                                        if r.study_id in gone_studies}

    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    report = sweep(engine, sessions, files, settings, who="TEST", now=NOW)

    after = _snapshot(sessions, files)
    assert set(after[0]) == set(studies) - gone_studies
    assert set(after[2]) == set(jobs) - gone_jobs  # the failed job stays
    assert set(after[4]) == set(outbox) - gone_outbox
    assert set(after[5]) == {i for i, r in inst.items() if r.study_id not in gone_studies}
    # the vault: the removed studies' own UIDs and identities, nothing else
    gone_uids = {f"2.25.{sid}000" for sid in gone_studies} | {
        f"2.25.{i}002" for i, r in inst.items() if r.study_id in gone_studies}
    assert after[6] == vault - gone_uids and "2.25.999" in after[6]
    assert after[7] == ident - {keys[s] for s in gone_studies}
    # files: exactly those of removed rows
    for r in inst.values():
        assert files.path(r.path).exists() == (r.study_id not in gone_studies)
    for o, r in outbox.items():
        assert files.path(r.path).exists() == (o not in gone_outbox), (o, r)
    assert files.path("labels/3/mask.npz").exists()
    assert report.studies == len(gone_studies) and report.protected == len(protected)
    assert report.jobs == len(gone_jobs)
    # the audit trail names each removal
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicomnode.audit"]
    removed = [x for x in lines if x["event"] == "retention_removed"]
    named = {o["ParticipantObjectID"] for x in removed if x["Detail"]["kind"] == "study"
             for o in x["ParticipantObjectIdentification"]}
    assert named == {keys[s] for s in gone_studies}
    assert {i for x in removed if x["Detail"]["kind"] == "jobs" for i in x["Detail"]["ids"]} \
        == gone_jobs
    # delivered rows past outbox_days by their ids (before their studies' turn)
    assert {i for x in removed if x["Detail"]["kind"] == "outbox"
            for i in x["Detail"]["ids"]} == {
        o for o, r in outbox.items() if r.status == "sent" and r.created_at < NOW - 35 * DAY}
    # a second sweep finds nothing more
    again = sweep(engine, sessions, files, settings, who="TEST", now=NOW)
    assert again.total() == 0 and again.protected == len(protected)


def test_patient_delete_removes_all_of_one_patient(node_db, caplog) -> None:  # type: ignore[no-untyped-def]
    engine, sessions, files = node_db
    with sessions() as s:
        patient = s.execute(select(Study.patient_key).where(Study.id == 1)).scalar_one()
        theirs = set(s.execute(select(Study.id).where(Study.patient_key == patient)).scalars())
        total = s.execute(select(func.count()).select_from(Study)).scalar()
    # three studies per patient in the fill; 2 has a delivery pending, 3 labels (a request
    # to delete the patient overrides the training set, not a delivery under way)
    assert theirs == {1, 2, 3}
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    report, kept = delete_patient(sessions, files, patient, who="operator:test")
    assert report.studies == 2 and kept == [2]
    assert not files.path("labels/3/mask.npz").exists()
    report, kept = delete_patient(sessions, files, patient, who="operator:test", force=True)
    assert report.studies == 1 and kept == []
    with sessions() as s:
        assert not set(s.execute(select(Study.id).where(Study.id.in_(theirs))).scalars())
        assert s.execute(select(func.count()).select_from(Study)).scalar() == total - 3
        assert not s.execute(select(VaultIdentity).where(
            VaultIdentity.patient_key == patient)).first()
        assert not s.execute(text("SELECT 1 FROM job WHERE dedup_key LIKE 'infer:1:%'")).first()
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicomnode.audit"]
    assert sum(1 for e in events if e["event"] == "patient_deleted"
               and e["Detail"].get("kind") == "study") == 3

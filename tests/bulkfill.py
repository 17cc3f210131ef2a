"""Fill a node's database to N instances quickly, with the rows the node writes.

The shape is what a node beside a PACS accumulates: studies of ``per_study`` instances
in two series, each study received, de-identified, completed, inferred and delivered
(four done jobs with their dedup keys, one inference result, one delivered outbox row,
one vault identity). Keys are 64-hex pseudonyms as the node makes them (random order in
the unique indexes); times spread over ``days`` before now, newest last. The most recent
``spool_kept`` studies still hold their identified spool file. The schema is the
migrated one (``dicomnode.storage.db.migrate``), so triggers and indexes are the real
ones. Used by tests/scale and bench/scale.py.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, text

__all__ = ["fill"]

_QUEUES = (("study_complete", "default"), ("deidentify", "deid"), ("infer", "infer"),
           ("send_result", "send"))


def _key(kind: str, i: int) -> str:
    return hashlib.sha256(f"{kind}:{i}".encode()).hexdigest()


def _chunks(rows: Iterator[Any], n: int = 20000) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def fill(engine: Engine, n_instances: int, *, per_study: int = 100, days: float = 365.0,
         spool_kept: int = 10, now: float | None = None,
         analyze: bool = False) -> dict[str, int]:
    """Insert ``n_instances`` instances (``n_instances // per_study`` studies) and what
    goes with them; returns the row counts written. The database must be migrated and
    empty. ``analyze``: run ANALYZE on SQLite too (PostgreSQL always: autovacuum would)."""
    now = time.time() if now is None else now
    n_studies = max(1, n_instances // per_study)
    step = days * 86400 / n_studies
    half = per_study // 2
    sqlite = engine.dialect.name == "sqlite"

    def t_of(i: int) -> float:
        return now - days * 86400 + i * step

    with engine.begin() as c:
        if sqlite:
            c.exec_driver_sql("PRAGMA cache_size=-200000")
        for rows in _chunks({
            "id": i + 1, "study_key": _key("study", i), "calling_ae": "PACS",
            "t": t_of(i), "done": t_of(i) + 60, "patient_key": _key("patient", i // 3),
        } for i in range(n_studies)):
            c.execute(text(
                "INSERT INTO study (id, study_key, calling_ae, state, version, completed_version,"
                " hooked_version, first_received_at, last_received_at, version_started_at,"
                " complete_after, deadline_at, completed_at, completed_reason, patient_key,"
                " info, outcome, outcome_reason, outcome_at, run) VALUES (:id, :study_key,"
                " :calling_ae, 'complete', 1, 1, 1, :t, :t, :t, :t, :t, :done, 'quiet',"
                " :patient_key, '{}', 'results_sent', NULL, :done, 1)"), rows)
        for rows in _chunks({
            "id": j + 1, "study_id": j // 2 + 1, "series_key": _key("series", j),
            "num": j % 2 + 1,
        } for j in range(n_studies * 2)):
            c.execute(text(
                "INSERT INTO series (id, study_id, series_key, modality, series_number)"
                " VALUES (:id, :study_id, :series_key, 'CT', :num)"), rows)

        def instances() -> Iterator[tuple[Any, ...]]:
            for k in range(n_studies * per_study):
                i, m = divmod(k, per_study)
                t = t_of(i)
                kept = i >= n_studies - spool_kept
                yield (2 * i + 1 + (m >= half), i + 1, _key("sop", k),
                       "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                       f"archive/{i}/{k}.dcm", f"spool/{i}/{k}.dcm" if kept else None,
                       140000, 132, _key("digest", k), t + 5, t, t + 3600)
        mark = "?" if sqlite else "%s"
        sql = ("INSERT INTO instance (series_id, study_id, sop_key, sop_class_uid,"
               " transfer_syntax_uid, path, spool_path, size, dataset_offset, received_digest,"
               " deidentified_at, received_at, study_version, calling_ae, state, deid_due_at)"
               f" VALUES ({', '.join([mark] * 11)}, {mark}, 1, 'PACS', 'deidentified', {mark})")
        raw = c.connection.driver_connection
        cur = raw.cursor()  # type: ignore[union-attr]
        for rows in _chunks(instances(), 50000):  # type: ignore[arg-type]
            cur.executemany(sql, rows)
        for rows in _chunks({
            "id": i + 1, "study_id": i + 1, "series_key": _key("series", 2 * i),
            "mask": f"results/{i}/mask.npz", "t": t_of(i) + 90,
        } for i in range(n_studies)):
            c.execute(text(
                "INSERT INTO inference_result (id, study_id, study_version, model_name,"
                " model_version, series_key, status, mask_path, findings, timings, error,"
                " created_at) VALUES (:id, :study_id, 1, 'demo', '1.0.0', :series_key, 'done',"
                " :mask, '[]', '{}', NULL, :t)"), rows)
        for rows in _chunks({
            "study_id": i + 1, "result_id": i + 1, "uid": f"2.25.{i + 1}1",
            "series_uid": f"2.25.{i + 1}2", "path": f"results/{i}/seg.dcm", "t": t_of(i) + 95,
            "sent": t_of(i) + 100,
        } for i in range(n_studies)):
            c.execute(text(
                "INSERT INTO outbox (study_id, result_id, study_version, model_name,"
                " model_version, kind, sop_class_uid, sop_instance_uid, series_instance_uid,"
                " path, destination, status, attempts, next_attempt_at, last_error, created_at,"
                " sent_at, supersedes, timings, commitment_uid, confirmed_at) VALUES (:study_id,"
                " :result_id, 1, 'demo', '1.0.0', 'SEG', '1.2.840.10008.5.1.4.1.1.66.4', :uid,"
                " :series_uid, :path, 'pacs', 'sent', 1, NULL, NULL, :t, :sent, NULL, '{}',"
                " NULL, NULL)"), rows)
        for rows in _chunks({
            "task": task, "queue": queue, "args": f'{{"study_id": {i + 1}, "version": 1}}',
            "dedup": f"{task}:{i + 1}:1", "t": t_of(i) + 10 * q, "u": t_of(i) + 10 * q + 5,
        } for i in range(n_studies) for q, (task, queue) in enumerate(_QUEUES)):
            c.execute(text(
                "INSERT INTO job (task, queue, args, dedup_key, status, attempts, max_attempts,"
                " run_after, created_at, updated_at) VALUES (:task, :queue, :args, :dedup,"
                " 'done', 1, 5, :t, :t, :u)"), rows)
        for rows in _chunks({
            "study_key": _key("study", i), "patient_key": _key("patient", i // 3),
            "nonce": b"\0" * 12, "ct": b"\1" * 96, "t": t_of(i),
        } for i in range(n_studies)):
            c.execute(text(
                "INSERT INTO vault_identity (study_key, patient_key, nonce, ciphertext,"
                " updated_at) VALUES (:study_key, :patient_key, :nonce, :ct, :t)"), rows)
        if not sqlite:
            for table in ("study", "series", "inference_result"):
                c.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                  f" (SELECT max(id) FROM {table}))")
    if analyze or not sqlite:
        # PostgreSQL's autovacuum vacuums and analyzes such tables by itself soon after;
        # done here so that plans and timings are those of the steady state (the
        # visibility map lets index-only scans skip the heap)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("ANALYZE" if sqlite else "VACUUM ANALYZE")
    return {"studies": n_studies, "series": 2 * n_studies, "instances": n_studies * per_study,
            "jobs": 4 * n_studies, "outbox": n_studies, "results": n_studies}

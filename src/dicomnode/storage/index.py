"""StudyIndex: studies, series and instances under pseudonymous keys, and study completion.

Study completion (DESIGN.md, "Study completion") is a state machine on the
``study`` row, so any process can evaluate it and a restart resumes it:

* each new or changed instance sets ``complete_after = now + quiet period``; an
  instance for a ``complete`` study reopens it (``version += 1``);
* :meth:`StudyIndex.complete_due` moves ``receiving`` studies whose quiet period,
  required-series rule or force deadline is met to ``complete`` with a
  conditional UPDATE, and in the same transaction calls ``on_complete`` (which
  enqueues the hook job with a dedup key), so completion fires once per version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import CompletionRule
from dicomnode.errors import StorageError
from dicomnode.storage.models import Instance, Series, Study, StudyOutcome, StudyState

__all__ = ["ReceivedInstance", "RecordOutcome", "StoredInstance", "StudyIndex", "StudySummary"]


@dataclass(frozen=True)
class ReceivedInstance:
    """What the C-STORE handler knows about one stored object (pseudonymous keys only)."""

    study_key: str
    series_key: str
    sop_key: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_number: int | None
    path: str
    size: int
    dataset_offset: int
    """Where the dataset starts in the file (after preamble and file meta)."""
    calling_ae: str | None


@dataclass(frozen=True)
class StoredInstance:
    """What the index knows of a stored instance, to recognise a re-send."""

    path: str
    size: int
    dataset_offset: int
    state: str = "received"
    received_digest: str | None = None


@dataclass(frozen=True)
class RecordOutcome:
    """Result of :meth:`StudyIndex.record_instance`."""

    instance_id: int
    study_id: int
    study_version: int
    replaced_paths: tuple[str, ...]
    """Files of a replaced instance (spool, archive): delete them after the commit."""
    reopened: bool
    duplicate: bool = False
    """The same object was already stored; nothing changed."""


@dataclass(frozen=True)
class StudySummary:
    """One line of ``dicomnode studies``."""

    id: int
    study_key: str
    state: str
    version: int
    completed_version: int
    hooked_version: int
    series: int
    instances: int
    modalities: list[str]
    calling_ae: str | None
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    completed_reason: str | None
    patient_key: str | None
    info: dict[str, Any]
    outcome: str = StudyOutcome.RECEIVING
    """:class:`~dicomnode.storage.models.StudyOutcome` of the current version."""
    outcome_reason: str | None = None
    run: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_SQL_FIND_INSTANCE = text(
    "SELECT id, path, size, dataset_offset, study_id, study_version, state, received_digest,"
    " spool_path FROM instance WHERE sop_key = :sop_key"
)
_SQL_TOUCH_STUDY = text(
    "UPDATE study SET"
    " version = CASE WHEN state = 'complete' THEN version + 1 ELSE version END,"
    " version_started_at = CASE WHEN state = 'complete' THEN :now ELSE version_started_at END,"
    " deadline_at = CASE WHEN state = 'complete' THEN :deadline ELSE deadline_at END,"
    " outcome = CASE WHEN state = 'complete' THEN 'receiving' ELSE outcome END,"
    " outcome_reason = CASE WHEN state = 'complete' THEN NULL ELSE outcome_reason END,"
    " run = CASE WHEN state = 'complete' THEN 1 ELSE run END,"
    " state = 'receiving', last_received_at = :now, complete_after = :complete_after,"
    " calling_ae = :calling_ae"
    " WHERE study_key = :study_key RETURNING id, version, version_started_at"
)
_SQL_NEW_STUDY = text(
    "INSERT INTO study (study_key, calling_ae, state, version, completed_version,"
    " hooked_version, first_received_at, last_received_at, version_started_at,"
    " complete_after, deadline_at, info)"
    " VALUES (:study_key, :calling_ae, 'receiving', 1, 0, 0, :now, :now, :now,"
    " :complete_after, :deadline, '{}')"
    " ON CONFLICT (study_key) DO NOTHING RETURNING id, version, version_started_at"
)
_SQL_NEW_SERIES = text(
    "INSERT INTO series (study_id, series_key, modality, series_number)"
    " VALUES (:study_id, :series_key, :modality, :series_number)"
    " ON CONFLICT (series_key) DO NOTHING RETURNING id"
)
_SQL_NEW_INSTANCE = text(
    "INSERT INTO instance (series_id, study_id, sop_key, sop_class_uid, transfer_syntax_uid,"
    " path, spool_path, size, dataset_offset, received_at, study_version, calling_ae, state,"
    " deid_due_at)"
    " VALUES (:series_id, :study_id, :sop_key, :sop_class_uid, :transfer_syntax_uid,"
    " :path, :path, :size, :dataset_offset, :received_at, :study_version, :calling_ae,"
    " 'received', :deid_due_at) ON CONFLICT (sop_key) DO NOTHING RETURNING id"
)
_SQL_REPLACE_INSTANCE = text(
    "UPDATE instance SET series_id = :series_id, study_id = :study_id,"
    " sop_class_uid = :sop_class_uid, transfer_syntax_uid = :transfer_syntax_uid,"
    " path = :path, spool_path = :path, size = :size, dataset_offset = :dataset_offset,"
    " received_at = :received_at, study_version = :study_version, calling_ae = :calling_ae,"
    " state = 'received', received_digest = NULL, deidentified_at = NULL, error = NULL,"
    " deid_due_at = :deid_due_at"
    " WHERE sop_key = :sop_key RETURNING id"
)


# The condition repeats the partial index's (state = 'received') so that both SQLite and
# PostgreSQL use it; deid_due_at is NULL only for rows older than migration 0004. The
# unary + keeps SQLite from walking all of ix_instance_study_state (0005) in study order
# to save the GROUP BY sort: that reads every instance; the partial index only the few
# still identified.
_SQL_PENDING_DEID = text(
    "SELECT +i.study_id, MIN(COALESCE(i.deid_due_at, i.received_at)), s.last_received_at"
    " FROM instance i JOIN study s ON s.id = i.study_id"
    " WHERE i.state = 'received' GROUP BY +i.study_id, s.last_received_at"
)

_SQL_STUDY_DEID_DEADLINE = text(
    "SELECT MIN(COALESCE(deid_due_at, received_at)) FROM instance"
    " WHERE state = 'received' AND study_id = :study_id"
)


def _insert(conn: Session | Connection, model: type[Any]) -> Any:
    dialect = conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name
    return (postgresql if dialect == "postgresql" else sqlite).insert(model)


class StudyIndex:
    """The node's index. Thread-safe: every method runs in its own transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.engine: Engine = sessions.kw["bind"]
        self._read = self.engine.execution_options(dicomnode_read_only=True)
        self._series_ids: dict[str, int] = {}  # series rows never change once created

    # -- ingest --------------------------------------------------------------------------

    def stored_instance(self, sop_key: str) -> StoredInstance | None:
        """Where instance ``sop_key`` is stored, or None if unknown (a read-only query)."""
        with self._read.connect() as c:
            row = c.execute(
                select(Instance.path, Instance.size, Instance.dataset_offset).where(
                    Instance.sop_key == sop_key
                )
            ).first()
        return StoredInstance(*row) if row else None

    def record_instance(
        self,
        rec: ReceivedInstance,
        *,
        quiet_period_s: float,
        max_wait_s: float,
        is_same: Callable[[StoredInstance], bool] | None = None,
        on_recorded: Callable[[Connection, RecordOutcome], None] | None = None,
        deid_delay_s: float = 0.0,
        now: float | None = None,
    ) -> RecordOutcome:
        """Index a durably stored instance and push its study's completion out.

        The instance must be de-identified within ``deid_delay_s``: its deadline is
        stored with it (``deid_due_at``) for the de-identification sweep.

        One short transaction of four statements on the usual path (look the
        instance up, update or create the study, create the series once, insert
        the instance). For a known ``sop_key``, ``is_same(stored)`` decides: True
        means the same object again, nothing changes and ``outcome.duplicate`` is
        set; otherwise the newer object replaces the stored one (as a modality
        re-sending a corrected image expects) and a completed study reopens.

        Raises
        ------
        StorageError
            If the database write fails; the caller must not answer success.
        """
        now = time.time() if now is None else now
        for attempt in (1, 2):
            try:
                with self.engine.begin() as c:
                    out = self._record(c, rec, now, quiet_period_s, max_wait_s, is_same,
                                       deid_delay_s)
                    if out is not None:
                        if on_recorded is not None and not out.duplicate:
                            on_recorded(c, out)
                        return out
            except IntegrityError:
                # A concurrent association created the same row first; run again.
                if attempt == 2:
                    raise StorageError(
                        "index write failed: conflicting concurrent writes"
                    ) from None
            except SQLAlchemyError as exc:
                raise StorageError(f"index write failed: {exc.__class__.__name__}") from exc
        raise StorageError("index write failed: conflicting concurrent writes")

    def _record(
        self,
        c: Connection,
        rec: ReceivedInstance,
        now: float,
        quiet: float,
        max_wait: float,
        is_same: Callable[[StoredInstance], bool] | None,
        deid_delay: float,
    ) -> RecordOutcome | None:
        # Prepared text statements (same SQL on SQLite and PostgreSQL): building Core
        # constructs per call cost ~0.7 ms per instance, 15x the SQL itself.
        existing = c.execute(_SQL_FIND_INSTANCE, {"sop_key": rec.sop_key}).first()
        if existing is not None and existing.path != rec.path and is_same is not None:
            stored = StoredInstance(
                existing.spool_path or existing.path,
                existing.size,
                existing.dataset_offset,
                existing.state,
                existing.received_digest,
            )
            if is_same(stored):
                return RecordOutcome(
                    existing.id,
                    existing.study_id,
                    existing.study_version,
                    (),
                    False,
                    duplicate=True,
                )
        params = {
            "study_key": rec.study_key,
            "now": now,
            "complete_after": now + quiet,
            "deadline": now + max_wait,
            "calling_ae": rec.calling_ae,
        }
        row = c.execute(_SQL_TOUCH_STUDY, params).first()
        if row is None:
            row = c.execute(_SQL_NEW_STUDY, params).first()
            if row is None:
                raise IntegrityError("study created concurrently", None, ValueError())
            reopened = False
        else:
            reopened = row.version > 1 and row.version_started_at == now
        study_id, version = row.id, row.version

        series_id = self._series_ids.get(rec.series_key)
        if series_id is None:
            series_id = c.execute(
                _SQL_NEW_SERIES,
                {
                    "study_id": study_id,
                    "series_key": rec.series_key,
                    "modality": rec.modality,
                    "series_number": rec.series_number,
                },
            ).scalar()
            if series_id is None:
                series_id = c.execute(
                    select(Series.id).where(Series.series_key == rec.series_key)
                ).scalar_one()
            if len(self._series_ids) > 10000:
                self._series_ids.clear()
            self._series_ids[rec.series_key] = series_id

        fields = {
            "series_id": series_id,
            "study_id": study_id,
            "sop_key": rec.sop_key,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "path": rec.path,
            "size": rec.size,
            "dataset_offset": rec.dataset_offset,
            "received_at": now,
            "study_version": version,
            "calling_ae": rec.calling_ae,
            "deid_due_at": now + deid_delay,
        }
        replaced: tuple[str, ...] = ()
        if existing is None:
            instance_id = c.execute(_SQL_NEW_INSTANCE, fields).scalar()
            if instance_id is None:
                raise IntegrityError("instance created concurrently", None, ValueError())
        else:
            instance_id = c.execute(_SQL_REPLACE_INSTANCE, fields).scalar_one()
            replaced = tuple(p for p in {existing.path, existing.spool_path} if p and p != rec.path)
        return RecordOutcome(instance_id, study_id, version, replaced, reopened)

    def stored_paths(self) -> set[str]:
        """Paths of every indexed file (reads the whole instance table: tests and tools;
        start-up uses :meth:`indexed_spool_paths`)."""
        with self.sessions() as s:
            rows = s.execute(select(Instance.path, Instance.spool_path)).all()
        return {p for row in rows for p in row if p}

    def indexed_spool_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of these spool paths an instance row holds as its kept spool file.

        Every row records its spool file in ``spool_path`` from receipt until the file is
        deleted, so the partial index ``ix_instance_spool`` answers this by lookups, at a
        cost in the number of ``paths``, not of instances.
        """
        found: set[str] = set()
        with self.sessions() as s:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i:i + 500])
                found.update(s.execute(select(Instance.spool_path).where(
                    Instance.spool_path.is_not(None), Instance.spool_path.in_(chunk))).scalars())
        return found

    # -- de-identification state ---------------------------------------------------------

    def instance(self, instance_id: int) -> Instance | None:
        """One instance row (detached)."""
        with self.sessions() as s:
            return s.get(Instance, instance_id)

    def series_files(self, study_id: int, state: str = "deidentified") -> dict[str, list[str]]:
        """Series key -> file paths of the study's instances in ``state``."""
        with self.sessions() as s:
            rows = s.execute(
                select(Series.series_key, Instance.path)
                .join(Instance, Instance.series_id == Series.id)
                .where(Instance.study_id == study_id, Instance.state == state)
                .order_by(Instance.id)
            ).all()
        out: dict[str, list[str]] = {}
        for key, path in rows:
            out.setdefault(key, []).append(path)
        return out

    def update_info(self, study_id: int, **values: Any) -> None:
        """Merge ``values`` into the study's ``info`` (pipeline state, pseudonymous only)."""
        with self.sessions.begin() as s:
            q = select(Study).where(Study.id == study_id)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update()
            study = s.execute(q).scalar_one()
            study.info = {**(study.info or {}), **values}

    def update_info_item(self, study_id: int, key: str, item: str, value: Any) -> None:
        """Set ``info[key][item] = value`` in one locked transaction (two jobs of one study,
        e.g. two models, may record their parts at the same time)."""
        with self.sessions.begin() as s:
            q = select(Study).where(Study.id == study_id)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update()
            study = s.execute(q).scalar_one()
            info = dict(study.info or {})
            part = dict(info.get(key) or {})
            part[item] = value
            info[key] = part
            study.info = info

    def set_outcome(
        self,
        study_id: int,
        version: int,
        outcome: str,
        reason: str | None = None,
        *,
        run: int | None = None,
    ) -> bool:
        """Record the outcome of a study version (and pipeline run, when given).

        Conditional: a later version (or a later operator retry) is never overwritten
        by the news of an earlier one, nor a study that is receiving again. Returns
        whether the row changed.
        """
        conditions = [
            Study.id == study_id,
            Study.version == version,
            Study.state == StudyState.COMPLETE,
        ]
        if run is not None:
            conditions.append(Study.run == run)
        with self.sessions.begin() as s:
            changed = s.execute(
                update(Study)
                .where(*conditions)
                .values(outcome=outcome, outcome_reason=reason, outcome_at=time.time())
            ).rowcount
        return bool(changed)

    def start_retry(self, study_id: int) -> tuple[int, int] | None:
        """Begin an operator retry: the next pipeline run of the current version.

        Only a complete study in a terminal outcome can be retried. Returns
        (version, run) of the new run, or None when the study is not retryable.
        """
        with self.sessions.begin() as s:
            q = select(Study).where(Study.id == study_id)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update()
            study = s.execute(q).scalar_one_or_none()
            if (
                study is None
                or study.state != StudyState.COMPLETE
                or study.outcome not in StudyOutcome.TERMINAL
            ):
                return None
            study.run = (study.run or 1) + 1
            study.outcome = StudyOutcome.PROCESSING
            study.outcome_reason = None
            study.outcome_at = time.time()
            info = dict(study.info or {})
            info.pop("failures", None)
            study.info = info
            return study.version, study.run

    def instances_of_version(self, study_id: int, version: int) -> list[tuple[str, str | None]]:
        """(SOP Class UID, calling AE) of the instances that arrived in a study version."""
        with self.sessions() as s:
            return [
                (r[0], r[1])
                for r in s.execute(
                    select(Instance.sop_class_uid, Instance.calling_ae).where(
                        Instance.study_id == study_id, Instance.study_version == version
                    )
                ).all()
            ]

    def study_key_of(self, instance_id: int) -> str | None:
        """The pseudonymous Study Instance UID of an instance's study."""
        with self._read.connect() as c:
            return c.execute(
                select(Study.study_key)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.id == instance_id)
            ).scalar()

    def instances_in_state(self, state: str, study_id: int | None = None) -> list[int]:
        """IDs of instances in ``state`` (of one study, or all)."""
        q = select(Instance.id).where(Instance.state == state)
        if study_id is not None:
            q = q.where(Instance.study_id == study_id)
        with self.sessions() as s:
            return list(s.execute(q.order_by(Instance.id)).scalars())

    @contextmanager
    def durable_transaction(self) -> Iterator[Connection]:
        """A write transaction whose commit is on disk when it returns, also on SQLite.

        Used where the commit is followed by deleting something the database then no
        longer needs (the spool file after de-identification): SQLite's NORMAL mode
        could otherwise lose that commit in a power cut after the deletion persisted.
        """
        with self.engine.connect() as c:
            # On the driver connection: through SQLAlchemy the PRAGMA would start a
            # transaction, inside which SQLite refuses to change the safety level.
            raw = c.connection.dbapi_connection if c.dialect.name == "sqlite" else None
            if raw is not None:
                raw.execute("PRAGMA synchronous=FULL")
            try:
                with c.begin():
                    yield c
            finally:
                if raw is not None:
                    raw.execute("PRAGMA synchronous=NORMAL")

    def finish_deid(
        self,
        conn: Connection,
        instance_id: int,
        *,
        from_path: str,
        state: str,
        path: str,
        digest: str | None,
        patient_key: str | None,
        keep_spool: bool,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Record the outcome of de-identifying the file ``from_path``, in ``conn``'s transaction.

        Conditional on the row still pointing at ``from_path``: if a replacement arrived
        meanwhile, nothing is recorded and False is returned (the caller drops its output).
        """
        now = time.time() if now is None else now
        res = conn.execute(
            update(Instance)
            .where(
                Instance.id == instance_id, Instance.path == from_path, Instance.state == "received"
            )
            .values(
                state=state,
                path=path,
                received_digest=digest,
                deidentified_at=now,
                error=error,
                spool_path=from_path if keep_spool else None,
            )
        )
        if getattr(res, "rowcount", 0) != 1:
            return False
        if patient_key is not None:
            conn.execute(
                update(Study)
                .where(
                    Study.id
                    == select(Instance.study_id).where(Instance.id == instance_id).scalar_subquery()
                )
                .values(patient_key=patient_key)
            )
        return True

    def pending_deid(self) -> list[tuple[int, float, float]]:
        """(study id, earliest de-identification deadline, study's last arrival) of every
        study with instances still identified (state received)."""
        with self._read.connect() as c:
            return [
                (int(r[0]), float(r[1]), float(r[2]))
                for r in c.execute(_SQL_PENDING_DEID).all()
            ]

    def deid_deadline(self, study_id: int) -> float | None:
        """The earliest de-identification deadline of the study's identified instances."""
        with self._read.connect() as c:
            due = c.execute(_SQL_STUDY_DEID_DEADLINE, {"study_id": study_id}).scalar()
        return None if due is None else float(due)

    def expired_spool_files(
        self, older_than: float, failed_older_than: float | None = None
    ) -> list[tuple[int, str]]:
        """(instance id, spool path) of kept spool files past their retention: de-identified
        (or quarantined) before ``older_than``, or failed de-identification before
        ``failed_older_than``."""
        failed_cutoff = older_than if failed_older_than is None else failed_older_than
        with self.sessions() as s:
            return [
                (r[0], r[1])
                for r in s.execute(
                    select(Instance.id, Instance.spool_path).where(
                        Instance.spool_path.is_not(None),
                        Instance.state != "received",
                        (
                            (Instance.state != "failed")
                            & (Instance.deidentified_at < older_than)
                        )
                        | (
                            (Instance.state == "failed")
                            & (Instance.deidentified_at < failed_cutoff)
                        ),
                    )
                ).all()
            ]

    def forget_spool(self, instance_id: int, spool_path: str) -> None:
        """Record that a kept spool file was deleted."""
        with self.sessions.begin() as s:
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.spool_path == spool_path)
                .values(spool_path=None)
            )

    # -- completion ----------------------------------------------------------------------

    def complete_due(
        self,
        rules: Sequence[CompletionRule],
        on_complete: Callable[[Session, int, int], None],
        *,
        now: float | None = None,
    ) -> list[tuple[int, int, str]]:
        """Complete every study whose time has come; return (study_id, version, reason).

        ``on_complete(session, study_id, version)`` runs inside the transaction
        that marks the study complete (enqueue the hook job there).
        """
        now = time.time() if now is None else now
        done: list[tuple[int, int, str]] = []
        with self.sessions() as s:
            receiving = s.execute(
                select(
                    Study.id,
                    Study.version,
                    Study.complete_after,
                    Study.deadline_at,
                    Study.last_received_at,
                    Study.calling_ae,
                ).where(Study.state == StudyState.RECEIVING)
            ).all()
        for study_id, version, complete_after, deadline, last, calling_ae in receiving:
            reason = None
            if complete_after <= now:
                reason = "quiet-period"
            elif deadline <= now:
                reason = "deadline"
            elif rules:
                reason = self._rule_met(study_id, calling_ae, last, rules, now)
            if reason is None:
                continue
            with self.sessions.begin() as s:
                cond = [
                    Study.id == study_id,
                    Study.version == version,
                    Study.state == StudyState.RECEIVING,
                ]
                # Re-check under the lock: an instance may have arrived since the read.
                if reason == "quiet-period":
                    cond.append(Study.complete_after <= now)
                elif reason.startswith("rule:"):
                    cond.append(Study.last_received_at == last)
                res = s.execute(
                    update(Study)
                    .where(*cond)
                    .values(
                        state=StudyState.COMPLETE,
                        completed_version=version,
                        completed_at=now,
                        completed_reason=reason,
                        outcome=StudyOutcome.PROCESSING,
                        outcome_reason=None,
                        outcome_at=now,
                    )
                )
                if getattr(res, "rowcount", 0) == 1:
                    on_complete(s, study_id, version)
                    done.append((study_id, version, reason))
        return done

    def _rule_met(
        self,
        study_id: int,
        calling_ae: str | None,
        last: float,
        rules: Sequence[CompletionRule],
        now: float,
    ) -> str | None:
        with self.sessions() as s:
            series = s.execute(
                select(Series.modality, Series.series_number, func.count(Instance.id))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id == study_id)
                .group_by(Series.id)
            ).all()
        for rule in rules:
            if rule.calling_ae is not None and rule.calling_ae != calling_ae:
                continue
            if last + rule.settle_s > now:
                continue
            if all(
                any(
                    (req.modality is None or req.modality == mod)
                    and (req.series_number is None or req.series_number == num)
                    and n >= req.min_instances
                    for mod, num, n in series
                )
                for req in rule.series
            ):
                return f"rule:{rule.name}"[:64]
        return None

    def unhooked(self) -> list[tuple[int, int]]:
        """Complete studies whose hook has not finished for their completed version."""
        with self.sessions() as s:
            return [
                (r[0], r[1])
                for r in s.execute(
                    select(Study.id, Study.completed_version).where(
                        # the partial index ix_study_unhooked holds exactly the rows of
                        # this condition; "state || ''" keeps SQLite from preferring
                        # ix_study_state_due, which ranges over every complete study
                        Study.hooked_version < Study.completed_version,
                        Study.state.concat("") == StudyState.COMPLETE,
                    )
                ).all()
            ]

    def mark_hooked(self, study_id: int, version: int) -> None:
        """Record that the completion hook for ``version`` ran to its end."""
        with self.sessions.begin() as s:
            s.execute(
                update(Study)
                .where(Study.id == study_id, Study.hooked_version < version)
                .values(hooked_version=version)
            )

    # -- queries -------------------------------------------------------------------------

    def studies(self, *, limit: int | None = None, offset: int = 0,
                since: float | None = None) -> list[StudySummary]:
        """Studies with their series and instance counts, newest first.

        A page: ``limit`` rows after ``offset``, received at or after ``since`` (epoch
        seconds). Only the page's studies are counted (``ix_instance_study_state``), so
        a page costs the same however many studies the node holds.
        """
        q = select(Study)
        if since is not None:
            q = q.where(Study.last_received_at >= since)
        q = q.order_by(Study.last_received_at.desc(), Study.id.desc()).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self.sessions() as s:
            rows = list(s.execute(q).scalars())
            ids = [st.id for st in rows]
            counts: dict[int, tuple[int, int]] = {}
            mods: dict[int, set[str]] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for sid, n in s.execute(
                        select(Instance.study_id, func.count()).where(
                            Instance.study_id.in_(chunk)).group_by(Instance.study_id)).all():
                    counts[sid] = (0, int(n))
                for sid, mod in s.execute(select(Series.study_id, Series.modality).where(
                        Series.study_id.in_(chunk))).all():
                    counts[sid] = (counts.get(sid, (0, 0))[0] + 1, counts.get(sid, (0, 0))[1])
                    if mod:
                        mods.setdefault(sid, set()).add(mod)
            return [
                StudySummary(
                    id=st.id,
                    study_key=st.study_key,
                    state=st.state,
                    version=st.version,
                    completed_version=st.completed_version,
                    hooked_version=st.hooked_version,
                    series=counts.get(st.id, (0, 0))[0],
                    instances=counts.get(st.id, (0, 0))[1],
                    modalities=sorted(mods.get(st.id, set())),
                    calling_ae=st.calling_ae,
                    first_received_at=st.first_received_at,
                    last_received_at=st.last_received_at,
                    completed_at=st.completed_at,
                    completed_reason=st.completed_reason,
                    patient_key=st.patient_key,
                    info=dict(st.info or {}),
                    outcome=st.outcome,
                    outcome_reason=st.outcome_reason,
                    run=st.run,
                )
                for st in rows
            ]

    def study_id_of(self, study_key: str) -> int | None:
        """The id of the study with this pseudonymous key."""
        with self._read.connect() as c:
            return c.execute(select(Study.id).where(Study.study_key == study_key)).scalar()

    def study(self, study_id: int) -> Study | None:
        """The study row (detached)."""
        with self.sessions() as s:
            return s.get(Study, study_id)

    def instances(self, study_id: int) -> list[Instance]:
        """Instance rows of a study (detached)."""
        with self.sessions() as s:
            return list(s.execute(select(Instance).where(Instance.study_id == study_id)).scalars())

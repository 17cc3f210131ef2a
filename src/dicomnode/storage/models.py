"""The index: SQLAlchemy 2.0 typed models.

Every key here is pseudonymous: study, series and instance rows are keyed by the
HMAC pseudonym of their UID (:class:`dicomnode.dicom.pseudonym.Pseudonymizer`),
computed in the C-STORE handler, so no original UID ever reaches the database.
Times are UTC epoch seconds (floats), which compare the same on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "Instance",
    "Job",
    "JobStatus",
    "Series",
    "Study",
    "StudyOutcome",
    "StudyState",
    "VaultAccess",
    "VaultIdentity",
    "VaultUID",
    "ModelVersion",
    "InferenceResult",
    "OutboxItem",
    "GroundTruth",
    "DriftRecord",
    "TrainingRun",
    "Tally",
]

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class StudyState:
    """Values of ``Study.state``."""

    RECEIVING = "receiving"
    """Instances are arriving; completion is pending."""
    COMPLETE = "complete"
    """Settled; the completion hook fired (or will, exactly once) for ``completed_version``."""


class StudyOutcome:
    """Values of ``Study.outcome``: where the study's current version is in the pipeline.

    ``receiving`` and ``processing`` are transient; the others are terminal and come
    with ``outcome_reason``. An operator retry (``dicomnode studies retry``) or a new
    version of the study starts ``processing`` again.
    """

    RECEIVING = "receiving"
    PROCESSING = "processing"
    RESULTS_SENT = "results_sent"
    """Every result object of every model that ran was delivered."""
    RESULTS_HELD = "results_held"
    """Results were made and stored, but no destination has an address to send them to."""
    NOT_APPLICABLE = "not_applicable"
    """No routing rule chose a model; the reason gives each rule's."""
    REFUSED = "refused"
    """A chosen model could not run on the study (the node's own refusal, with the reason)."""
    FAILED = "failed"
    """An error ended the study's processing (patient-safe error text); retryable."""

    TERMINAL = frozenset({RESULTS_SENT, RESULTS_HELD, NOT_APPLICABLE, REFUSED, FAILED})


class JobStatus:
    """Values of ``Job.status``."""

    TODO = "todo"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """Attempts exhausted (dead letter); ``last_error`` says why."""


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_key: Mapped[str] = mapped_column(String(64), unique=True)
    """Pseudonymous StudyInstanceUID."""
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    """AE title that sent the latest instance."""
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING)
    version: Mapped[int] = mapped_column(Integer, default=1)
    """Bumped when a completed study receives a new or changed instance (it reopens)."""
    completed_version: Mapped[int] = mapped_column(Integer, default=0)
    hooked_version: Mapped[int] = mapped_column(Integer, default=0)
    """Highest version whose completion hook has run to its end."""
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    version_started_at: Mapped[float] = mapped_column(Float)
    complete_after: Mapped[float] = mapped_column(Float)
    """Quiet-period deadline: last instance + quiet period."""
    deadline_at: Mapped[float] = mapped_column(Float)
    """Force-complete deadline: version start + completion.max_wait_s."""
    completed_at: Mapped[float | None] = mapped_column(Float)
    completed_reason: Mapped[str | None] = mapped_column(String(64))
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Pseudonymous Patient ID, once the study is de-identified."""
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Pipeline state per step (routing decision, errors); pseudonymous values only."""
    outcome: Mapped[str] = mapped_column(
        String(24), default=StudyOutcome.RECEIVING, server_default=StudyOutcome.RECEIVING
    )
    """:class:`StudyOutcome` of the current version."""
    outcome_reason: Mapped[str | None] = mapped_column(Text)
    """Why the study is in its terminal outcome (names rules, models, attributes; no
    patient data)."""
    outcome_at: Mapped[float | None] = mapped_column(Float)
    run: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Pipeline run of the current version: an operator retry starts the next one (its
    jobs' dedup keys carry it)."""

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all")

    __table_args__ = (
        Index("ix_study_state_due", "state", "complete_after"),
        Index("ix_study_outcome", "outcome"),
        # The studies page and `dicomnode studies` read newest first, a page at a time.
        Index("ix_study_last_received", "last_received_at", "id"),
        # Start-up and the completion loop look for hooks still to run: few rows, whatever
        # the number of studies.
        Index(
            "ix_study_unhooked",
            "id",
            sqlite_where=text("hooked_version < completed_version"),
            postgresql_where=text("hooked_version < completed_version"),
        ),
        # The retention sweep reads studies by age.
        Index("ix_study_completed_at", "completed_at"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_key: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    sop_key: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    """The instance's current file, relative to the data directory: ``spool/...`` while
    identified (state received), ``archive/...`` once de-identified, ``quarantine/...``."""
    size: Mapped[int] = mapped_column(BigInteger)
    """Size of the file as received."""
    dataset_offset: Mapped[int] = mapped_column(Integer)
    """Where the dataset as received starts in the spool file (after our file meta)."""
    spool_path: Mapped[str | None] = mapped_column(Text)
    """The identified spool file while it is kept (storage.spool_retention_s); then None."""
    received_digest: Mapped[str | None] = mapped_column(String(64))
    """Keyed HMAC-SHA256 of the dataset as received, set at de-identification: re-sends are
    recognised after the spool file is gone, and nobody without the key can confirm a file."""
    deidentified_at: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    """Why de-identification failed or quarantined the instance (no patient data)."""
    received_at: Mapped[float] = mapped_column(Float)
    study_version: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="received")
    """received | deidentified | quarantined | failed"""
    deid_due_at: Mapped[float | None] = mapped_column(Float)
    """When this instance must be de-identified at the latest (received_at +
    deid.max_delay_s, fixed at receipt); the de-identification sweep enforces it."""

    series: Mapped[Series] = relationship(back_populates="instances")

    # The sweep reads the instances still identified, by deadline: a partial index
    # keeps that read small however many instances the node holds.
    __table_args__ = (
        Index(
            "ix_instance_deid_due",
            "deid_due_at",
            sqlite_where=text("state = 'received'"),
            postgresql_where=text("state = 'received'"),
        ),
        # A page of studies counts its instances by state and reads when they were
        # de-identified from this index alone (no row is read).
        Index("ix_instance_study_state", "study_id", "state", "deidentified_at"),
        # Identified spool files still kept: start-up reconciliation looks spool files up
        # here, the spool expiry reads it; its size follows the spool, not the archive.
        Index(
            "ix_instance_spool",
            "spool_path",
            sqlite_where=text("spool_path IS NOT NULL"),
            postgresql_where=text("spool_path IS NOT NULL"),
        ),
    )


class VaultUID(Base):
    """Pseudonymous UID -> original UID, AES-GCM encrypted (storage.vault)."""

    __tablename__ = "vault_uid"

    pseudonym: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class VaultIdentity(Base):
    """Original Patient and Study module values of one study, AES-GCM encrypted."""

    __tablename__ = "vault_identity"

    study_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    """Pseudonymous StudyInstanceUID."""
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[float] = mapped_column(Float)


class VaultAccess(Base):
    """One read of the vault: who, when, why, about which pseudonym."""

    __tablename__ = "vault_access"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(64))
    """The pseudonym (study key, patient key or UID) that was looked up."""
    reads: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """One unit of work after the C-STORE handler (embedded queue backend)."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    dedup_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    """At most one job ever per key (NULLs are distinct)."""
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.TODO)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[float] = mapped_column(Float)
    lease_until: Mapped[float | None] = mapped_column(Float)
    locked_by: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_job_claim", "status", "queue", "run_after"),
        # The jobs page (newest first per status) and the retention sweep of done jobs.
        Index("ix_job_status_updated", "status", "updated_at"),
    )


class ModelVersion(Base):
    """One registered model version; at most one ``active`` per name."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    """Package directory, relative to the data directory (never overwritten)."""
    status: Mapped[str] = mapped_column(String(16))
    """candidate | active | retired | rejected"""
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    activated_at: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    """Why it was promoted, rejected or rolled back."""
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Dataset card of the training run that made it (empty for imported models)."""

    __table_args__ = (Index("uq_model_version_name_version", "name", "version", unique=True),)


class InferenceResult(Base):
    """What one model produced for one study version (or why it produced nothing)."""

    __tablename__ = "inference_result"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    series_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    """done | failed"""
    mask_path: Mapped[str | None] = mapped_column(Text)
    """``results/.../mask.npz``: the label mask (z, y, x) and the source SOP keys in z order."""
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("uq_inference_result", "study_id", "study_version", "model_name", unique=True),
    )


class OutboxItem(Base):
    """One result object to deliver to one destination (durable across restarts)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("inference_result.id", ondelete="CASCADE"), index=True
    )
    """The inference result a SEG/SR was made from; None for a notification (it covers
    every result of the study version)."""
    study_version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    """The model (SEG/SR); the models of the study, comma-separated (notification)."""
    model_version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    """SEG | SR | notification (HL7 ORU^R01 to a worklist)"""
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    """The object's own UID: deterministic for (study version, model version, kind); for a
    notification, a UID derived from (study, version), whose hash is the HL7 message
    control ID."""
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    """The object as built, on pseudonymous data; re-identified in memory when sent."""
    destination: Mapped[str] = mapped_column(String(64))
    """Peer name, or "caller"."""
    status: Mapped[str] = mapped_column(String(16))
    """pending | sent | confirmed (storage commitment) | dead | dropped | unroutable"""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float)
    supersedes: Mapped[str | None] = mapped_column(String(64))
    """SOP Instance UID of the earlier object of the same kind this one replaces."""
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Seconds spent re-identifying and sending in the successful attempt."""
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    """Transaction UID of the storage commitment request (N-ACTION) for this item."""
    confirmed_at: Mapped[float | None] = mapped_column(Float)
    """When the destination's N-EVENT-REPORT confirmed it holds the object."""

    __table_args__ = (
        Index("uq_outbox_object_destination", "sop_instance_uid", "destination", unique=True),
        # Pending deliveries, and the retention sweep of delivered rows by age.
        Index("ix_outbox_status_created", "status", "created_at"),
    )


class GroundTruth(Base):
    """One annotator's label for one study (from a corrected SEG), aligned to a series."""

    __tablename__ = "ground_truth"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    annotator: Mapped[str] = mapped_column(String(64))
    """The calling AE title the SEG came from."""
    seg_instance_id: Mapped[int] = mapped_column(Integer)
    series_key: Mapped[str] = mapped_column(String(64))
    """The source series the label mask is aligned to (volume order in the file)."""
    mask_path: Mapped[str] = mapped_column(Text)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("uq_ground_truth_study_annotator", "study_id", "annotator", unique=True),
    )


class DriftRecord(Base):
    """Dice of a production prediction against a label that arrived later."""

    __tablename__ = "drift"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    dice: Mapped[dict[str, float]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class TrainingRun(Base):
    """One retraining run and how it ended."""

    __tablename__ = "training_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    """running | skipped | promoted | rejected | failed"""
    tick: Mapped[int | None] = mapped_column(BigInteger)
    """The scheduled tick (Unix seconds) that fired the run (scale-out scheduler)."""
    reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(String(64))
    new_labels: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Tally(Base):
    """Row counts of job, outbox and study by status, kept by database triggers.

    Every insert, delete or status change of those tables adds a +1/-1 row here in the
    same transaction (migration 0005), so ``/metrics`` sums a table whose size is
    bounded by compaction (:func:`dicomnode.storage.tally.compact`) instead of counting
    whole tables per scrape. Rows are only ever inserted by the triggers (no row is
    updated in place), so concurrent writers never wait on each other here.
    """

    __tablename__ = "tally"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    """job | outbox | study"""
    k1: Mapped[str] = mapped_column(String(64), default="")
    """The job's queue ('' for the others)."""
    k2: Mapped[str] = mapped_column(String(24))
    """The status (job, outbox) or state (study)."""
    n: Mapped[int] = mapped_column(Integer)

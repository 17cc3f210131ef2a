"""Response and request models of the JSON API (they make the OpenAPI schema precise).

Every field is something the node wrote: pseudonymous keys, states, counts,
timings (UTC epoch seconds, durations in seconds) and error texts (which by the
error contract never carry patient data). Deliberately absent: original or
result UIDs (a result object's SOP Instance UID is the one it has on the PACS, a
link back to the patient), file paths, and anything from the vault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CheckOut", "DriftPoint", "ErrorOut", "FindingOut", "HealthOut", "JobList", "JobOut",
    "ModelOut", "ModelVersionOut", "ModelsOut", "OutboxItemOut", "OutboxList", "QuarantineItem",
    "QuarantineList", "QueueDepth", "QueuesOut", "ReadinessOut", "ReasonIn", "ResultOut",
    "StepOut", "StudyDetail", "StudyError", "StudyList", "StudySummaryOut", "TrainingRunList",
    "TrainingRunOut",
]

StepState = Literal["pending", "running", "done", "failed", "skipped"]
STEP_NAMES = ("receive", "complete", "deidentify", "route", "infer", "encode", "send")


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorOut(_Out):
    """An error answer (FastAPI's ``{"detail": ...}``)."""

    detail: str


class HealthOut(_Out):
    status: Literal["ok"] = "ok"


class CheckOut(_Out):
    ok: bool
    detail: str


class ReadinessOut(_Out):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckOut]


class StepOut(_Out):
    """One pipeline step of the study's current version."""

    name: str = Field(description="receive, complete, deidentify, route, infer, encode, send")
    state: StepState
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float | None = None
    detail: str | None = None


class StudySummaryOut(_Out):
    id: int
    study_key: str = Field(description="Pseudonymous Study Instance UID")
    patient_key: str | None = Field(description="Pseudonymous Patient ID (once de-identified)")
    state: Literal["receiving", "complete"]
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
    outcome: Literal[
        "receiving", "processing", "results_sent", "results_held", "not_applicable",
        "refused", "failed",
    ] = Field(description="Where the current version is: receiving, processing, or a final "
                          "outcome (results_sent, results_held, not_applicable, refused, failed)")
    outcome_reason: str | None = Field(
        None, description="Why the study is in its final outcome (no patient data)")
    run: int = Field(1, description="Pipeline run of the current version (operator retries)")
    steps: list[StepOut]


class StudyList(_Out):
    total: int
    items: list[StudySummaryOut]


class FindingOut(_Out):
    """One connected component of one label (measured on the de-identified volume)."""

    label: int
    label_name: str
    index: int
    voxel_count: int
    volume_mm3: float
    max_diameter_mm: float
    max_axial_diameter_mm: float | None = None
    mean_value: float | None = None


class ClassificationOut(_Out):
    """One label of an image classifier on one image."""

    image: int = Field(description="Index of the classified image in the result")
    sop_key: str = Field(description="Pseudonymous SOP Instance UID of the image")
    label: int
    label_name: str
    probability: float
    threshold: float
    present: bool
    explained: bool = Field(description="An explanation map was made (a positive label)")


class ResultOut(_Out):
    id: int
    study_version: int
    model_name: str
    model_version: str
    series_key: str = Field(description="Pseudonymous Series Instance UID")
    status: Literal["done", "failed"]
    findings: list[FindingOut]
    classifications: list[ClassificationOut] = []
    timings: dict[str, float]
    providers: list[str]
    error: str | None
    created_at: float


class OutboxItemOut(_Out):
    id: int
    study_id: int
    study_key: str | None
    result_id: int | None = Field(description="None for a notification (it covers the study)")
    study_version: int
    model_name: str
    model_version: str
    kind: str = Field(description="SEG, SR or notification (HL7 ORU^R01 to a worklist)")
    destination: str
    status: Literal["pending", "sent", "dead", "dropped", "unroutable"]
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    sent_at: float | None
    supersedes_earlier: bool
    timings: dict[str, float]


class OutboxList(_Out):
    items: list[OutboxItemOut]
    counts: dict[str, int]


class StudyError(_Out):
    source: str = Field(description="instance, inference, label, result, outbox or job")
    ref: str
    message: str


class DriftPoint(_Out):
    """Dice of a production prediction against a label that arrived later."""

    at: float
    study_id: int
    model_name: str
    model_version: str
    mean_dice: float
    dice: dict[str, float]


class StudyDetail(StudySummaryOut):
    routing: dict[str, Any] | None
    results: list[ResultOut]
    outbox: list[OutboxItemOut]
    instance_states: dict[str, int]
    errors: list[StudyError]
    labels: dict[str, Any] | None
    drift: list[DriftPoint]
    turnaround_s: float | None = Field(
        description="Last instance received to last result sent, current version")


class ModelVersionOut(_Out):
    name: str
    version: str
    task: str
    sha256: str
    status: str = Field(description="candidate, active, retired or rejected")
    created_at: float
    created_by: str
    activated_at: float | None
    reason: str | None
    heldout_dice: float | None = Field(
        description="Mean Dice on the held-out test split when it was trained here; else "
                    "the package's own validation Dice")
    heldout_source: str | None
    production_dice: float | None = Field(
        description="Mean Dice of its production predictions against later labels")
    production_n: int
    metrics: dict[str, Any]
    card: dict[str, Any]


class ModelOut(_Out):
    name: str
    active_version: str | None
    versions: list[ModelVersionOut]
    drift: list[DriftPoint]


class ModelsOut(_Out):
    items: list[ModelOut]


class ReasonIn(BaseModel):
    """Why (recorded on the model version and in the audit trail)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


class TrainingRunOut(_Out):
    id: int
    model_name: str
    started_at: float
    finished_at: float | None
    status: str = Field(description="running, skipped, promoted, rejected or failed")
    reason: str | None
    version: str | None
    new_labels: int
    metrics: dict[str, Any]
    card: dict[str, Any]


class TrainingRunList(_Out):
    items: list[TrainingRunOut]


class JobOut(_Out):
    id: int
    task: str
    queue: str
    status: str = Field(description="todo, running, done or failed (dead letter)")
    attempts: int
    max_attempts: int
    run_after: float
    last_error: str | None
    created_at: float
    updated_at: float
    args: dict[str, int | float | str | bool | None]


class JobList(_Out):
    items: list[JobOut]


class QueueDepth(_Out):
    queue: str
    todo: int
    due: int = Field(description="todo and due now (not waiting for a retry)")
    running: int
    failed: int
    done: int


class QueuesOut(_Out):
    queues: list[QueueDepth]


class QuarantineItem(_Out):
    instance_id: int
    study_id: int
    study_key: str
    sop_class_uid: str
    state: Literal["quarantined", "failed"]
    reason: str | None
    received_at: float


class QuarantineList(_Out):
    items: list[QuarantineItem]

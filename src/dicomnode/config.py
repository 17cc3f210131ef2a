"""Typed, layered node configuration.

Precedence, lowest first: built-in defaults, one TOML file, ``DICOMNODE_...``
environment variables (``__`` separates nesting levels, e.g.
``DICOMNODE_SCP__PORT=4242``), then explicit overrides (the CLI flags).

:func:`load_settings` is called once, by the CLI; everything below receives the
frozen :class:`NodeSettings` object and never reads the environment itself.
Every key is documented, with its default, in ``config/node.example.toml``.
"""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicomnode.errors import ConfigError

__all__ = [
    "ApiSettings",
    "CompletionRule",
    "HttpCredentials",
    "PriorityRule",
    "ResultKind",
    "RetentionSettings",
    "CompletionSettings",
    "DeidSettings",
    "InferenceSettings",
    "ResultSettings",
    "RoutingRule",
    "RoutingSettings",
    "PixelMaskRule",
    "PrivateKeepRule",
    "JobSettings",
    "LearningSettings",
    "NodeSettings",
    "PeerSettings",
    "ScpSettings",
    "SeriesRequirement",
    "StorageSettings",
    "TlsSettings",
    "load_settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


def _check_ae(value: str) -> str:
    """Validate an AE title (PS3.5 6.2: 16 chars max, no backslash or control chars)."""
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable ASCII characters, no backslash, not all spaces")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 B.9 / BCP 195): TLS 1.2+, server certificate, optional client cert."""

    mode: Literal["off", "separate", "only"] = "off"
    """off: plain DICOM only; separate: TLS on ``port`` beside plain; only: TLS replaces plain."""
    port: int = Field(2762, ge=1, le=65535)
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    """CA bundle that client certificates must chain to."""
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _needs_files(self) -> TlsSettings:
        if self.mode != "off" and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file are required when tls.mode is not off")
        if self.mode != "off" and self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.ca_file is required when tls.require_client_cert is true")
        return self


class ScpSettings(_Section):
    """The storage SCP: where it listens and whom it lets in."""

    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    accept_any_ae: bool = False
    """Accept any calling AE title. Off: only AE titles of [peers.*] with allow_store."""
    require_called_ae: bool = False
    """Reject associations whose called AE title is not ours."""
    max_associations: int = Field(16, ge=1, le=1024)
    max_pdu: int = Field(131072, ge=0)
    """Maximum PDU we receive; 0 = unlimited. 128 KiB is dcmtk's cap and 1.3x faster than 16 KiB."""
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    poll_interval_s: float = Field(0.0002, gt=0, le=0.01)
    """How often an association's network thread polls its socket when idle (pynetdicom's
    DUL loop; its default 0.001 s halves C-STORE throughput, see DESIGN.md), while at
    most ``fast_poll_max_associations`` associations run."""
    event_reactor: bool = True
    """Serve each decoded C-STORE as soon as it arrives instead of after pynetdicom's fixed
    1 ms reactor sleep (scp/reactor.py; 1.14-1.18x ingest on one association, measured).
    Off: pynetdicom's own loop."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On stop, running associations get this long to finish before they are aborted."""
    tls: TlsSettings = TlsSettings()
    # -- load and hostile connections (DESIGN.md, "Connections before they associate",
    #    "Several receiving processes", "Polling per load") --
    processes: int = Field(0, ge=0, le=256)
    """Receiving processes sharing the listening sockets; 0 = one per CPU core. With 1 the
    node receives in its own process; with more, the main process runs only the job
    workers, the completion loop and the API."""
    preassociation_timeout_s: float = Field(10.0, gt=0)
    """A connection must complete its A-ASSOCIATE-RQ (and TLS handshake) this soon after
    TCP accept, or it is dropped; it holds no association slot meanwhile."""
    max_pending: int = Field(512, ge=1)
    """Connections not yet associated, at most, per receiving process."""
    max_pending_per_source: int = Field(32, ge=1)
    """...and per source IP address (one noisy host cannot lock the others out)."""
    drop_audit_interval_s: float = Field(60.0, gt=0)
    """At most one audit line per source address per this interval for connections
    dropped before associating (every drop is counted in the metrics)."""
    fast_poll_max_associations: int = Field(1, ge=0)
    """Poll at poll_interval_s while at most this many associations run (in all
    processes); above, at pynetdicom's 0.001 s, whose fewer wake-ups win when many
    associations share the cores."""

    @property
    def effective_processes(self) -> int:
        """``processes``, with 0 resolved to the CPU cores this process may use."""
        if self.processes:
            return self.processes
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value != 0 and value < 4096:
            raise ValueError("must be 0 (unlimited) or at least 4096")
        return value


class HttpCredentials(_Section):
    """HTTP credentials kept in files (never in the TOML): basic or bearer.

    Basic: ``username`` and ``password_file``; bearer: ``token_file``. Exactly one
    scheme. The files must exist when the configuration is loaded.
    """

    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> HttpCredentials:
        basic = self.username is not None or self.password_file is not None
        if basic == (self.token_file is not None):
            raise ValueError("give either username and password_file (basic) or token_file "
                             "(bearer)")
        if basic and (not self.username or self.password_file is None):
            raise ValueError("basic credentials need both username and password_file")
        if self.username is not None and ":" in self.username:
            raise ValueError("username must not contain ':'")
        for f in (self.password_file, self.token_file):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{f}: no such file")
        return self

    @property
    def scheme(self) -> Literal["basic", "bearer"]:
        return "bearer" if self.token_file is not None else "basic"

    def secret(self) -> str:
        """The password or token, read from its file now (so a rotated file is used).

        Raises
        ------
        ConfigError
            The file cannot be read or is empty.
        """
        path = self.token_file if self.token_file is not None else self.password_file
        assert path is not None  # the validator guarantees one
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read credentials ({exc.strerror})") from None
        if not value:
            raise ConfigError(f"{path}: the credentials file is empty")
        return value


ResultKind = Literal["SEG", "SR", "PM", "KEY", "notification"]
_IMAGE_KINDS: tuple[ResultKind, ...] = ("SEG", "SR", "PM", "KEY")


class PriorityRule(_Section):
    """Worklist priority of a notification: ``priority`` when ``label`` is present."""

    label: str
    """A label name of the model package (case-insensitive), e.g. "Haemorrhage"."""
    priority: Literal["STAT", "ASAP", "ROUTINE"] = "STAT"


class PeerSettings(_Section):
    """A known peer: a modality, a PACS, a workstation, a DICOMweb archive, a RIS.

    ``transport`` says how results reach it: ``dimse`` (C-STORE to ``host:port`` as
    ``ae_title``), ``dicomweb`` (STOW-RS to ``url``) or ``hl7`` (ORU^R01 over MLLP to
    ``host:port``). Every transport goes through the same outbox.
    """

    ae_title: str | None = None
    """Needed for dimse peers, and for peers that send us studies by STOW-RS (their
    studies are filed under it: routing, completion rules, "caller" and
    annotation_aes match it)."""
    transport: Literal["dimse", "dicomweb", "hl7"] = "dimse"
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None
    """dicomweb: the DICOMweb base URL (STOW-RS posts to ``{url}/studies``)."""
    credentials: HttpCredentials | None = None
    """dicomweb: how the node authenticates to the peer (basic or bearer, from files)."""
    tls_verify: bool = True
    """dicomweb over https: verify the server certificate (keep on outside tests)."""
    ca_file: Path | None = None
    """dicomweb: CA bundle to verify the server with; None = the system's."""
    kinds: list[ResultKind] | None = None
    """Result kinds this destination gets; None = every object kind a model produces,
    ["SEG", "SR", "PM", "KEY"] (dimse, dicomweb: PM is the Parametric Map of an
    explanation, KEY its rendered key image), or ["notification"] (hl7)."""
    allow_store: bool = True
    """May send us objects (is on the calling-AE allow-list, and its ``stow_credentials``
    are accepted by STOW-RS)."""
    stow_credentials: HttpCredentials | None = None
    """Credentials this peer presents to our ``POST /dicom-web/studies`` (STOW-RS in)."""
    quiet_period_s: float | None = Field(None, gt=0)
    """Overrides completion.quiet_period_s for studies this peer sends."""
    storage_commitment: bool = False
    """dimse: ask this peer for storage commitment (N-ACTION) after sending it results;
    an item is ``confirmed`` when its N-EVENT-REPORT says so. The peer must be able to
    open an association to us for the report (it is let in for that)."""
    receiving_application: str | None = None
    """hl7: MSH-5 of the notification."""
    receiving_facility: str | None = None
    """hl7: MSH-6 of the notification."""
    sending_facility: str | None = None
    """hl7: MSH-4 of the notification (MSH-3 is the node's ae_title)."""
    priority_rules: list[PriorityRule] = []
    """hl7: the first rule whose label is present sets the priority..."""
    default_priority: Literal["STAT", "ASAP", "ROUTINE"] = "ROUTINE"
    """...else this one."""
    notify_negative: bool = False
    """hl7: also notify a study whose results found nothing."""

    _ae = field_validator("ae_title")(
        classmethod(lambda cls, v: None if v is None else _check_ae(v))
    )

    @property
    def result_kinds(self) -> tuple[ResultKind, ...]:
        """The kinds this destination gets (``kinds`` or the transport's default)."""
        if self.kinds is not None:
            return tuple(self.kinds)
        return ("notification",) if self.transport == "hl7" else _IMAGE_KINDS

    def address_problem(self) -> str | None:
        """Why results cannot be sent to this peer, or None."""
        if self.transport == "dicomweb":
            return None if self.url else "url is needed to send results by STOW-RS"
        if self.host is None or self.port is None:
            return "host and port are needed to send results there"
        return None

    @model_validator(mode="after")
    def _transport_fields(self) -> PeerSettings:
        if self.transport == "dimse" and self.ae_title is None:
            raise ValueError("ae_title is required for a dimse peer")
        if self.stow_credentials is not None and self.ae_title is None:
            raise ValueError("ae_title is required with stow_credentials (the peer's studies "
                             "are filed under it)")
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError("url must be an http:// or https:// URL")
        if self.transport != "dicomweb" and (self.url or self.credentials):
            raise ValueError("url and credentials apply to transport = \"dicomweb\" only")
        if self.transport != "dimse" and self.storage_commitment:
            raise ValueError("storage_commitment applies to transport = \"dimse\" only")
        kinds = set(self.result_kinds)
        if self.transport == "hl7" and kinds != {"notification"}:
            raise ValueError("an hl7 peer gets kinds = [\"notification\"] only")
        if self.transport != "hl7" and "notification" in kinds:
            raise ValueError("notifications go to transport = \"hl7\" peers only")
        return self


class SeriesRequirement(_Section):
    """One series that a completion rule waits for."""

    modality: str | None = None
    series_number: int | None = None
    min_instances: int = Field(1, ge=1)


class CompletionRule(_Section):
    """Complete a study early once every required series has arrived."""

    name: str
    calling_ae: str | None = None
    """Only for studies sent by this AE title; None = any."""
    series: list[SeriesRequirement] = Field(min_length=1)
    settle_s: float = Field(2.0, ge=0)
    """Grace after the last instance once the rule is met (a modality may still be sending)."""


class CompletionSettings(_Section):
    """When a study counts as fully arrived (see DESIGN.md, "Study completion")."""

    quiet_period_s: float = Field(30.0, gt=0)
    max_wait_s: float = Field(3600.0, gt=0)
    """Force-complete this long after the first instance of a study version, even if busy."""
    check_interval_s: float = Field(1.0, gt=0)
    rules: list[CompletionRule] = []


class StorageSettings(_Section):
    """Files under the data directory."""

    fsync: bool = True
    """fsync every received object (and its directory) before answering success."""
    spare_files: int = Field(4, ge=0, le=64)
    """Empty temporary files kept ready so that a write need not create one (0: off)."""
    min_free_gb: float = Field(1.0, ge=0)
    """Below this much free space on the data directory's filesystem new associations are
    rejected (transient A-ASSOCIATE-RJ) and STOW-RS answers 503 with Retry-After, so
    senders keep the data and retry; it resumes by itself (0: off)."""
    max_used_percent: float | None = Field(None, gt=0, le=100)
    """Also refuse when the filesystem is fuller than this percentage (None: off)."""
    warn_free_gb: float | None = Field(None, ge=0)
    """A warning (log, audit, ``dicomnode_disk_state`` 1) below this; None: twice
    ``min_free_gb``."""
    disk_check_interval_s: float = Field(1.0, ge=0, le=60)
    """How long one free-space reading is reused (statvfs per association is cheap, but
    a burst of associations need not repeat it)."""
    disk_retry_after_s: int = Field(60, ge=1, le=3600)
    """Retry-After of the STOW-RS 503 while refusing."""


class PrivateKeepRule(_Section):
    """A private element kept by Retain Safe Private (113111), matched by its creator."""

    creator: str
    element: int = Field(ge=0, le=0xFF)
    """Offset inside the private block: 0x10 for (gggg,xx10)."""
    vr: str


class PixelMaskRule(_Section):
    """Pixels to blank (Clean Pixel Data, 113101) on objects matching every given field."""

    regions: list[tuple[int, int, int, int]] = []
    """Rectangles (row, column, rows, columns), 0-based from the top left."""
    keep_ultrasound_regions: bool = False
    """Blank everything outside the Sequence of Ultrasound Regions instead."""
    sop_class_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    rows: int | None = None
    columns: int | None = None


class DeidSettings(_Section):
    """De-identification keys and profile (see DESIGN.md, "De-identification")."""

    secret: SecretStr | None = None
    """Master secret for pseudonyms (at least 32 characters); prefer secret_file or the env."""
    secret_file: Path | None = None
    """File holding the master secret; must exist when set."""
    vault_key: SecretStr | None = None
    """Key of the identity vault (at least 32 characters), separate from the secret."""
    vault_key_file: Path | None = None
    generate_secret: bool = True
    """With no secret (or vault key) configured: create ``keys/node.key`` (``keys/vault.key``)
    with mode 0600 in data_dir. The embedded demo default; set false in production so a lost
    key stops the node instead of silently starting a new pseudonym epoch."""
    min_shift_days: int = Field(365, ge=1)
    max_shift_days: int = Field(3650, ge=1)
    patient_id_prefix: str = "P"
    patient_name_style: Literal["id", "anon^id"] = "id"
    retain_full_dates: bool = False
    """113106 instead of 113107: keep dates unshifted."""
    retain_patient_characteristics: bool = True
    clean_descriptors: bool = True
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    safe_private: list[PrivateKeepRule] = []
    """Private elements kept (113111 is claimed when this list is not empty)."""
    age_cap_years: int | None = Field(90, ge=1, le=999)
    keep_text: list[str] = []
    """Keywords of free-text attributes to keep (reviewed as safe at your site)."""
    descriptor_words: list[str] = []
    """Words Clean Descriptors may keep besides the built-in vocabulary."""
    risky_modalities: list[str] | None = None
    """Modalities whose pixels may carry burned-in text; None = the built-in list."""
    risky_sop_classes: list[str] | None = None
    quarantine_risky: bool = True
    """Quarantine objects at risk of burned-in identity (not used, listed by ``dicomnode
    quarantine list``); false stores them de-identified with the risk noted."""
    mask_rules: list[PixelMaskRule] = []
    spool_retention_s: float = Field(0.0, ge=0)
    """Keep the identified spool file this long after its de-identified copy is durable."""
    failed_spool_retention_s: float = Field(86400.0, ge=0)
    """An object that cannot be de-identified at all (unreadable after it was stored) keeps
    its identified spool file this long for an operator to look at, then it is deleted
    (audited): no identified copy stays without a time limit."""
    settle_s: float = Field(0.5, ge=0)
    """Wait this long after a study's latest instance before de-identifying it (so a burst
    of C-STOREs is not slowed by de-identification competing for the CPU)..."""
    max_delay_s: float = Field(30.0, ge=0)
    """...but never let an instance wait longer than this (each instance's deadline is
    stored with it and enforced by a sweep)."""
    sweep_interval_s: float = Field(1.0, gt=0)
    """How often the sweep looks for instances due for de-identification (settled
    studies, deadlines within the next interval) and schedules their jobs."""


class InferenceSettings(_Section):
    """ONNX Runtime and the model registry."""

    providers: Literal["auto"] | list[str] = "auto"
    """"auto": CUDA when onnxruntime-gpu and a GPU are there, else CPU; or an explicit
    list such as ["CUDAExecutionProvider", "CPUExecutionProvider"]."""
    intra_op_threads: int = Field(0, ge=0)
    """Threads inside one operator; 0 = ONNX Runtime's default (all cores)."""
    inter_op_threads: int = Field(0, ge=0)
    demo_model: bool = True
    """Register and activate the bundled demo model when the registry is empty."""
    isolation: Literal["process", "thread"] = "process"
    """process: models run in a child process that may die (out of memory) without taking
    the node down; the job fails and is retried, a new child starts. thread: in the
    worker thread (one process, less memory)."""
    tensorrt_fp16: bool = False
    """With "TensorrtExecutionProvider" in providers: let TensorRT use half precision
    (its engines are cached under data_dir/trt-cache)."""
    memory_budget_mb: float = Field(8192.0, gt=0)
    """A format 2 model whose estimated memory for a volume (beyond the volume itself)
    exceeds this refuses the volume with the estimate, instead of exhausting memory."""


_ANY = ("*", "any", "ANY", "Any")


class RoutingRule(_Section):
    """Which models run on a study, and on which of its series.

    ``modality`` and ``plane`` take ``"*"`` (or ``"any"``) for any value; the
    regular-expression filters match anywhere in the value, case-insensitively, and a
    filter left out accepts every series.
    """

    name: str
    models: list[str] = Field(min_length=1)
    modality: str | None = "CT"
    """Modality of the series to run on; "*" for any."""
    body_part: str | None = None
    """Regular expression BodyPartExamined must match (case-insensitive)."""
    series_description: str | None = None
    """Regular expression SeriesDescription must match (case-insensitive)."""
    sop_class_uid: str | None = None
    calling_ae: str | None = None
    """Only studies sent by this AE title."""
    min_slices: int = Field(2, ge=1)
    """Fewest slices in the volume the series makes (1 accepts a single slice)."""
    plane: Literal["axial", "coronal", "sagittal", "oblique"] | None = "axial"
    """Plane of the volume's slices; "*" for any."""
    max_slice_spacing_mm: float | None = Field(None, gt=0)
    view_position: str | None = None
    """Regular expression View Position (0018,5101) must match, e.g. "PA|AP" (2D images)."""
    image_laterality: str | None = None
    """Regular expression Image Laterality (0020,0062) must match, e.g. "L" (2D images)."""
    presentation_intent: str | None = None
    """Regular expression Presentation Intent Type (0008,0068) must match, e.g.
    "FOR PRESENTATION" (2D images)."""
    images: Literal["one", "every"] | None = None
    """Run on single 2D images (an image model: radiograph classifiers) rather than a
    series' volume: "one" picks one matching image per study (lowest Series Number,
    then Instance Number), "every" every matching image. The image filters above are
    then checked per image; ``plane``, ``min_slices`` and ``max_slice_spacing_mm`` do not
    apply."""
    destinations: list[str] | None = None
    """Where this rule's results go (peer names or "caller"); None: results.destinations."""

    @field_validator("modality", "plane", mode="before")
    @classmethod
    def _wildcard(cls, value: object) -> object:
        return None if value in _ANY else value

    @field_validator(
        "body_part", "series_description", "view_position", "image_laterality",
        "presentation_intent",
    )
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return value


class RoutingSettings(_Section):
    """Routing rules, tried in order; every matching rule's models run."""

    rules: list[RoutingRule] = [
        RoutingRule(name="demo-ct-lesions", models=["demo-lesion"], modality="CT", min_slices=8),
        RoutingRule(name="demo-chest-radiograph", models=["demo-cxr-nodule"], modality="DX",
                    images="one", view_position="^(PA|AP)$",
                    presentation_intent="FOR PRESENTATION"),
    ]


class ResultSettings(_Section):
    """Results (DICOM SEG and TID 1500 SR) and their delivery (see DESIGN.md, "Results")."""

    destinations: list[str] = ["caller"]
    """Peer names to send results to; "caller" is the peer whose AE title sent the study
    (it needs host and port in [peers.*])."""
    seg: bool = True
    sr: bool = True
    max_attempts: int = Field(10, ge=1)
    retry_base_s: float = Field(30.0, ge=0)
    """First retry after this long, doubling each time..."""
    retry_max_s: float = Field(600.0, ge=0)
    """...capped at this; after max_attempts the item is dead-lettered."""
    timeout_s: float = Field(30.0, gt=0)
    """Association and DIMSE timeout when sending."""
    manufacturer: str = "dicomnode"
    institution_name: str | None = None
    tracking_tolerance_mm: float = Field(10.0, gt=0)
    """A finding of a re-run study keeps the Tracking Identifier and UID of the earlier
    result's finding of the same label whose centroid lies within this distance
    (DESIGN.md, "Per-finding results")."""


class LearningSettings(_Section):
    """Labels from radiologists' corrected SEGs, scheduled retraining, the promotion gate."""

    annotation_aes: list[str] = []
    """Calling AE titles whose Segmentation objects become ground-truth labels (one AE
    per annotator: a later SEG from the same AE for the same study replaces its label)."""
    model: str = "demo-lesion"
    """The model retraining produces candidates for (its active package gives the input
    contract and the labels)."""
    schedule: str = "0 2 * * *"
    """Cron expression (minute hour day month weekday) of the retraining run."""
    interval_s: float | None = Field(None, gt=0)
    """Run every this many seconds instead of the cron schedule (tests, demos)."""
    enabled: bool = True
    min_new_labels: int = Field(5, ge=0)
    """A scheduled run trains only when at least this many labels arrived since the last."""
    agreement_threshold: float = Field(0.7, ge=0, le=1)
    """Studies whose annotators agree less (mean pairwise Dice) are flagged for review..."""
    include_flagged: bool = False
    """...and left out of training unless this is true."""
    consensus: Literal["majority", "staple"] = "staple"
    margin: float = Field(0.02, ge=0)
    """Promote only when the candidate's mean Dice on the held-out split beats the active
    model's by at least this much (and the bootstrap interval excludes no gain)."""
    floor: float = Field(0.5, ge=0, le=1)
    """No candidate below this mean Dice is promoted (also the first model)."""
    train_steps: int = Field(600, ge=1)
    train_seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Train / validation / test shares of the patients (split by patient pseudonym)."""
    split_seed: int = 0
    """Keep fixed: test patients then never enter training in later runs."""
    nnunet_epochs: int = Field(5, ge=1)
    """Fine-tune of an imported nnU-Net model (importers.nnunet_finetune): nnU-Net epochs."""
    nnunet_iterations_per_epoch: int = Field(50, ge=1)
    """... and training iterations per epoch (nnU-Net's default, 250, is for from scratch)."""
    nnunet_lr: float = Field(1e-3, gt=0)
    """... and initial learning rate (nnU-Net's poly schedule from here)."""


class ApiSettings(_Section):
    """The operator HTTP API and dashboard (DESIGN.md, "Operator surface")."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Loopback by default: put a TLS-terminating reverse proxy in front to expose it."""
    port: int = Field(8080, ge=0, le=65535)
    """0: any free port (tests); the port in use is logged."""
    token: SecretStr | None = None
    """Bearer token (at least 16 characters); prefer ``DICOMNODE_API__TOKEN``."""
    token_file: Path | None = None
    """File holding the bearer token. With neither ``token`` nor ``token_file``, the node
    uses ``keys/api.token`` in data_dir, created (mode 0600) on first start."""
    users: dict[str, SecretStr] = {}
    """Basic-auth users (name -> password), for the dashboard in a browser; the name is
    recorded in the audit trail for every change made through the API."""
    metrics_public: bool = False
    """Serve ``/metrics`` without credentials (a scraper on a trusted network)."""
    stow: bool = True
    """Serve STOW-RS (``POST /dicom-web/studies``) to peers with ``stow_credentials``."""
    stow_max_part_bytes: int = Field(1 << 30, ge=1024)
    """Largest single instance STOW-RS accepts (each part is held in memory until it is
    whole); a larger part is answered 413."""

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("users")
    @classmethod
    def _passwords(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, password in value.items():
            if not name or ":" in name:
                raise ValueError(f"user name {name!r}: must be non-empty, without ':'")
            if len(password.get_secret_value()) < 8:
                raise ValueError(f"password of {name}: must be at least 8 characters")
        return value


class RetentionSettings(_Section):
    """How long what grows is kept (``[retention]``); a daily sweep removes the rest.

    Ages are in days (fractions allowed); 0 keeps forever. Whatever the ages, the sweep
    never removes what is still needed: a study with a delivery pending, a job waiting
    or running for it, an outcome still being processed, or labels (a labelled study is
    in the training set while ``keep_labelled``); its vault entries go with it, never
    before. Each removal is audited (``retention_removed``).
    """

    enabled: bool = True
    interval_s: float = Field(86400.0, ge=1.0)
    """How often the sweep runs (daily); also once shortly after start."""
    batch: int = Field(200, ge=1, le=10000)
    """Rows (or studies) removed per transaction: writers wait at most one batch."""
    studies_days: float = Field(365.0, ge=0)
    """Whole studies after their last receipt: de-identified archive copies, result
    objects and masks, outbox rows, index rows and vault entries (identity and UIDs)."""
    jobs_days: float = Field(14.0, ge=0)
    """Done jobs and their dedup keys (failed jobs stay for the operator)."""
    outbox_days: float = Field(90.0, ge=0)
    """Delivered outbox rows (sent, confirmed, dropped) and their object files."""
    labels_days: float = Field(0.0, ge=0)
    """Ground-truth labels (and so the study's place in the training set); 0: kept."""
    keep_labelled: bool = True
    """Never remove a study that has labels (it is in the training set)."""
    audit_days: float = Field(0.0, ge=0)
    """Rotated audit files (``audit.jsonl.*``, by logrotate) older than this; 0: kept.
    The live file is never rewritten (its handler keeps appending)."""
    vacuum_free_fraction: float = Field(0.25, gt=0, le=1)
    """SQLite: VACUUM after a sweep when this fraction of the file is free pages."""


class JobSettings(_Section):
    """The job queue that runs everything after the C-STORE handler."""

    backend: Literal["local", "procrastinate"] = "local"
    """local: a table in the node's database, workers in the node process (one process).
    procrastinate: PostgreSQL queue shared by several receivers and workers."""
    url: str | None = None
    """PostgreSQL URL of the procrastinate queue; None = database_url."""
    stalled_after_s: float = Field(60.0, gt=0)
    """procrastinate: a job whose worker sent no heartbeat for this long runs again."""
    workers: dict[str, int] = {"default": 1, "ingest": 1, "cpu": 1, "gpu": 1, "send": 2, "train": 1}
    """Worker threads per queue."""
    lease_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    retry_base_s: float = Field(5.0, ge=0)
    retry_max_s: float = Field(600.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)


_TOML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml", default=None)


class NodeSettings(BaseSettings):
    """All settings of one node. Frozen: build a new one to change anything."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    ae_title: str = "DICOMNODE"
    data_dir: Path = Path("./dicomnode-data")
    database_url: str | None = None
    """SQLAlchemy URL; None = SQLite file ``dicomnode.db`` in data_dir."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    scp: ScpSettings = ScpSettings()
    peers: dict[str, PeerSettings] = {}
    completion: CompletionSettings = CompletionSettings()
    storage: StorageSettings = StorageSettings()
    jobs: JobSettings = JobSettings()
    retention: RetentionSettings = RetentionSettings()
    deid: DeidSettings = DeidSettings()
    inference: InferenceSettings = InferenceSettings()
    routing: RoutingSettings = RoutingSettings()
    results: ResultSettings = ResultSettings()
    learning: LearningSettings = LearningSettings()
    api: ApiSettings = ApiSettings()
    log_json: bool = False
    """JSON lines on stderr instead of text."""
    audit_file: Path | None = None
    """The audit trail (JSON lines, mode 0600); None = ``audit.jsonl`` in data_dir."""

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @property
    def effective_database_url(self) -> str:
        """The database URL in use (the SQLite default spelled out)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dicomnode.db').resolve()}"

    def allowed_calling_aes(self) -> list[str]:
        """AE titles allowed to send to us (ignored when scp.accept_any_ae)."""
        return sorted(
            {p.ae_title for p in self.peers.values()
             if p.ae_title is not None and (p.allow_store or p.storage_commitment)}
        )

    @property
    def queue_url(self) -> str | None:
        """The procrastinate queue's PostgreSQL URL (jobs.url, else database_url)."""
        return self.jobs.url or self.database_url

    def peer_by_ae(self, ae_title: str | None) -> tuple[str, PeerSettings] | None:
        """The first peer with this AE title, as (name, settings)."""
        if ae_title is None:
            return None
        for name, peer in self.peers.items():
            if peer.ae_title == ae_title:
                return name, peer
        return None

    @model_validator(mode="after")
    def _queue_needs_postgres(self) -> NodeSettings:
        if self.jobs.backend == "procrastinate":
            url = self.jobs.url or self.database_url or ""
            if not url.startswith("postgresql"):
                raise ValueError(
                    "jobs.url: the procrastinate backend needs a PostgreSQL URL "
                    "(jobs.url or database_url)"
                )
        return self

    @model_validator(mode="after")
    def _destinations_known(self) -> NodeSettings:
        names = set(self.results.destinations)
        for rule in self.routing.rules:
            names |= set(rule.destinations or [])
        unknown = sorted(n for n in names - {"caller"} if n not in self.peers)
        if unknown:
            raise ValueError(f"results.destinations: no [peers.{unknown[0]}] defined")
        for n in names - {"caller"}:
            problem = self.peers[n].address_problem()
            if problem is not None:
                raise ValueError(f"peers.{n}: {problem}")
        return self

    def quiet_period_for(self, calling_ae: str | None) -> float:
        """The quiet period for studies sent by ``calling_ae``."""
        for peer in self.peers.values():
            if (calling_ae is not None and peer.ae_title == calling_ae
                    and peer.quiet_period_s is not None):
                return peer.quiet_period_s
        return self.completion.quiet_period_s

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _TOML_FILE.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(root)"
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    shown = err.get("input")
    got = f" (got {shown!r})" if isinstance(shown, str | int | float | bool) else ""
    return f"{key}: {msg}{got}{extra}"


def load_settings(
    path: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> NodeSettings:
    """Load and validate the configuration once.

    Parameters
    ----------
    path
        A TOML file, or None for defaults plus environment.
    overrides
        Nested mapping applied on top of everything (CLI flags),
        e.g. ``{"scp": {"port": 4242}}``.

    Raises
    ------
    ConfigError
        With a one-line message naming the file or the key.
    """
    toml_path = Path(path) if path is not None else None
    if toml_path is not None:
        if not toml_path.is_file():
            raise ConfigError(f"{toml_path}: no such config file")
        try:
            tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{toml_path}: {exc}") from None
    token = _TOML_FILE.set(toml_path)
    try:
        return NodeSettings(**dict(overrides or {}))
    except ValidationError as exc:
        where = f"{toml_path}: " if toml_path else ""
        raise ConfigError(f"{where}{_format_error(exc)}") from None
    finally:
        _TOML_FILE.reset(token)
